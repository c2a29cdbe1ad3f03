"""Sampling from a trained run: classifier-free guidance with the task's null condition."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jdit import control
from jdit.config import section
from jdit.diffusion import FlowSchedule, make_schedule
from jdit.sampling import ClassifierFreeGuidance, sample


class ControlledParams(NamedTuple):
    """A control run's model: the frozen ``base`` and the condition LoRA ``adapters`` (with
    their ``scale``) that the condition branch uses (:mod:`jdit.control`). Several conditions
    at once: lists of adapters and scales, and ``conditions["condition"]`` a list of images in
    the same order. A ControlNet run: ``adapters`` holds the ControlNet's parameters."""

    base: Any
    adapters: Any
    scale: Any = 1.0


def make_generator(module: nn.Module, task: Any, config: Mapping[str, Any],
                   partitioner: Any = None, controlnet: nn.Module | None = None
                   ) -> Callable[..., np.ndarray]:
    """``generate(params, conditions, seed, guidance_scale=None, solver=None, num_steps=None,
    raw=False, hw=None)`` returns images in [-1, 1], NHWC (decoded by the task's ``to_images``
    when it samples latents; ``raw``: the samples in the model's own space; ``hw``: another
    (height, width) than the task's). Defaults come from the ``sample`` config section.

    With a :class:`~jdit.parallel.Partitioner` the noise is split over the mesh's batch axes
    (when they divide the number of images) and the sampler runs under its mesh and rules; the
    images come back whole on every process.

    A control run (``control.method``) takes ``conditions["condition"]`` (B, H, W, C) beside the
    text and :class:`ControlledParams`: the condition's cache is computed once, before the
    sampler's loop, and reused by every step and both halves of the guidance (with
    ``control.guess_mode``, by the conditional half only, as diffusers' ControlNet
    ``guess_mode``).
    """
    diffusion = section("diffusion", config["diffusion"])
    schedule = make_schedule(diffusion)
    prediction = "flow" if isinstance(schedule, FlowSchedule) else diffusion["prediction"]
    defaults = section("sample", config.get("sample"))
    height, width = getattr(task, "sample_hw", (task.size, task.size))
    channels = task.channels
    null = task.null()
    # a latent-space task turns samples into images (its VAE); pixels are clipped to [-1, 1]
    to_images = getattr(task, "to_images", None) or (lambda x: np.clip(x, -1.0, 1.0))

    control_cfg = section("control", config.get("control"))
    controlled = control_cfg["method"] != "none"
    guess_mode = bool(control_cfg["guess_mode"])
    if task.kind == "text":
        def model_fn(x2: jax.Array, t2: jax.Array, params: Any, ctx2: jax.Array,
                     mask2: jax.Array, *cache: Any) -> jax.Array:
            def run(sl: slice, **extra: Any) -> jax.Array:
                return module.apply({"params": params}, x2[sl], t2[sl], context=ctx2[sl],
                                    context_mask=mask2[sl], **extra)

            if not cache:
                return run(slice(None))
            b = x2.shape[0] // 2
            if controlnet is not None:  # (ControlNet params, condition, scale): every step
                from jdit.control.controlnet import residuals

                cn, cond, cn_scale = cache[0]

                def run_cn(sl: slice, z: jax.Array) -> jax.Array:
                    res = residuals(controlnet, cn, module, params, x2[sl], t2[sl], ctx2[sl],
                                    mask2[sl], z, cn_scale)
                    return run(sl, block_residuals=res)

                if not guess_mode:
                    return run_cn(slice(None), jnp.concatenate([cond, cond]))
                return jnp.concatenate([run(slice(0, b)), run_cn(slice(b, None), cond)])
            if not guess_mode:  # the condition in both halves of the guidance
                return run(slice(None), control=control.repeat(cache[0], 2))
            # guess mode: the unconditional half without the condition, so the guidance
            # pushes toward it (an empty prompt gives two equal halves otherwise)
            return jnp.concatenate([run(slice(0, b)), run(slice(b, None), control=cache[0])])
    else:
        def model_fn(x2: jax.Array, t2: jax.Array, params: Any, labels2: jax.Array) -> jax.Array:
            return module.apply({"params": params}, x2, t2, labels=labels2)

    guided = ClassifierFreeGuidance(model_fn)
    cache: dict[Any, Callable[..., jax.Array]] = {}
    staged: list[Any] = []  # the model in stages, built once (a step cache's sampler)
    # a step cache's counts, summed over calls (generate.cache_stats; see jdit.sampling.cache)
    cache_stats: dict[str, Any] = {"calls": 0, "blocks": 0, "blocks_uncached": 0, "skipped": 0}

    attend_each_other = bool(control_cfg["attend_each_other"])

    @jax.jit
    def condition_cache(base: Any, adapters: list[Any], scales: list[jax.Array],
                        latents: list[jax.Array]) -> Any:
        return control.encode(module, base, [control.Condition(z, a, s) for z, a, s in
                                             zip(latents, adapters, scales, strict=True)],
                              attend_each_other=attend_each_other)

    def _sharded_sampler(split: bool, num_args: int, key: jax.Array, **run: Any
                         ) -> Callable[..., jax.Array]:
        """The sampler jitted with explicit shardings: parameters by their logical names, the
        noise over the batch axes (``split``), conditions replicated, images out replicated."""
        sig = (split, num_args, tuple(sorted((k, str(v)) for k, v in run.items())))
        if sig not in cache:
            p = partitioner
            noise_sh = p.batch_sharding(4) if split else p.replicated

            def go(scale: jax.Array, params: Any, noise: jax.Array, key: jax.Array,
                   *cond: jax.Array) -> jax.Array:
                return sample(guided, noise, key=key, args=(scale, params) + cond, **run)

            cache[sig] = jax.jit(
                go, in_shardings=(p.replicated, p.param_shardings(module), noise_sh,
                                  p.replicated) + (p.replicated,) * num_args,
                out_shardings=p.replicated)
        jitted = cache[sig]
        return lambda scale, params, noise, *cond: jitted(scale, params, noise, key, *cond)

    def cached_sample(noise: jax.Array, args: tuple[Any, ...], step_cache: Any,
                      **run: Any) -> jax.Array:
        from jdit.sampling.cache import staged_text_model

        if task.kind != "text" or controlled or len(args) != 4:
            raise ValueError("a step cache samples text-conditioned runs without control")
        if not staged:
            staged.append(ClassifierFreeGuidance(staged_text_model(module)))
        out, stats = sample(staged[0], noise, args=args, cache=step_cache, **run)
        depth = int(module.depth)
        cache_stats["calls"] += int(stats["call"])
        cache_stats["blocks"] += int(stats["blocks"])
        cache_stats["blocks_uncached"] += int(stats["call"]) * depth
        cache_stats["skipped"] += int(stats["skipped"])
        if "changes" in stats:  # MeasureChanges: the last call's per-step changes
            cache_stats["changes"] = np.asarray(stats["changes"]).tolist()
        return out

    def generate(params: Any, conditions: Mapping[str, np.ndarray], seed: int,
                 guidance_scale: float | None = None, solver: str | None = None,
                 num_steps: int | None = None, raw: bool = False,
                 hw: tuple[int, int] | None = None, step_cache: Any = None) -> np.ndarray:
        """``step_cache``: a :mod:`jdit.sampling.cache` cache (text runs, one device); its
        counts add up in ``generate.cache_stats``."""
        finish = (lambda x: x) if raw else to_images
        if task.kind == "text":
            b = len(conditions["context"])
            args: tuple[Any, ...] = (
                jnp.concatenate([jnp.repeat(null["context"], b, 0), conditions["context"]]),
                jnp.concatenate([jnp.repeat(null["context_mask"], b, 0),
                                 conditions["context_mask"]]))
        else:
            labels = jnp.asarray(conditions["labels"], jnp.int32)
            b = len(labels)
            args = (jnp.concatenate([jnp.full((b,), module.num_classes, jnp.int32), labels]),)
        if "condition" in conditions:
            if not (controlled and isinstance(params, ControlledParams)):
                raise ValueError("conditions['condition'] needs a control run and its "
                                 "ControlledParams (base and condition LoRA)")
            if controlnet is not None:
                args += ((params.adapters, jnp.asarray(conditions["condition"], jnp.float32),
                          jnp.float32(params.scale)),)
                params = params.base
        if "condition" in conditions and controlnet is None:
            many = isinstance(params.adapters, list | tuple)
            adapters = list(params.adapters) if many else [params.adapters]
            scales = list(params.scale) if many else [params.scale]
            images = list(conditions["condition"]) if many else [conditions["condition"]]
            if not len(adapters) == len(scales) == len(images):
                raise ValueError(f"{len(images)} conditions for {len(adapters)} condition LoRAs "
                                 f"and {len(scales)} scales")
            args += (condition_cache(params.base, adapters, [jnp.float32(s) for s in scales],
                                     [jnp.asarray(z, jnp.float32) for z in images]),)
        if isinstance(params, ControlledParams):  # without a condition: the base model
            params = params.base
        scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        key = jax.random.PRNGKey(seed)
        h, w = (height, width) if hw is None else hw
        noise = jax.random.normal(key, (b, h, w, channels))
        run = dict(solver=solver or defaults["solver"],
                   num_steps=int(num_steps or defaults["steps"]), schedule=schedule,
                   prediction=prediction, key=jax.random.fold_in(key, 1))
        if step_cache is not None:
            out = cached_sample(noise, (jnp.float32(scale), params) + args, step_cache, **run)
            return finish(np.asarray(out))
        if partitioner is None:
            out = sample(guided, noise, args=(jnp.float32(scale), params) + args, **run)
            return finish(np.asarray(out))
        # Host values (numpy) are the same on every process: each places its own shards.
        split = b % partitioner.batch_shards == 0
        sampler = _sharded_sampler(split, len(args), **run)
        noise = np.asarray(noise)
        with partitioner.activate():
            out = sampler(jnp.float32(scale), params, noise,
                          *(jax.tree.map(np.asarray, a) for a in args))
        return finish(np.asarray(out.addressable_data(0)))

    generate.cache_stats = cache_stats  # type: ignore[attr-defined]
    return generate
