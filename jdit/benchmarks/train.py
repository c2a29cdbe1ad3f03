"""``jdit bench train``: one training step (forward, backward, AdamW) of the PixArt benchmark
model, jdit against diffusers + torch, same weights, same batch, each library in its own process.

The parent builds the model in diffusers with random weights, saves it and the batch to files,
then starts ``repeats`` worker processes per library, alternating (:mod:`jdit.benchmarks.
train_worker`): each loads the files, takes one step (jdit compiles), times ``steps`` more, and
measures its library's float32 matmul ceiling. The loss is the MSE of the ε channels against a
fixed target; every run's first loss must agree with diffusers' before any figure is reported.
Figures: medians over runs of each run's median step; peak memory per library.
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

from jdit.benchmarks.forward import CONFIG, forward_flops
from jdit.benchmarks.isolated import run_worker

WORKER = "jdit.benchmarks.train_worker"


def write_inputs(folder: Path, c: dict[str, int]) -> Path:
    """The random diffusers model (``folder/model``) and batch (``folder/inputs.npz``)."""
    try:
        import torch
        from diffusers import PixArtTransformer2DModel
    except ImportError as e:
        raise RuntimeError("jdit bench train compares against diffusers: "
                           "pip install 'jdit[test]'") from e
    ref = PixArtTransformer2DModel(
        num_attention_heads=c["heads"], attention_head_dim=c["width"] // c["heads"],
        in_channels=c["channels"], out_channels=2 * c["channels"], num_layers=c["depth"],
        cross_attention_dim=c["width"], sample_size=c["latent"], patch_size=c["patch"],
        caption_channels=c["caption_channels"], use_additional_conditions=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    ref.save_pretrained(folder / "model")
    b, ch, s = c["batch"], c["channels"], c["latent"]
    rng = np.random.default_rng(0)
    inputs = folder / "inputs.npz"
    np.savez(inputs, x=rng.standard_normal((b, ch, s, s), np.float32),
             context=rng.standard_normal((b, c["caption_tokens"], c["caption_channels"]),
                                         np.float32),
             t=np.linspace(10.0, 999.0, b, dtype=np.float32),
             target=rng.standard_normal((b, ch, s, s), np.float32))
    return inputs


def run(repeats: int = 5, steps: int = 3, threads: int = 2, config: dict[str, int] | None = None,
        jdit_env: dict[str, str] | None = None, log: Callable[[str], None] | None = None
        ) -> dict[str, Any]:
    """``jdit_env``: extra environment of the jdit workers (e.g. ``XLA_FLAGS`` to try)."""
    log = log or (lambda s: print(s, file=sys.stderr))
    c = dict(CONFIG, **(config or {}))
    runs: dict[str, list[dict[str, Any]]] = {"diffusers": [], "jdit": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        log("building the diffusers model with random weights ...")
        inputs = write_inputs(folder, c)
        for r in range(repeats):
            # alternate which library goes first, so neither always follows the other
            order = ("diffusers", "jdit") if r % 2 == 0 else ("jdit", "diffusers")
            for lib in order:
                log(f"run {r + 1}/{repeats}: {lib} in its own process ...")
                runs[lib].append(run_worker(WORKER, [lib, folder / "model", inputs, steps,
                                                     threads],
                                            env=jdit_env if lib == "jdit" else None))
    ref_loss = runs["diffusers"][0]["first_loss"]
    losses = [r["first_loss"] for rs in runs.values() for r in rs]
    err = max(abs(v - ref_loss) / abs(ref_loss) for v in losses)
    if err > 1e-4:
        raise RuntimeError(f"jdit and diffusers first losses disagree: {losses}")
    med = {lib: statistics.median(r["median_s"] for r in rs) for lib, rs in runs.items()}
    flops = 3 * forward_flops(c)  # forward + backward ≈ 3 forwards

    def across(lib: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[lib])

    return {"benchmark": "train", "config": c, "threads": threads, "repeats": repeats,
            "steps_per_run": steps, "jdit_env": jdit_env or {}, "first_loss_rel_err": err,
            "diffusers_s": med["diffusers"], "jdit_s": med["jdit"],
            "speedup": med["diffusers"] / med["jdit"],
            "diffusers_gflops": flops / med["diffusers"] / 1e9,
            "jdit_gflops": flops / med["jdit"] / 1e9,
            "jax_matmul_gflops": across("jdit", "matmul_gflops"),
            "torch_matmul_gflops": across("diffusers", "matmul_gflops"),
            "jdit_compile_s": across("jdit", "compile_s"),
            "setup_s": {lib: across(lib, "setup_s") for lib in runs},
            "peak_rss_mb": {lib: max(r["peak_rss_mb"] for r in runs[lib]) for lib in runs},
            "diffusers_s_all": [r["median_s"] for r in runs["diffusers"]],
            "jdit_s_all": [r["median_s"] for r in runs["jdit"]]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="worker processes per library")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--xla-flags", default=None,
                        help="XLA_FLAGS for the jdit workers (to try a flag; default: as set)")


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    env = {"XLA_FLAGS": args.xla_flags} if args.xla_flags is not None else None
    result = run(repeats=args.repeats, steps=args.steps, threads=args.threads, jdit_env=env)
    emit(result)
    print(f"diffusers {result['diffusers_s']:.2f} s, jdit {result['jdit_s']:.2f} s per training "
          f"step: jdit is {result['speedup']:.2f}x diffusers (matmul ceiling jax "
          f"{result['jax_matmul_gflops']:.0f} / torch {result['torch_matmul_gflops']:.0f} "
          f"GFLOP/s; peak memory jdit {result['peak_rss_mb']['jdit']:.0f} / diffusers "
          f"{result['peak_rss_mb']['diffusers']:.0f} MiB)", file=sys.stderr)
    return 0
