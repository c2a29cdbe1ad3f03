"""The train step on video latents (B, T, H, W, C): the step is shape-agnostic, so a video batch
trains as an image batch does (what ``jdit aot`` compiles for the video presets)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

from jdit.config import complete
from jdit.models import build
from jdit.train.step import init_state, make_loss_fn, make_train_step

TINY = {
    "latte": dict(input_size=8, video_length=4, caption_channels=16),
    "sana_video": dict(input_size=8, input_width=8, input_frames=4, in_channels=4,
                       out_channels=4, caption_channels=16, cross_num_heads=2, cross_head_dim=16),
}
OBJECTIVE = {"latte": "ddpm", "sana_video": "flow"}  # as published: DDPM + learned σ; flow


def tiny_video(family: str):
    module = build(dict(family=family, hidden_size=32, depth=1, num_heads=2, patch_size=2,
                        **TINY[family]))
    x = module.example_inputs(2, caption_length=5)
    keys = jax.random.split(jax.random.key(1), 2)
    batch = {"images": jax.random.normal(keys[0], x["x"].shape),
             "context": jax.random.normal(keys[1], x["context"].shape),
             "context_mask": x["context_mask"].at[1, 3:].set(0)}
    config = complete({"model": {"family": family}, "train": {"steps": 10},
                       "optim": {"lr": 1e-3}, "diffusion": {"objective": OBJECTIVE[family]}})
    return module, batch, config


@pytest.mark.parametrize("family", ["latte", "sana_video"])
def test_a_video_batch_trains_and_every_frame_counts(family):
    module, batch, config = tiny_video(family)
    assert batch["images"].ndim == 5 and batch["images"].shape[1] == 4  # (B, T, H, W, C)
    null = (jnp.zeros((1, 5, 16)), jnp.ones((1, 5), jnp.int32))
    tx = optax.adam(1e-3)
    state = init_state(module, tx, 0)
    config["train"]["accumulate"] = 2  # micro-batches split the batch axis of 5-D latents
    step = jax.jit(make_train_step(module, tx, lambda s: 1e-3, config, null))
    new, metrics = step(state, batch)
    assert bool(metrics["finite"]) and float(metrics["loss"]) > 0
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.any(a != b), new.params, state.params))
    assert any(bool(m) for m in moved)
    # the loss is a mean over every frame: changing only the last frame changes it (after a
    # step: at init the zero output layer makes a DDPM loss blind to x0)
    loss_fn = jax.jit(make_loss_fn(module, config["diffusion"], 0.0, null))
    rng = jax.random.key(3)
    last = {**batch, "images": batch["images"].at[:, -1].add(1.0)}
    assert float(loss_fn(new.params, batch, rng)) != float(loss_fn(new.params, last, rng))
