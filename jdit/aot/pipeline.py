"""AOT report for a whole text-to-image pipeline on a TPU topology: T5 → sampler → VAE.

    jdit aot --pipeline pixart_sigma_1024 --topology v5e:2x4 [--batch N | --max-batch]

The published PixArt-Σ 1024 pipeline at its real sizes (T5 v1.1 XXL encoder, 4.7B; PixArt-Σ
XL/2, 0.6B; SDXL VAE decoder, float32) with random abstract weights: every parameter is sharded
by its logical names with the FSDP rule table (so T5-XXL is spread over the chips rather than
copied to each), the batch over the mesh's data axes. Memory comes from compiling the whole
program (encode → 20 guided steps → decode) as one; costs from compiling its three parts
apart (XLA counts a loop body once): ``encode + steps × step + decode``. Images/s is the
global batch over that roofline time. :data:`T5_XXL` and :data:`SDXL_VAE` are also the sizes of
the caching program of :mod:`jdit.aot.cache`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jdit.aot.roofline import GiB, analyse, topology_devices
from jdit.models.registry import PIPELINE_FACTS

_SIGMA_1024 = PIPELINE_FACTS["pixart_sigma_xl2_1024"]
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
              num_heads=64, feed_forward_proj="gated-gelu")
# the SDXL VAE's architecture; its latent scale from the preset's pipeline facts
SDXL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                latent_channels=4, scaling_factor=_SIGMA_1024["latent_scale"],
                sample_size=_SIGMA_1024["resolution"])
AOT_PIPELINES: dict[str, dict[str, Any]] = {
    "pixart_sigma_1024": dict(transformer="pixart_sigma_xl2_1024", t5=T5_XXL, vae=SDXL_VAE,
                              resolution=_SIGMA_1024["resolution"],
                              caption_length=_SIGMA_1024["caption_length"], steps=20),
    # a few-second compile that walks the same code (tests)
    "tiny": dict(transformer=dict(family="pixart", input_size=8, patch_size=2, in_channels=4,
                                  hidden_size=64, depth=2, num_heads=4, caption_channels=32),
                 t5=dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
                 vae=dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
                 resolution=16, caption_length=16, steps=4),
}


def _modules(name: str) -> tuple[Any, Any, Any, dict[str, Any]]:
    from jdit.autoencoders import AutoencoderKL
    from jdit.models import build, preset
    from jdit.text import T5Encoder

    if name not in AOT_PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; known: {sorted(AOT_PIPELINES)}")
    spec = AOT_PIPELINES[name]
    tr = spec["transformer"]
    fields = dict(preset(tr)) if isinstance(tr, str) else dict(tr)
    fields.update(dtype="bfloat16", param_dtype="bfloat16", attention_impl="pallas",
                  scan_layers=False)
    transformer = build(fields)
    t5 = T5Encoder(**spec["t5"], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    vae = AutoencoderKL(**spec["vae"])  # float32, as diffusers runs the SDXL VAE
    return transformer, t5, vae, spec


def report(topology: str, per_device_batch: int = 1, pipeline: str = "pixart_sigma_1024",
           mesh: dict[str, int] | None = None, control: str | None = None,
           condition_resolution: int | None = None) -> dict[str, Any]:
    """``control``: one EasyControl condition (a rank-16 condition LoRA on the attention) of
    ``condition_resolution`` px (default: half the image's), its latents an input of the
    program: ``"cached"`` runs its branch once before the sampler and carries the keys and
    values into it (as jdit samples), ``"uncached"`` runs the branch inside every guided
    forward (EasyControl without its cache)."""
    from jdit import control as easycontrol
    from jdit import lora
    from jdit.diffusion import DDPMSchedule
    from jdit.parallel.partition import Partitioner
    from jdit.sampling import ClassifierFreeGuidance, sample

    if control not in (None, "cached", "uncached"):
        raise ValueError(f"control must be None, 'cached' or 'uncached', got {control!r}")

    devices = topology_devices(topology)
    part = Partitioner.from_config({"mesh": mesh or {"data": 1, "fsdp": -1, "tensor": 1},
                                    "rules": "fsdp"}, devices)
    transformer, t5, vae, spec = _modules(pipeline)
    b = per_device_batch * part.batch_shards
    length, steps = spec["caption_length"], spec["steps"]
    side = spec["resolution"] // vae.scale_factor
    with part.activate():
        p_tr, p_t5, p_vae = (part.abstract_params(m) for m in (transformer, t5, vae))

    def batch(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=part.batch_sharding(len(shape)))

    ids = batch((b, length), jnp.int32)
    noise = batch((b, side, side, transformer.in_channels), jnp.float32)
    schedule = DDPMSchedule.linear()
    cond_px = condition_resolution or spec["resolution"] // 2
    cond = batch((b, cond_px // vae.scale_factor, cond_px // vae.scale_factor,
                  transformer.in_channels), jnp.bfloat16)
    p_ad: Any = {}
    if control:
        with part.activate():
            abstract = jax.eval_shape(lambda: easycontrol.init(
                p_tr, 16, jax.random.key(0), module=transformer))
            p_ad = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                abstract, lora.shardings(abstract, transformer, part))

    def branch(pt: Any, pad: Any, z: jax.Array) -> Any:
        return easycontrol.encode(transformer, pt, easycontrol.Condition(z, pad, 1.0))

    def denoise(x: jax.Array, t: jax.Array, params: Any, ctx: jax.Array, mask: jax.Array,
                *extra: Any):
        kw: dict[str, Any] = {}
        if control == "cached":
            kw["control"] = extra[0]
        elif control == "uncached":  # the branch in every forward, for every row
            pad, z = extra
            kw["control"] = branch(params, pad, jnp.concatenate([z, z]))
        return transformer.apply({"params": params}, x, t, context=ctx, context_mask=mask, **kw)

    guided = ClassifierFreeGuidance(denoise)

    def control_args(ptr: Any, pad: Any, z: jax.Array) -> tuple[Any, ...]:
        if control == "cached":
            return (easycontrol.repeat(branch(ptr, pad, z), 2),)
        return (pad, z) if control == "uncached" else ()

    def encode(p: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        return t5.apply({"params": p}, ids, mask).astype(jnp.bfloat16)

    def decode(p: Any, z: jax.Array) -> jax.Array:
        return vae.apply({"params": p}, z / vae.scaling_factor, method="decode")

    def whole(pt5, ptr, pvae, pad, ids, mask, nids, nmask, noise, z_cond):
        ctx = jnp.concatenate([encode(pt5, nids, nmask), encode(pt5, ids, mask)])
        mask2 = jnp.concatenate([nmask, mask])
        z = sample(guided, noise, solver="dpm++2m", num_steps=steps, schedule=schedule,
                   args=(jnp.float32(4.5), ptr, ctx, mask2, *control_args(ptr, pad, z_cond)))
        return decode(pvae, z)

    def step(ptr, x, ctx2, mask2, *extra):
        t = jnp.full((x.shape[0],), 500.0)
        return guided(x, t, jnp.float32(4.5), ptr, ctx2, mask2, *extra)

    ctx2 = batch((2 * b, length, t5.d_model), jnp.bfloat16)
    mask2 = batch((2 * b, length), jnp.int32)

    def step_extra(ptr: Any, pad: Any, z: Any) -> tuple[Any, ...]:
        """The step's control inputs: the cache's shapes (cached), or the LoRA and latents."""
        if control != "cached":
            return control_args(ptr, pad, z)
        cache = jax.eval_shape(control_args, ptr, pad, z)[0]
        axes = part.batch_axes  # (depth, batch, ...): the batch is the second axis
        lead = None if not axes else axes[0] if len(axes) == 1 else axes
        sh = part.sharding(PartitionSpec(None, lead, *([None] * (cache[0].ndim - 2))))
        return (tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh) for a in cache),)
    out: dict[str, Any] = {"pipeline": pipeline, "topology": topology, "devices": len(devices),
                           "mesh": {k: int(v) for k, v in part.mesh.shape.items()},
                           "per_device_batch": per_device_batch, "global_batch": b,
                           "num_steps": steps, "caption_length": length,
                           "resolution": spec["resolution"], "control": control}
    counts = {name: int(sum(math.prod(a.shape) for a in jax.tree.leaves(p)))
              for name, p in (("t5", p_t5), ("transformer", p_tr), ("vae", p_vae))}
    if control:
        counts["condition_lora"] = int(sum(math.prod(a.shape) for a in jax.tree.leaves(p_ad)))
        out["condition_resolution"] = cond_px
    out["parameters"] = counts
    t0 = time.perf_counter()
    with part.activate():
        try:
            compiled = jax.jit(whole).lower(p_t5, p_tr, p_vae, p_ad, ids, ids, ids, ids,
                                            noise, cond).compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            out.update(fits=False, error=str(e).splitlines()[0][:400],
                       compile_seconds=round(time.perf_counter() - t0, 1))
            return out
        whole_figures = analyse(compiled, devices[0])
        out["compile_seconds"] = round(time.perf_counter() - t0, 1)
        out.update({k: whole_figures[k] for k in ("chip", "hbm_per_device_bytes",
                                                  "hbm_capacity_bytes", "fits", "memory")})
        parts = {
            "encode": jax.jit(encode).lower(p_t5, batch((2 * b, length), jnp.int32),
                                            batch((2 * b, length), jnp.int32)).compile(),
            "step": jax.jit(step).lower(p_tr, noise, ctx2, mask2,
                                        *step_extra(p_tr, p_ad, cond)).compile(),
            "decode": jax.jit(decode).lower(p_vae, noise).compile(),
        }
    figures = {k: analyse(c, devices[0]) for k, c in parts.items()}
    repeat = {"encode": 1, "step": steps, "decode": 1}
    seconds = {k: figures[k]["roofline_step_seconds"] * repeat[k] for k in figures}
    total = sum(seconds.values())
    flops = sum(figures[k]["flops_per_step"] * repeat[k] for k in figures)
    out.update(
        roofline_seconds=seconds, roofline_total_seconds=total,
        bound_by={k: figures[k]["roofline_bound_by"] for k in figures},
        flops_per_batch=flops,
        mfu_bound=flops / (total * figures["step"]["peak_flops_per_device"]) if total else 0.0,
        images_per_second=b / total if total else 0.0,
        t5_parameter_bytes_per_device=_bytes_per_device(p_t5),
    )
    if control == "cached":
        cache = step_extra(p_tr, p_ad, cond)[0]
        out["cache_bytes_per_device"] = _bytes_per_device(cache)
    return out


def _bytes_per_device(params: Any) -> int:
    total = 0
    for leaf in jax.tree.leaves(params):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return int(total)


def max_batch(topology: str, pipeline: str = "pixart_sigma_1024", start: int = 1,
              limit: int = 64, **kwargs: Any) -> dict[str, Any]:
    """Double the per-device batch until the whole program no longer fits, then bisect."""
    import sys

    results: dict[int, dict[str, Any]] = {}

    def fits(n: int) -> bool:
        if n not in results:
            results[n] = report(topology, n, pipeline, **kwargs)
            r = results[n]
            need = r.get("hbm_per_device_bytes")
            print(f"  per-device batch {n}: {'?' if need is None else f'{need / GiB:.2f}'} GiB "
                  f"({'fits' if r.get('fits') else 'does not fit'})", file=sys.stderr, flush=True)
        return bool(results[n].get("fits"))

    lo, hi = 0, None
    n = start
    while n <= limit and fits(n):
        lo, n = n, n * 2
    hi = n
    while hi - lo > 1 and lo:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    if not lo:
        return {**results[start], "max_per_device_batch": 0}
    return {**results[lo], "max_per_device_batch": lo,
            "search": {k: bool(v.get("fits")) for k, v in sorted(results.items())}}
