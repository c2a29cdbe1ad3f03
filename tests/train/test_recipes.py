"""The full training recipes (PixArt-α / PixArt-Σ stages, DiT-XL/2 on ImageNet) build, trace and
run a few steps at toy width from a feature cache; a later stage starts from an earlier one."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np
import pytest

from jdit.config import load_config
from jdit.data.cache import write_cache
from jdit.train.loop import Run, init_from, load_trained, train
from jdit.train.writers import read_jsonl
from jdit.weights.safetensors_io import write_safetensors

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "configs" / "recipes"
TEXT_LEN, TEXT_DIM = 6, 16
TOY = ["model.hidden_size=48", "model.depth=4", "model.num_heads=2", "model.input_size=8",
       "train.batch_size=2", "train.steps=3", "train.log_every=1", "train.checkpoint_every=100",
       "model.dtype='float32'"]


def make_cache(path: Path, *, text: bool, sizes: list[tuple[int, int]], per_size: int = 4) -> None:
    rng = np.random.default_rng(0)

    def examples():
        for h, w in sizes:
            for i in range(per_size):
                ex = {"id": f"{h}x{w}-{i}", "latent": rng.standard_normal((h, w, 4)).astype(np.float16)}
                if text:
                    n = int(rng.integers(1, TEXT_LEN + 1))
                    ex["text"] = rng.standard_normal((TEXT_LEN, TEXT_DIM)).astype(np.float16)
                    ex["text_mask"] = (np.arange(TEXT_LEN) < n).astype(np.int8)
                else:
                    ex["label"] = np.int64(rng.integers(0, 10))
                yield ex

    write_cache(path, examples(), examples_per_shard=3)
    if text:
        write_safetensors(path / "null_caption.safetensors", {
            "text": rng.standard_normal((1, TEXT_LEN, TEXT_DIM)).astype(np.float32),
            "text_mask": (np.arange(TEXT_LEN) < 1).astype(np.int32)[None]})


def recipe(spec: str, cache: Path, extra: list[str] = ()):
    toy = TOY + [f"data.path='{cache}'"]
    if "dit_imagenet" in spec:
        toy += ["model.num_classes=10"]
    else:
        toy += [f"model.caption_channels={TEXT_DIM}"]
    if spec.endswith(":1024_kv"):
        toy += ["model.kv_compress_layers=(2, 3)"]
    return load_config(f"{RECIPES / spec}", toy + list(extra))


STAGES = ["pixart_alpha.py:256", "pixart_alpha.py:512", "pixart_alpha.py:1024",
          "pixart_sigma.py:256", "pixart_sigma.py:512", "pixart_sigma.py:1024",
          "pixart_sigma.py:1024_kv", "pixart_sigma.py:2k", "dit_imagenet.py:256",
          "dit_imagenet.py:512"]


@pytest.mark.slow
@pytest.mark.parametrize("spec", STAGES)
def test_recipe_runs_at_toy_width(tmp_path, spec):
    multi_aspect = spec.endswith((":1024", ":1024_kv", ":2k"))
    sizes = [(8, 8), (6, 10)] if multi_aspect else [(8, 8)]
    make_cache(tmp_path / "cache", text="dit" not in spec, sizes=sizes)
    config = recipe(spec, tmp_path / "cache")
    full = load_config(f"{RECIPES / spec}")
    assert full.model.hidden_size == (1152) and full.model.depth == 28  # the real model
    assert full.data.name == "feature_cache" and config.optim.name == full.optim.name
    train(config, tmp_path / "run", quiet=True)
    logged = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in logged] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in logged)
    assert logged[-1]["lr"] > 0 or config.optim.warmup_steps > 2
    _, params, step = load_trained(tmp_path / "run")
    assert step == 3


def test_feature_cache_batches_are_one_bucket_and_deterministic(tmp_path):
    make_cache(tmp_path / "cache", text=True, sizes=[(8, 8), (6, 10)], per_size=4)
    config = recipe("pixart_alpha.py:1024", tmp_path / "cache")
    run_a, run_b = Run(config), Run(config)
    for step in range(6):
        a, b = run_a.task.batch(step), run_b.task.batch(step)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        h, w = a["images"].shape[1:3]
        assert (h, w) in ((8, 8), (6, 10))
        np.testing.assert_array_equal(a["resolution"], np.tile([8 * h, 8 * w], (2, 1)))
        np.testing.assert_allclose(a["aspect_ratio"], h / w)
        assert a["context"].shape == (2, TEXT_LEN, TEXT_DIM) and a["context_mask"].dtype == np.int32
    first = run_a.task.cache[int(run_a.task.sampler.batch(0).indices[0])]
    np.testing.assert_allclose(run_a.task.batch(0)["images"][0],
                               first["latent"].astype(np.float32) * np.float32(0.18215))


@pytest.mark.slow
def test_next_stage_starts_from_the_previous_one(tmp_path):
    make_cache(tmp_path / "cache", text=True, sizes=[(8, 8)])
    train(recipe("pixart_sigma.py:256", tmp_path / "cache"), tmp_path / "s256", quiet=True)
    _, previous, _ = load_trained(tmp_path / "s256")
    nxt = Run(recipe("pixart_sigma.py:512", tmp_path / "cache",
                     [f"train.init_from='{tmp_path / 's256'}'"]))
    state = init_from(nxt.init_state(), nxt, str(tmp_path / "s256"))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(previous), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wrong = Run(recipe("pixart_sigma.py:512", tmp_path / "cache", ["model.hidden_size=96"]))
    with pytest.raises(Exception, match="expected"):
        init_from(wrong.init_state(), wrong, str(tmp_path / "s256"))


def test_missing_null_caption_and_wrong_fields_are_clear_errors(tmp_path):
    make_cache(tmp_path / "cache", text=True, sizes=[(8, 8)])
    (tmp_path / "cache" / "null_caption.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="empty prompt"):
        Run(recipe("pixart_sigma.py:256", tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="not a feature cache"):
        Run(recipe("pixart_sigma.py:256", tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="stage must be one of"):
        load_config(f"{RECIPES / 'pixart_sigma.py'}:4k")
