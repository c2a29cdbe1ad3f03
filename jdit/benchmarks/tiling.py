"""``jdit bench tiling``: a VAE decode whole, in blended tiles and in exact tiles.

On this CPU: a random SD-shaped VAE (4 levels, 8× upsampling, 2 ResNets per encoder level; the
widths scaled down), every weight moved off its initialisation by N(0, 0.05²) so no GroupNorm is
an identity, decoding the latents of a smooth random image; each way's time (medians, same run),
its largest difference from the untiled decode and XLA's temporary memory.

With ``topology``: the SDXL VAE (float32) decoding one 2K or 4K image compiled for one chip of
that TPU topology through libtpu: memory per chip untiled and tiled.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdit.autoencoders import AutoencoderKL, decode_tiled, decode_tiled_exact
from jdit.nn.init import abstract_params, init_params, perturbed

GiB = 2 ** 30


def _ways(vae: Any, tile: int, overlap: int) -> dict[str, Callable[[Any, jax.Array], jax.Array]]:
    return {
        "untiled": lambda p, z: vae.apply({"params": p}, z, method="decode"),
        "blended": lambda p, z: decode_tiled(vae, p, z, tile=tile, overlap=overlap),
        "exact": lambda p, z: decode_tiled_exact(vae, p, z, tile=tile),
        "exact_store_latent_only": lambda p, z: decode_tiled_exact(vae, p, z, tile=tile,
                                                                   store_levels=(1,)),
    }


def _smooth_latents(size: int, seed: int = 0) -> jax.Array:
    """Low-frequency latents (an image's are smooth, unlike white noise)."""
    coarse = jax.random.normal(jax.random.PRNGKey(seed), (1, size // 8 + 1, size // 8 + 1, 4))
    return jax.image.resize(coarse, (1, size, size, 4), "cubic")


def run(size: int = 64, widths: Sequence[int] = (32, 64, 128, 128), tile: int = 32,
        overlap: int = 8, repeats: int = 3, topology: str | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    log = log or (lambda s: print(s, file=sys.stderr))
    vae = AutoencoderKL(block_out_channels=tuple(widths), layers_per_block=2,
                        norm_num_groups=min(16, *widths))
    params = perturbed(init_params(vae, jax.random.PRNGKey(1)), jax.random.PRNGKey(2))
    z = _smooth_latents(size)
    out: dict[str, Any] = {"latents": list(z.shape), "image_px": size * vae.scale_factor,
                           "widths": list(widths), "tile": tile, "overlap": overlap, "ways": {}}
    fns, images = {}, {}
    for name, fn in _ways(vae, tile, overlap).items():
        compiled = jax.jit(fn).lower(params, z).compile()
        fns[name] = compiled
        images[name] = np.asarray(compiled(params, z))
        mem = compiled.memory_analysis()
        out["ways"][name] = {"temp_bytes": int(mem.temp_size_in_bytes) if mem else None}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):  # alternating, so a drifting load hits every way alike
        for name, compiled in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, z))
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["untiled"])
    for name, way in out["ways"].items():
        way["seconds"] = statistics.median(times[name])
        way["time_vs_untiled"] = way["seconds"] / base
        way["max_abs_diff_vs_untiled"] = float(np.abs(images[name] - images["untiled"]).max())
        log(f"{name}: {way['seconds']:.3f} s ({way['time_vs_untiled']:.2f}x untiled), "
            f"max |diff| {way['max_abs_diff_vs_untiled']:.2e}")
    out["output_range"] = [float(images["untiled"].min()), float(images["untiled"].max())]
    if topology:
        out["tpu"] = tpu_memory(topology, log=log)
    return out


def tpu_memory(topology: str, pixels: Sequence[int] = (2048, 4096), tile: int = 64,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """HBM per chip of one SDXL VAE decode (float32, batch 1) on one chip of ``topology``."""
    from jdit.aot.pipeline import SDXL_VAE
    from jdit.aot.roofline import analyse, oom_figures, topology_devices

    log = log or (lambda s: print(s, file=sys.stderr))
    device = topology_devices(topology)[0]
    vae = AutoencoderKL(**SDXL_VAE)
    params = abstract_params(vae)
    sharding = jax.sharding.SingleDeviceSharding(device)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          params)
    result: dict[str, Any] = {"topology": topology, "chip": device.device_kind}
    for px in pixels:
        z = jax.ShapeDtypeStruct((1, px // 8, px // 8, 4), jnp.float32, sharding=sharding)
        for name, fn in _ways(vae, tile, tile // 4).items():
            t0 = time.perf_counter()
            try:
                compiled = jax.jit(fn).lower(params, z).compile()
                figures = analyse(compiled, device)
                row = {"hbm_gib": figures["hbm_per_device_bytes"] / GiB, "fits": figures["fits"],
                       "roofline_seconds": figures["roofline_step_seconds"]}
            except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory verdict
                if "memory" not in str(e).lower():
                    raise
                oom = oom_figures(str(e), device)
                needed = oom["hbm_per_device_bytes"]
                row = {"hbm_gib": needed / GiB if needed else None, "fits": False}
            row["compile_seconds"] = time.perf_counter() - t0
            result[f"{px}px/{name}"] = row
            log(f"{px} px {name}: {row}")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=64, help="latent side (CPU part)")
    parser.add_argument("--tile", type=int, default=32)
    parser.add_argument("--overlap", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--topology", default=None,
                        help="also compile the SDXL VAE at 2K / 4K for one chip, e.g. v5e:1x1")


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    emit(run(args.size, tile=args.tile, overlap=args.overlap, repeats=args.repeats,
             topology=args.topology))
    return 0
