"""LoRA training: only the adapters train over a frozen base; checkpoints hold the adapters and
their optimizer state; resume is exact; the run exports a diffusers file and samples."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jdit import lora
from jdit.cli import main as jdit
from jdit.config import load_config
from jdit.train.loop import load_adapters, load_trained, train

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "train.batch_size=8",
         "train.sample_every=0", "train.checkpoint_every=0", "train.log_every=1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora") / "base"
    # no warm-up or averaging: three steps give the zero-initialised output layer weights
    train(load_config(str(ROOT / "configs" / "shapes_tiny.py"), [
        *SMALL, "train.steps=3", "optim.warmup_steps=0", "train.ema_decay=0.0"]),
        folder, quiet=True)
    return folder


def _config(base, *extra):
    return load_config(str(ROOT / "configs" / "shapes_tiny.py"), [
        *SMALL, "train.steps=6", f"train.init_from={base}", "lora.rank=4", "lora.alpha=8",
        "lora.targets=['attention', 'cross_attention', 'mlp']", *extra])


def _losses(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.slow  # end to end (a training run)
def test_a_lora_run_trains_only_adapters_and_resumes_exactly(base, tmp_path):
    train(_config(base), tmp_path / "whole", quiet=True)
    run, adapters, step = load_adapters(tmp_path / "whole")
    assert step == 6 and run.lora.rank == 4
    items = lora.adapter_items(adapters)
    assert "block_1/mlp/fc2" in items and "t_block/linear" not in items
    assert all(float(np.abs(ad.b).max()) > 0 for ad in items.values())  # B left zero: trained
    # the checkpoint holds the adapters and their optimizer state only
    _, base_params, _ = load_trained(base)
    n_base = sum(x.size for x in jax.tree.leaves(base_params))
    n_lora = lora.num_params(adapters)
    assert n_lora < n_base / 2
    from jdit.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "whole" / "checkpoints", every=0, read_only=True)
    state, _ = ckpt.restore(run.abstract_state())
    ckpt.close()
    assert sum(x.size for x in jax.tree.leaves(state.params)) == n_lora
    # the base itself is unchanged: the merged model differs from it only by the adapters
    _, merged, _ = load_trained(tmp_path / "whole")
    again = lora.merge(base_params, adapters)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(again), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # stopped after 2 steps and resumed: the same losses as the run in one go
    train(_config(base), tmp_path / "resumed", stop_after=2, quiet=True)
    train(_config(base), tmp_path / "resumed", quiet=True)
    np.testing.assert_allclose(_losses(tmp_path / "resumed"), _losses(tmp_path / "whole"),
                               rtol=1e-6)
    # merged inside the step (lora.merged): the same training to float rounding
    train(_config(base, "lora.merged=True"), tmp_path / "merged", quiet=True)
    np.testing.assert_allclose(_losses(tmp_path / "merged"), _losses(tmp_path / "whole"),
                               rtol=1e-4)


def test_lora_needs_a_base_and_dropout_trains(base, tmp_path):
    with pytest.raises(ValueError, match="train.init_from"):
        train(load_config(str(ROOT / "configs" / "shapes_tiny.py"),
                          [*SMALL, "train.steps=2", "lora.rank=4"]), tmp_path / "none", quiet=True)
    train(_config(base, "lora.dropout=0.5", "train.steps=2"), tmp_path / "drop", quiet=True)
    assert all(np.isfinite(_losses(tmp_path / "drop")))


@pytest.mark.slow  # end to end: train, export / evaluate / sample
def test_convert_and_sample_with_the_lora(base, tmp_path, capsys):
    # a large step and no averaging, so that six steps move the samples
    train(_config(base, "train.ema_decay=0.0", "optim.warmup_steps=0", "optim.lr=0.05"),
          tmp_path / "run", quiet=True)
    out = tmp_path / "shapes_lora.safetensors"
    assert jdit(["convert", "--lora", str(tmp_path / "run"), str(out)]) == 0
    run, adapters, _ = load_adapters(tmp_path / "run")
    back, cfg = lora.read(out, run.module)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)
    # the base run sampled with the exported LoRA = the LoRA run sampled
    prompts = ["--prompt", "a red circle in the center", "--num", "2"]
    assert jdit(["sample", "--workdir", str(tmp_path / "run"), "--out",
                 str(tmp_path / "a.png"), *prompts]) == 0
    assert jdit(["sample", "--workdir", str(base), "--lora", f"{out}:1.0", "--out",
                 str(tmp_path / "b.png"), *prompts]) == 0
    from PIL import Image

    a = np.asarray(Image.open(tmp_path / "a.png"), np.int16)
    b = np.asarray(Image.open(tmp_path / "b.png"), np.int16)
    assert np.abs(a - b).max() <= 1
    assert jdit(["sample", "--workdir", str(base), "--lora", f"{out}:0.0", "--out",
                 str(tmp_path / "c.png"), *prompts]) == 0
    assert jdit(["sample", "--workdir", str(base), "--out", str(tmp_path / "d.png"),
                 *prompts]) == 0
    c = np.asarray(Image.open(tmp_path / "c.png"), np.int16)
    d = np.asarray(Image.open(tmp_path / "d.png"), np.int16)
    assert np.abs(c - d).max() <= 1 and np.abs(a - d).max() > 1


@pytest.mark.slow  # end to end: train, export / evaluate / sample
def test_a_lora_run_on_new_concepts_reports_adherence_new(base, tmp_path):
    from jdit.train.loop import evaluate

    train(_config(base, "train.steps=2", "data.concepts=new", "train.sample_every=2",
                  "sample.steps=2"), tmp_path / "new", quiet=True)
    assert (tmp_path / "new" / "samples" / "step_0000002.png").is_file()  # a grid, adapted
    result = evaluate(tmp_path / "new", num_pairs=4, single_repeats=1)
    for key in ("adherence_single", "adherence_pair", "adherence_new", "adherence_new_pair"):
        assert 0.0 <= result[key] <= 1.0
    assert result["num_new_single_prompts"] == 27 and result["num_new_pair_images"] == 4


@pytest.mark.slow  # end to end: train, export / evaluate / sample
def test_prior_preservation_mixes_samples_of_the_base_into_every_batch(base, tmp_path):
    from jdit.train.loop import Run
    from jdit.train.prior import PriorTask

    prompts = "['a red circle in the center', 'a blue square in the top left']"
    config = _config(base, "train.steps=2", f"train.prior_prompts={prompts}",
                     "train.prior_images=6", "train.prior_batch=2", "train.prior_weight=0.5",
                     "sample.steps=2")
    train(config, tmp_path / "prior", quiet=True)
    with np.load(tmp_path / "prior" / "prior.npz") as f:
        prior = {k: f[k] for k in f.files}
    assert prior["images"].shape == (6, 32, 32, 3) and prior["context"].shape[0] == 6
    run = Run(config)
    task = PriorTask(run.task, prior, rows=2, weight=0.5, batch_size=8, seed=0)
    whole = task.batch(3)
    # DreamBooth's loss: mean(instance) + 0.5 mean(prior), as the mean of weighted rows
    np.testing.assert_allclose(whole["loss_weight"], [8 / 6] * 6 + [0.5 * 8 / 2] * 2)
    rows = {tuple(np.asarray(x).ravel()[:8]) for x in prior["images"]}
    assert tuple(whole["images"][7].ravel()[:8]) in rows  # a prior row is a base sample
    assert tuple(whole["images"][0].ravel()[:8]) not in rows
    # hosts reading their own rows see the same global batch
    halves = [task.batch(3, rows=(0, 4)), task.batch(3, rows=(4, 8))]
    for key, value in whole.items():
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value)
