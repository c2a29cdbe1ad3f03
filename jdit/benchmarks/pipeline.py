"""``jdit bench pipeline``: text-to-image generation time, jdit vs diffusers, each library in its
own process.

A small random PixArt-Σ pipeline (:mod:`jdit.testing.tiny_pipelines`: T5 encoder, PixArt
transformer, 8× VAE; 256 px images) generates the same prompts from the same latents with
20 DPM-Solver++ steps and classifier-free guidance on both sides: diffusers + torch (eager, as
a user runs it) and jdit's ``TextToImage`` (one compiled program; the compile is reported apart
and excluded from the timing). ``runs`` worker processes per library, alternating
(:mod:`jdit.benchmarks.pipeline_worker`), each timing ``calls`` calls after a warm-up; figures
are medians over runs of each run's median. The images must agree.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jdit.benchmarks.isolated import run_worker

PROMPTS = ["a small cactus with a happy face in the desert", "a red fox in a snowy forest"]
WORKER = "jdit.benchmarks.pipeline_worker"
PARTS = ("t5", "step", "vae_decode")


def run(repeats: int = 5, num_steps: int = 20, width: int = 64, batch: int = 2,
        runs: int = 3, threads: int = 2, jdit_env: dict[str, str] | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``repeats`` timed calls in each of ``runs`` processes per library; ``jdit_env``: extra
    environment of the jdit workers (e.g. ``XLA_FLAGS`` to try)."""
    import torch

    from jdit.testing import tiny_pipelines

    log = log or (lambda s: print(s, file=sys.stderr))
    prompts = (PROMPTS * batch)[:batch]
    results: dict[str, list[dict[str, Any]]] = {"diffusers": [], "jdit": []}
    images: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pipe"
        log("building a random PixArt-Σ pipeline ...")
        reference = tiny_pipelines.text_to_image(folder, "sigma", width=width)
        latent = int(reference.transformer.config.sample_size)
        size = latent * reference.vae_scale_factor
        nchw = torch.randn((batch, 4, latent, latent),
                           generator=torch.Generator().manual_seed(0)).numpy()
        inputs = Path(tmp) / "inputs.npz"
        np.savez(inputs, prompts=np.array(prompts), latents=nchw, steps=num_steps,
                 guidance_scale=4.5, max_sequence_length=300)
        for r in range(runs):
            order = ("diffusers", "jdit") if r % 2 == 0 else ("jdit", "diffusers")
            for lib in order:
                log(f"run {r + 1}/{runs}: {lib} in its own process ...")
                out = Path(tmp) / f"{lib}.npz"
                results[lib].append(run_worker(WORKER, [lib, folder, inputs, repeats, out,
                                                        threads],
                                               env=jdit_env if lib == "jdit" else None))
                images[lib] = np.load(out)["images"]

    def across(lib: str, key: str) -> float:
        return statistics.median(r[key] for r in results[lib])

    jdit_s, diffusers_s = across("jdit", "median_s"), across("diffusers", "median_s")
    return {
        "benchmark": "pipeline",
        "pipeline": f"random PixArt-Σ (width {width}, 2 layers; T5 d_model 32; 8x VAE)",
        "image_size": size, "batch": batch, "num_steps": num_steps, "guidance_scale": 4.5,
        "runs": runs, "repeats": repeats, "threads": threads, "jdit_env": jdit_env or {},
        "jdit_s": jdit_s, "diffusers_s": diffusers_s, "speedup": diffusers_s / jdit_s,
        "jdit_compile_s": across("jdit", "compile_s"),
        "setup_s": {lib: across(lib, "setup_s") for lib in results},
        "peak_rss_mb": {lib: max(r["peak_rss_mb"] for r in results[lib]) for lib in results},
        "max_abs_image_difference": float(np.abs(images["jdit"] - images["diffusers"]).max()),
        "components_s": {lib: {part: statistics.median(r["components_s"][part]
                                                       for r in results[lib])
                               for part in PARTS} for lib in results},
        "jdit_all_s": [r["median_s"] for r in results["jdit"]],
        "diffusers_all_s": [r["median_s"] for r in results["diffusers"]],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per process")
    parser.add_argument("--runs", type=int, default=3, help="worker processes per library")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=64, help="the random transformer's width")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--xla-flags", default=None,
                        help="XLA_FLAGS for the jdit workers (to try a flag; default: as set)")


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    env = {"XLA_FLAGS": args.xla_flags} if args.xla_flags is not None else None
    result = run(repeats=args.repeats, num_steps=args.steps, width=args.width, runs=args.runs,
                 threads=args.threads, jdit_env=env)
    emit(result)
    print(f"{result['image_size']} px x {result['batch']}, {args.steps} steps + CFG: diffusers "
          f"{result['diffusers_s']:.3f} s, jdit {result['jdit_s']:.3f} s: jdit is "
          f"{result['speedup']:.2f}x diffusers (compile {result['jdit_compile_s']:.1f} s; images "
          f"differ by {result['max_abs_image_difference']:.1e}; peak memory jdit "
          f"{result['peak_rss_mb']['jdit']:.0f} / diffusers "
          f"{result['peak_rss_mb']['diffusers']:.0f} MiB)", file=sys.stderr)
    for part in PARTS:
        ours, theirs = (result["components_s"][k][part] for k in ("jdit", "diffusers"))
        print(f"  {part:>10}: diffusers {theirs * 1e3:7.1f} ms, jdit {ours * 1e3:7.1f} ms",
              file=sys.stderr)
    return 0
