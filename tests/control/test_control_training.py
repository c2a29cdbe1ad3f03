"""Control runs: a condition LoRA trains over a frozen base on the shapes data; the run
evaluates control accuracy and samples with and without its condition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jdit import control
from jdit.config import load_config
from jdit.train.generate import ControlledParams, make_generator
from jdit.train.loop import load_adapters, load_trained, train
from jdit.train.tasks import render_conditions

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "train.batch_size=8",
         "train.sample_every=0", "train.checkpoint_every=0", "train.log_every=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("control")
    train(load_config(str(ROOT / "configs" / "shapes_tiny.py"), [
        *SMALL, "train.steps=3", "optim.warmup_steps=0", "train.ema_decay=0.0"]),
        tmp / "base", quiet=True)
    train(load_config(str(ROOT / "configs" / "shapes_control.py"), [
        *SMALL, "train.steps=4", f"train.init_from={tmp / 'base'}", "train.ema_decay=0.0",
        "optim.warmup_steps=0"]), tmp / "silhouette", quiet=True)
    train(load_config(str(ROOT / "configs" / "shapes_control.py:outline"), [
        *SMALL, "train.steps=2", f"train.init_from={tmp / 'base'}", "train.ema_decay=0.0",
        "optim.warmup_steps=0"]), tmp / "outline", quiet=True)
    return tmp


@pytest.mark.slow
def test_a_control_run_trains_a_condition_lora_and_samples(runs):
    run, adapters, step = load_adapters(runs / "silhouette")
    assert step == 4 and run.control and run.task.condition == "silhouette"
    items = control.easycontrol.lora.adapter_items(adapters)
    # the recipe's targets: the condition branch's attention and MLP (it has no cross-attention)
    assert items and all(k.endswith(("attn/qkv", "attn/out", "mlp/fc1", "mlp/fc2")) and
                         "cross" not in k for k in items)
    _, params, _ = load_trained(runs / "silhouette")
    assert isinstance(params, ControlledParams)
    _, base, _ = load_trained(runs / "base")
    objs = [(run.task.shapes.Obj("red", "square", "center"),)] * 2
    cond = run.task.encode(["", "a red square in the center"])
    plain = run.generate(params, cond, seed=0, num_steps=3)
    # no condition: the base model, bit for bit
    np.testing.assert_array_equal(plain, run.generate(base, cond, seed=0, num_steps=3))
    cond["condition"] = render_conditions(objs, "silhouette", 32)
    with_condition = run.generate(params, cond, seed=0, num_steps=3)
    assert np.abs(with_condition - plain).max() > 1e-4
    # guess mode (the recipe's): the unconditional half without the condition
    assert run.config["control"]["guess_mode"]
    cfg = {**run.config, "control": {**run.config["control"], "guess_mode": False}}
    both_halves = make_generator(run.module, run.task, cfg)(params, cond, seed=0, num_steps=3)
    assert np.abs(both_halves - with_condition).max() > 1e-4
    with pytest.raises(ValueError, match="ControlledParams"):
        run.generate(base, cond, seed=0, num_steps=3)
    # position-aware interpolation: a half-size condition, a wider target
    cond["condition"] = render_conditions(objs, "silhouette", 32, condition_size=16)
    assert cond["condition"].shape == (2, 16, 16, 3)
    wide = run.generate(params, cond, seed=0, num_steps=3, hw=(32, 48))
    assert wide.shape == (2, 32, 48, 3) and np.isfinite(wide).all()


@pytest.mark.slow
def test_control_eval_reports_control_accuracy(runs):
    from jdit.train.loop import evaluate

    out = evaluate(runs / "silhouette", num_pairs=4, single_repeats=1)
    assert {"control_single", "control_pair", "control_caption_single", "chance_single",
            "control_single_half", "control_single_wide"} <= set(out)
    assert out["wide_hw"] == [32, 48] and out["condition_size"] == 32
    assert all(0.0 <= out[k] <= 1.0 for k in ("control_single", "control_pair"))



@pytest.mark.slow
def test_two_condition_loras_trained_apart_compose(runs):
    from jdit.cli import main as jdit
    from jdit.train.loop import evaluate_composition

    out = evaluate_composition([runs / "silhouette", runs / "outline"], num_pairs=4, caption=True)
    assert out["styles"] == ["silhouette", "outline"] and out["num_pair_images"] == 4
    assert all(0.0 <= out[k] <= 1.0 for k in ("composition_pair", "composition_caption_pair"))
    joint = evaluate_composition([runs / "silhouette", runs / "outline"], num_pairs=4,
                                 attend_each_other=True)
    assert joint["attend_each_other"] and not out["attend_each_other"]
    with pytest.raises(ValueError, match="control runs"):
        evaluate_composition([runs / "silhouette", runs / "base"])
    assert jdit(["eval", "--workdir", str(runs / "silhouette"), "--compose",
                 str(runs / "outline")]) == 0


@pytest.mark.slow
def test_a_controlnet_run_trains_copies_of_the_base_blocks(tmp_path, runs):
    """configs/shapes_controlnet.py: a PixArt-δ ControlNet over the frozen base; its copies
    start as the base's first blocks, only it trains, and it changes the images."""
    from jdit.weights.state_dict import flatten

    train(load_config(str(ROOT / "configs" / "shapes_controlnet.py"), [
        *SMALL, "train.steps=3", f"train.init_from={runs / 'base'}", "train.ema_decay=0.0",
        "optim.warmup_steps=0", "control.controlnet_depth=1"]), tmp_path / "cn", quiet=True)
    run, params, step = load_trained(tmp_path / "cn")
    _, base, _ = load_trained(runs / "base")
    assert step == 3 and isinstance(params, ControlledParams) and run.controlnet.depth == 1
    cn = flatten(params.adapters)
    assert any(k.startswith("after_proj_0") for k in cn) and float(np.abs(
        cn["after_proj_0/kernel"]).max()) > 0  # trained away from zero
    np.testing.assert_array_equal(flatten(params.base)["block_0/mlp/fc1/kernel"],
                                  flatten(base)["block_0/mlp/fc1/kernel"])  # the base is frozen
    from jdit.control.controlnet import from_base

    fresh = flatten(from_base(run.init_state().params, base))  # how a run starts
    np.testing.assert_array_equal(fresh["block_0/mlp/fc1/kernel"],
                                  flatten(base)["block_0/mlp/fc1/kernel"])
    assert not np.asarray(fresh["after_proj_0/kernel"]).any()
    objs = [(run.task.shapes.Obj("red", "square", "center"),)] * 2
    cond = run.task.encode(["", "a red square in the center"])
    plain = run.generate(params, cond, seed=0, num_steps=3)
    np.testing.assert_array_equal(plain, run.generate(base, cond, seed=0, num_steps=3))
    cond["condition"] = render_conditions(objs, "silhouette", 32)
    assert np.abs(run.generate(params, cond, seed=0, num_steps=3) - plain).max() > 1e-5
    from jdit.train.loop import evaluate

    out = evaluate(tmp_path / "cn", num_pairs=2, single_repeats=1)  # no other sizes or shapes
    assert "control_single" in out and "control_single_half" not in out
