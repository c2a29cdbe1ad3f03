"""ARLON's training stages and long-video generation, small enough to read top to bottom.

1. the video DiT (rectified flow on short clips, the first frames given as known frames in part
   of the batch: :func:`video_flow_loss`), then frozen;
2. the latent VQ-VAE (:func:`jdit.autoencoders.vq.vq_loss`);
3. the AR prior on the tokens of whole long videos (:func:`jdit.models.ar_prior.ar_loss`);
4. the adapter and injections of :class:`jdit.models.arlon.ArlonDiT` with the DiT frozen: the
   same flow loss, the clip's coarse latent (its VQ reconstruction) as the plan, perturbed by
   :class:`jdit.train.uncertainty.UncertaintySampling` when enabled.

:func:`fit` is the one optimisation loop (AdamW, warm-up + cosine, a trainable mask for the
frozen parts); :func:`segment_denoiser` turns a (frame-conditioned) video DiT into the
``denoise`` of :func:`jdit.sampling.long_video.sample_long_video`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdit.diffusion.schedules import FlowSchedule
from jdit.diffusion.timesteps import sample_flow_sigmas
from jdit.sampling.guidance import ClassifierFreeGuidance
from jdit.sampling.long_video import condition_frames
from jdit.sampling.sample import sample

Array = jax.Array
Batch = Mapping[str, Array]
# apply(params, x_in (B, T, H, W, 2C+1), t (B,), context, context_mask, coarse or None) -> (..., C')
Apply = Callable[..., Array]


@dataclasses.dataclass
class Fitted:
    params: Any  # the exponential moving average when ``fit`` kept one
    losses: list[float]
    seconds: float


def fit(loss_fn: Callable[[Any, Batch, Array], Array], params: Any,
        make_batch: Callable[[int], Mapping[str, np.ndarray]], *, steps: int, lr: float,
        seed: int = 0, warmup: int = 50, trainable: Any = None, weight_decay: float = 0.0,
        grad_clip: float = 1.0, ema_decay: float = 0.0,
        revise: tuple[int, Callable[[Any, Batch, Array], Any]] | None = None,
        desc: str = "train", progress: bool = True) -> Fitted:
    """``steps`` AdamW steps of ``loss_fn(params, batch, rng)`` on ``make_batch(i)``.

    ``trainable``: a pytree of bools like ``params``; the others stay exactly as they are (no
    optimizer state is kept for them). ``ema_decay > 0``: the result is the exponential moving
    average of the parameters (what a short run samples best from). ``revise = (every, fn)``:
    every ``every`` steps the parameters become ``fn(params, batch, rng)`` (a VQ-VAE's dead-code
    restarts; :func:`jdit.autoencoders.vq.restart_dead_codes`)."""
    if steps < 1:
        raise ValueError(f"{desc}: steps must be >= 1, got {steps}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps // 2), steps, lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(schedule, b2=0.99, weight_decay=weight_decay))
    if trainable is not None:
        labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params: Any, opt_state: Any, ema: Any, batch: Batch, rng: Array
             ) -> tuple[Any, Any, Any, Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if ema_decay:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        return params, opt_state, ema, loss

    key, losses = jax.random.key(seed), []
    rows = range(steps)
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc=desc, unit="step", mininterval=2.0)
    revise_jit = jax.jit(revise[1]) if revise is not None else None
    params = jax.tree.map(jnp.array, params)  # donated below: the caller's tree stays intact
    ema = jax.tree.map(jnp.array, params) if ema_decay else {}
    start = time.perf_counter()
    for i in rows:
        batch = make_batch(i)
        params, opt_state, ema, loss = step(params, opt_state, ema, batch,
                                            jax.random.fold_in(key, i))
        if revise is not None and (i + 1) % revise[0] == 0 and i + 1 < steps:
            params = revise_jit(params, batch, jax.random.fold_in(key, steps + i))
        if i % 25 == 0 or i == steps - 1:
            losses.append(float(loss))
            if not np.isfinite(losses[-1]):
                raise FloatingPointError(f"{desc}: loss is {losses[-1]} at step {i}")
    return Fitted(ema if ema_decay else params, losses, time.perf_counter() - start)


def known_frames(rng: Array, batch: int, frames: int, context_frames: int, p_context: float
                 ) -> Array:
    """(B, T) mask: the first ``context_frames`` frames are known in a ``p_context`` share of
    the rows (a continuation), none in the others (a first segment)."""
    rows = jax.random.uniform(rng, (batch, 1)) < p_context
    first = jnp.arange(frames)[None, :] < context_frames
    return (rows & first).astype(jnp.float32)


def video_flow_loss(apply: Apply, *, shift: float, context_frames: int, p_context: float,
                    cond_dropout: float, null: tuple[np.ndarray, np.ndarray],
                    coarse_fn: Callable[[Batch, Array], Array] | None = None
                    ) -> Callable[[Any, Batch, Array], Array]:
    """Rectified-flow loss on clips ``batch["videos"]`` (B, T, H, W, C) with caption features
    ``context`` / ``context_mask``: velocity ``noise - x0`` predicted at σ ~ logit-normal
    (shifted), the model's input :func:`condition_frames`, the loss over the unknown frames
    only. Captions are replaced by the null caption in a ``cond_dropout`` share (for guidance).
    ``coarse_fn(batch, rng)``: the plan given to an :class:`ArlonDiT` (None: a plain DiT)."""
    schedule = FlowSchedule(shift=shift)
    null_ctx, null_mask = (jnp.asarray(a) for a in null)

    def loss_fn(params: Any, batch: Batch, rng: Array) -> Array:
        x0 = batch["videos"].astype(jnp.float32)
        b, f = x0.shape[:2]
        r_sigma, r_noise, r_mask, r_drop, r_plan = jax.random.split(rng, 5)
        sigma = schedule.shift_sigma(sample_flow_sigmas(r_sigma, b))
        noise = jax.random.normal(r_noise, x0.shape)
        x_t = schedule.add_noise(x0, noise, sigma)
        mask = known_frames(r_mask, b, f, context_frames, p_context)
        drop = (jax.random.uniform(r_drop, (b,)) < cond_dropout)[:, None]
        ctx = jnp.where(drop[..., None], null_ctx, batch["context"])
        cmask = jnp.where(drop, null_mask, batch["context_mask"])
        coarse = None if coarse_fn is None else coarse_fn(batch, r_plan)
        out = apply(params, condition_frames(x_t, x0, mask), sigma * 1000.0, ctx, cmask, coarse)
        err = jnp.square(out[..., :x0.shape[-1]] - (noise - x0)).mean(axis=(2, 3, 4))  # (B, T)
        free = 1.0 - mask
        return jnp.sum(err * free) / jnp.maximum(jnp.sum(free), 1.0)

    return loss_fn


def segment_denoiser(apply: Apply, *, num_steps: int, shift: float, solver: str = "dpm++2m"
                     ) -> Callable[..., Array]:
    """``denoise(key, known, mask, params, scale, context, context_mask, null_context,
    null_mask, coarse)`` for :func:`sample_long_video`: one segment sampled with classifier-free
    guidance (``scale``), the known frames given to the model on every step. ``coarse`` is the
    segment's plan for an :class:`ArlonDiT`, or an empty array for a plain DiT. Jitted: one
    compile for every segment of every video."""
    schedule = FlowSchedule(shift=shift)

    def model_fn(x2: Array, t2: Array, params: Any, known2: Array, mask2: Array, ctx2: Array,
                 cmask2: Array, coarse2: Array | None) -> Array:
        return apply(params, condition_frames(x2, known2, mask2), t2, ctx2, cmask2, coarse2)

    guided = ClassifierFreeGuidance(model_fn)

    @jax.jit
    def denoise(key: Array, known: Array, mask: Array, params: Any, scale: Array,
                context: Array, context_mask: Array, null_context: Array, null_mask: Array,
                coarse: Array) -> Array:
        b = known.shape[0]
        two = lambda a: jnp.concatenate([a, a])  # noqa: E731
        ctx2 = jnp.concatenate([jnp.broadcast_to(null_context, context.shape), context])
        cmask2 = jnp.concatenate([jnp.broadcast_to(null_mask, context_mask.shape), context_mask])
        plan = two(coarse) if coarse.size else None
        noise = jax.random.normal(key, known.shape)
        x = sample(guided, noise, solver=solver, num_steps=num_steps, schedule=schedule,
                   prediction="flow", args=(scale, params, two(known), two(mask), ctx2, cmask2,
                                            plan))
        keep = mask[:, :, None, None, None]
        return jnp.where(keep > 0, known, x[:b])

    return denoise
