"""AOT report for the feature-caching program of ``jdit cache``: VAE encoder + T5 as one program.

    jdit aot --cache sdxl_t5xxl_1024 --topology v5e:2x4 [--batch N | --max-batch]   # planned
    python -m jdit.aot.cache sdxl_t5xxl_1024 --topology v5e:2x4 [--batch N | --max-batch]

``jdit cache`` encodes a dataset once: each image, resized to its aspect-ratio bucket, to the
VAE's posterior mean, each caption to T5 features. Compiled here for a TPU topology at the real
sizes with random abstract weights (nothing is allocated):

    encode(vae_encoder_params, t5_params, images (B, H, W, 3) float32 in [-1, 1],
           ids (B, L) int32, mask (B, L) int32)
        -> (latent mean (B, H/8, W/8, 4) float32, text features (B, L, d_model) bfloat16)

``sdxl_t5xxl_1024``: the SDXL VAE encoder in float32 (as diffusers runs it; 34M parameters) on
1024 × 1024 images (the square bucket of the 1024 table; the other buckets hold about as many
pixels) and the T5 v1.1 XXL encoder (4.76B) with bfloat16 parameters on 300 tokens, as
:mod:`jdit.aot.pipeline` builds them. Every parameter is placed by its logical names with the
FSDP rule table (T5-XXL split over the chips; the VAE's conv kernels stay whole on each), the
batch is split over the mesh's data axes (``data`` and ``fsdp``: every chip). ``tiny``: the same
code at toy sizes, compiled in seconds (tests).

The program has no loop (T5's blocks and the VAE's levels are unrolled), so XLA's cost analysis
of the one compiled program counts everything: its roofline (:func:`jdit.aot.roofline.analyse`,
``max(compute, HBM, ICI)`` per chip) is the time of one global batch. ``parts=True`` also
compiles the VAE encoder and T5 alone at the same batch and shardings: the reference the whole
program's figure is read against. One program lets T5's weight gathers (ICI) overlap the VAE's
convolutions, which the sum of the parts' rooflines does not; its HBM traffic is not quite the
sum of theirs either (other fusions and buffer placement: +4 % for ``sdxl_t5xxl_1024`` at one
image per chip), so ``whole_over_parts`` may land on either side of 1.

Once the batch is large enough, the TPU compiler turns T5's FSDP weight gathers into collective
matmuls (windowed einsums: a ``while`` loop around the ring), whose bodies XLA's cost analysis
counts once: the costs of such a program come from a recompile without them
(:func:`program_costs`; ``costs_from`` says so), its memory from the program as compiled.

Caveats of the figures: XLA's cost analysis counts bytes of the TPU compiler's async-collective
continuation fusions, which hand the gathered weights from piece to piece (T5's HBM bytes are
inflated by that, about 1.5x on a two-layer T5-XXL probe); the float32 VAE's convolutions are
counted at the bfloat16 peak (the MXU's default precision for float32 operands).

:func:`report` is what the command line calls; :func:`compile_report` compiles one batch,
:func:`find_max_batch` searches the largest per-chip batch that fits in HBM, and
:func:`format_report` is the summary printed on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jdit.aot.pipeline import SDXL_VAE, T5_XXL
from jdit.aot.roofline import (
    GiB,
    analyse,
    chip_of,
    loop_free_analysis,
    oom_figures,
    topology_devices,
)

# Real sizes, and a toy of the same code for tests. ``text_dtype``: what the program hands the
# cache writer (the pipeline's context dtype); latents are the VAE's float32 posterior mean.
CACHE_VARIANTS: dict[str, dict[str, Any]] = {
    "sdxl_t5xxl_1024": dict(vae=SDXL_VAE, t5=T5_XXL, resolution=1024, caption_length=300,
                            text_dtype="bfloat16"),
    "tiny": dict(vae=dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
                 t5=dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
                 resolution=32, caption_length=16, text_dtype="bfloat16"),
}
DEFAULT_VARIANT = "sdxl_t5xxl_1024"
DEFAULT_MESH = {"data": 1, "fsdp": -1, "tensor": 1}
ENCODER_PARAMS = ("enc_", "quant_conv")  # what AutoencoderKL.encode reads (no decoder)


def _modules(variant: str) -> tuple[Any, Any, dict[str, Any]]:
    from jdit.autoencoders import AutoencoderKL
    from jdit.text import T5Encoder

    if variant not in CACHE_VARIANTS:
        raise ValueError(f"unknown cache variant {variant!r}; known: {sorted(CACHE_VARIANTS)}")
    spec = CACHE_VARIANTS[variant]
    vae = AutoencoderKL(**spec["vae"])  # float32, as diffusers runs the SDXL VAE
    t5 = T5Encoder(**spec["t5"], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    return vae, t5, spec


def _count(params: Any) -> int:
    return int(sum(math.prod(a.shape) for a in jax.tree.leaves(params)))


def _bytes_per_device(params: Any) -> int:
    return int(sum(math.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in jax.tree.leaves(params)))


def _spec(sharding: Any) -> list[Any]:
    """A sharding's partition spec as JSON: one entry per dimension (mesh axes or None)."""
    return [list(a) if isinstance(a, tuple) else a for a in sharding.spec]


def compile_report(topology: str, per_device_batch: int = 1, variant: str = DEFAULT_VARIANT, *,
                   parts: bool = False, costs: bool = True,
                   mesh: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Compile the caching program for ``topology`` at ``per_device_batch`` images per batch
    shard and report memory per chip, costs, roofline and images/s (``parts``: also the VAE
    encoder and T5 compiled alone; ``costs=False``: memory only, one compile). A program the
    compiler finds too large for HBM is a report with ``fits=False``, not an error.

    Memory is that of the program as compiled. Costs are too, unless it holds ``while`` loops
    (XLA's cost analysis counts a loop body once): then they come from a recompile without
    the TPU compiler's windowed einsums (``costs_from`` says which)."""
    from jdit.parallel.partition import Partitioner

    if per_device_batch < 1:
        raise ValueError(f"per_device_batch must be at least 1, got {per_device_batch}")
    devices = topology_devices(topology)
    part = Partitioner.from_config({"mesh": dict(mesh or DEFAULT_MESH), "rules": "fsdp"}, devices)
    vae, t5, spec = _modules(variant)
    b = per_device_batch * part.batch_shards
    side, length = spec["resolution"], spec["caption_length"]
    text_dtype = jnp.dtype(spec["text_dtype"])
    with part.activate():
        p_vae = {k: v for k, v in part.abstract_params(vae).items()
                 if k.startswith(ENCODER_PARAMS)}
        p_t5 = part.abstract_params(t5)

    def batch(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=part.batch_sharding(len(shape)))

    images = batch((b, side, side, vae.in_channels), jnp.float32)
    ids, mask = batch((b, length), jnp.int32), batch((b, length), jnp.int32)

    def encode_images(p: Any, x: jax.Array) -> jax.Array:
        return vae.apply({"params": p}, x, method="encode")

    def encode_text(p: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        return t5.apply({"params": p}, ids, mask).astype(text_dtype)

    def encode(pv: Any, pt: Any, x: jax.Array, ids: jax.Array, mask: jax.Array):
        return encode_images(pv, x), encode_text(pt, ids, mask)

    device = devices[0]
    chip, fraction = chip_of(device)
    chips = len(devices) * fraction
    chips = int(chips) if float(chips).is_integer() else chips
    out: dict[str, Any] = {
        "variant": variant, "topology": topology, "devices": len(devices), "chips": chips,
        "device_kind": device.device_kind,
        "mesh": {k: int(v) for k, v in part.mesh.shape.items()}, "rules": "fsdp",
        "batch_axes": list(part.batch_axes), "per_device_batch": per_device_batch,
        "global_batch": b, "resolution": side, "caption_length": length,
        "inputs": {"images": [b, side, side, vae.in_channels], "ids": [b, length],
                   "mask": [b, length]},
        "outputs": {"latent_mean": [b, side // vae.scale_factor, side // vae.scale_factor,
                                    vae.latent_channels],
                    "text_features": [b, length, t5.d_model]},
        "dtypes": {"vae": "float32", "t5_params": "bfloat16", "t5_compute": "bfloat16",
                   "latent_mean": "float32", "text_features": text_dtype.name},
        "parameters": {"vae_encoder": _count(p_vae), "t5": _count(p_t5)},
        "parameter_bytes_per_device": {"vae_encoder": _bytes_per_device(p_vae),
                                       "t5": _bytes_per_device(p_t5)},
    }
    t0 = time.perf_counter()
    with part.activate():
        lowered = jax.jit(encode).lower(p_vae, p_t5, images, ids, mask)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            out.update(fits=False, **oom_figures(str(e), device),
                       error=str(e).splitlines()[0][:500],
                       compile_seconds=round(time.perf_counter() - t0, 1))
            return out
        out["compile_seconds"] = round(time.perf_counter() - t0, 1)
        memory = analyse(compiled, device)
        out.update({k: memory[k] for k in ("chip", "hbm_per_device_bytes", "hbm_capacity_bytes",
                                           "fits", "memory")})
        ins, _ = compiled.input_shardings
        outs = compiled.output_shardings
        out["shardings"] = {
            "images": _spec(ins[2]), "ids": _spec(ins[3]), "mask": _spec(ins[4]),
            "latent_mean": _spec(outs[0]), "text_features": _spec(outs[1]),
            "images_per_device": list(ins[2].shard_shape(images.shape)),
            "latent_mean_per_device": list(
                outs[0].shard_shape(tuple(out["outputs"]["latent_mean"]))),
            "text_features_per_device": list(
                outs[1].shard_shape(tuple(out["outputs"]["text_features"]))),
        }
        if not costs:
            return out
        out.update(program_costs(lowered, compiled, device, b, chips))
        if parts:
            out["parts"] = {
                "vae": program_costs(jax.jit(encode_images).lower(p_vae, images), None, device, b,
                              chips),
                "t5": program_costs(jax.jit(encode_text).lower(p_t5, ids, mask), None, device, b,
                             chips)}
    if parts:
        both = sum(p["roofline_total_seconds"] for p in out["parts"].values())
        out["parts_total_seconds"] = both
        out["whole_over_parts"] = out["roofline_total_seconds"] / both if both else 0.0
    return out


def program_costs(lowered: Any, compiled: Any | None, device: Any, batch: int,
           chips: float) -> dict[str, Any]:
    """Costs and roofline of a program; if the compiled program loops (the TPU compiler turns
    FSDP weight gathers into collective matmuls, a loop over the ring, once the batch is large
    enough), from a recompile without those loops instead: the same products, the same weights
    over the ICI, every step counted."""
    compiled = lowered.compile() if compiled is None else compiled
    figures, loops, costs_from = loop_free_analysis(lowered, compiled, device)
    seconds = figures["roofline_step_seconds"]
    return {
        "while_loops": loops, "costs_from": costs_from,
        "hbm_per_device_bytes": figures["hbm_per_device_bytes"],
        "flops_per_batch": figures["flops_per_step"], "bytes_per_batch": figures["bytes_per_step"],
        "collective_bytes_per_batch": figures["collective_bytes_per_step"],
        "roofline_seconds": figures["roofline_seconds"], "roofline_total_seconds": seconds,
        "bound_by": figures["roofline_bound_by"], "mfu_bound": figures["roofline_mfu_bound"],
        "images_per_second": batch / seconds if seconds else 0.0,
        "images_per_second_per_chip": batch / seconds / chips if seconds else 0.0,
    }


def largest_fitting(measure: Callable[[int], Mapping[str, Any]], *, start: int = 1,
                    limit: int = 256) -> tuple[int, list[int]]:
    """The largest batch ``n <= limit`` for which ``measure(n)["fits"]``, and the batches
    measured in order. Memory is about linear in the batch: two fitting measures predict the
    answer, which the measures next to it confirm (a handful of compiles); bisection finishes
    what the prediction leaves open. 0 if not even 1 fits."""
    tried: list[int] = []
    seen: dict[int, Mapping[str, Any]] = {}

    def fits(n: int) -> bool:
        if n not in seen:
            seen[n] = measure(n)
            tried.append(n)
        return bool(seen[n]["fits"])

    n = max(1, min(start, limit))
    while not fits(n):
        if n == 1:
            return 0, tried
        n //= 2
    lo, hi = n, None  # lo fits; hi, once known, does not
    if lo < limit:
        n2 = min(2 * lo, limit)
        if not fits(n2):
            hi = n2
        else:
            h1, h2 = seen[lo]["hbm_per_device_bytes"], seen[n2]["hbm_per_device_bytes"]
            cap = seen[lo]["hbm_capacity_bytes"]
            slope = (h2 - h1) / (n2 - lo)
            guess = limit if slope <= 0 else lo + int((cap - h1) // slope)
            lo, guess = n2, max(n2, min(guess, limit))
            if guess > lo and not fits(guess):
                hi = guess
                if fits(guess - 1):  # the prediction was one too many
                    lo = guess - 1
            else:
                lo = guess
                step = 1
                while hi is None and lo + step <= limit:  # gallop upwards until one fails
                    if fits(lo + step):
                        lo, step = lo + step, step * 2
                    else:
                        hi = lo + step
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, tried


def find_max_batch(topology: str, variant: str = DEFAULT_VARIANT, *, start: int = 1,
                   limit: int = 256, parts: bool = True, mesh: Mapping[str, int] | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The largest per-device batch whose caching program fits in HBM: its report (costs and,
    if asked, the parts: compiled once more, at the answer; the search compiles for memory
    only), ``max_per_device_batch`` and ``search`` (every batch compiled: fits or not, bytes
    per chip). Raises ValueError if batch 1 does not fit."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    results: dict[int, dict[str, Any]] = {}

    def measure(n: int) -> dict[str, Any]:
        r = results[n] = compile_report(topology, n, variant, costs=False, mesh=mesh)
        need = r.get("hbm_per_device_bytes")
        log(f"  per-device batch {n}: {'?' if need is None else f'{need / GiB:.2f}'} GiB "
            f"({'fits' if r['fits'] else 'does not fit'}; compiled in "
            f"{r.get('compile_seconds', 0):.0f} s)")
        return r

    best, tried = largest_fitting(measure, start=start, limit=limit)
    search = [{"per_device_batch": n, "fits": bool(results[n]["fits"]),
               "hbm_per_device_bytes": results[n].get("hbm_per_device_bytes")} for n in tried]
    if not best:
        need = results[1].get("hbm_per_device_bytes")
        raise ValueError(f"the {variant} caching program does not fit on {topology} even at one "
                         "image per device" + ("" if need is None else f": {need / GiB:.1f} "
                                                f"GiB per chip needed"))
    final = compile_report(topology, best, variant, parts=parts, mesh=mesh)  # now the costs
    return {**final, "max_per_device_batch": best, "search": search}


def report(topology: str, batch: int | None = None, max_batch: bool = False,
           variant: str = DEFAULT_VARIANT, *, parts: bool = True,
           mesh: Mapping[str, int] | None = None) -> dict[str, Any]:
    """What ``jdit aot --cache VARIANT --topology T [--batch N | --max-batch]`` reports.

    ``batch``: images per device (default 1); with ``max_batch``, where the search starts.
    ``parts``: also compile the VAE encoder and T5 alone (the reference figures)."""
    if max_batch:
        return find_max_batch(topology, variant, start=batch or 1, parts=parts, mesh=mesh)
    return compile_report(topology, batch or 1, variant, parts=parts, mesh=mesh)


def format_report(r: Mapping[str, Any]) -> str:
    """A few lines for people: memory per chip against HBM, roofline, images/s per chip."""
    head = (f"{r['variant']} on {r['topology']} ({r['devices']} devices, mesh "
            f"{r['mesh']}): per-device batch {r['per_device_batch']} (global "
            f"{r['global_batch']})")
    need, cap = r.get("hbm_per_device_bytes"), r["hbm_capacity_bytes"]
    mem = f"{'?' if need is None else f'{need / GiB:.2f}'} of {cap / GiB:.1f} GiB per chip"
    if not r["fits"]:
        return f"{head}\n  does NOT fit: {mem}" + (f" ({r['error']})" if "error" in r else "")
    lines = [head, f"  fits: {mem}" + (f"; largest per-device batch that fits: "
                                       f"{r['max_per_device_batch']}"
                                       if "max_per_device_batch" in r else "")]
    t = r["roofline_seconds"]
    lines.append(f"  roofline {r['roofline_total_seconds'] * 1e3:.1f} ms per batch "
                 f"({r['bound_by']}-bound: compute {t['compute'] * 1e3:.1f}, HBM "
                 f"{t['hbm'] * 1e3:.1f}, ICI {t['ici'] * 1e3:.1f} ms) = "
                 f"{r['images_per_second_per_chip']:.2f} images/s per chip, "
                 f"{r['images_per_second']:.1f} images/s in all")
    if r["costs_from"] != "as compiled":
        lines.append(f"  costs: {r['costs_from']} ({r['while_loops']} loops as compiled)")
    for name, p in r.get("parts", {}).items():
        lines.append(f"  {name} alone: {p['roofline_total_seconds'] * 1e3:.1f} ms "
                     f"({p['bound_by']}-bound) = {p['images_per_second_per_chip']:.2f} "
                     f"images/s per chip" + ("" if p["costs_from"] == "as compiled" else
                                             f"; costs {p['costs_from']}"))
    if "whole_over_parts" in r:
        lines.append(f"  whole program / (VAE + T5 alone): {r['whole_over_parts']:.2f}")
    lines.append(f"  T5 weights {r['parameter_bytes_per_device']['t5'] / GiB:.2f} GiB per chip; "
                 f"compiled in {r['compile_seconds']:.0f} s")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, *, standalone: bool = False) -> None:
    """``--cache VARIANT`` for ``jdit aot`` (whose ``--topology``, ``--batch``, ``--max-batch``,
    ``--mesh`` and ``--json`` :func:`run` also reads); ``standalone``: those too, for
    ``python -m jdit.aot.cache``."""
    if standalone:
        parser.add_argument("cache", nargs="?", default=DEFAULT_VARIANT,
                            choices=sorted(CACHE_VARIANTS), help="the caching program")
        parser.add_argument("--topology", required=True, help="e.g. v5e:2x4, v5p:2x2x2")
        parser.add_argument("--batch", type=int, default=None,
                            help="images per device (with --max-batch: where the search starts)")
        parser.add_argument("--max-batch", action="store_true",
                            help="search the largest per-device batch that fits in HBM")
        parser.add_argument("--json", default=None, help="also write the report to this file")
    else:
        parser.add_argument("--cache", default=None, choices=sorted(CACHE_VARIANTS),
                            help="instead: the `jdit cache` program (VAE encoder + T5, e.g. "
                                 "SDXL VAE at 1024 px + T5-XXL at 300 tokens)")


def run(args: argparse.Namespace) -> int:
    """Compile, print the JSON report on stdout and a summary on stderr; exit status 1 when the
    asked batch does not fit."""
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"--batch must be a positive integer, got {args.batch}")
    print(f"compiling the {args.cache} caching program for {args.topology} ...", file=sys.stderr)
    try:
        result = report(args.topology, args.batch, args.max_batch, args.cache,
                        mesh=getattr(args, "mesh", None))
    except ValueError as e:
        print(f"{args.topology}: {e}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(format_report(result), file=sys.stderr)
    return 0 if result["fits"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jdit.aot.cache", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, standalone=True)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
