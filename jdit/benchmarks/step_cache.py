"""``jdit bench step-cache``: wall clock of the step caches on this CPU (jdit.sampling.cache).

A random PixArt-Σ-like model with 12 blocks (width 768, 32×32 latents, patch 2: 256 tokens;
the forward benchmark's) samples 20 dpm++2m steps with classifier-free guidance, uncached and
with each cache, all compiled beforehand and timed alternately in one process (medians of
``repeats``). Random weights make the first block's residual change at random, so the block
caches here run fixed schedules: ``StaticCache`` reusing every other call (the most a
never-twice-in-a-row schedule skips) and ``GuidanceCache(2)``; the adaptive
``FirstBlockCache`` is measured for adherence on a trained model (BENCHMARKS.md). The figure
is the ratio of blocks run and of seconds against the uncached sampler.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jdit.benchmarks.forward import CONFIG
from jdit.diffusion import DDPMSchedule
from jdit.models import build, init_params
from jdit.sampling import ClassifierFreeGuidance, sample
from jdit.sampling.cache import GuidanceCache, StaticCache, staged_text_model


def run(repeats: int = 3, num_steps: int = 20, batch: int = 2,
        config: dict[str, int] | None = None, log: Callable[[str], None] | None = None
        ) -> dict[str, Any]:
    """``config``: overrides of the model and input sizes (:data:`CONFIG`; tests shrink it)."""
    log = log or (lambda s: print(s, file=sys.stderr))
    c = dict(CONFIG, batch=batch, **(config or {}))
    module = build("pixart", input_size=c["latent"], patch_size=c["patch"],
                   in_channels=c["channels"], hidden_size=c["width"], depth=c["depth"],
                   num_heads=c["heads"], caption_channels=c["caption_channels"],
                   learn_sigma=False)
    params = init_params(module, jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 3)
    b = c["batch"]
    ctx2 = jax.random.normal(keys[0], (2 * b, c["caption_tokens"], c["caption_channels"]))
    mask2 = jnp.ones((2 * b, c["caption_tokens"]), jnp.int32)
    noise = jax.random.normal(keys[1], (b, c["latent"], c["latent"], c["channels"]))
    guided = ClassifierFreeGuidance(staged_text_model(module))
    schedule = DDPMSchedule.linear()
    alternate = tuple(i % 2 == 1 for i in range(num_steps))
    caches: dict[str, Any] = {"uncached": None, "static_alternate": StaticCache(alternate),
                              "guidance_cache": GuidanceCache(2),
                              "both": GuidanceCache(2, StaticCache(alternate))}

    def runner(cache: Any) -> Callable[[], tuple[jax.Array, Any]]:
        def go() -> tuple[jax.Array, Any]:
            out = sample(guided, noise, solver="dpm++2m", num_steps=num_steps,
                         schedule=schedule, args=(4.5, params, ctx2, mask2), cache=cache)
            out = out if cache is not None else (out, None)
            jax.block_until_ready(out[0])
            return out
        return go

    runs = {name: runner(cache) for name, cache in caches.items()}
    blocks: dict[str, int] = {}
    for name, go in runs.items():
        log(f"compiling {name} ...")
        _, stats = go()
        blocks[name] = num_steps * c["depth"] if stats is None else int(stats["blocks"])
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name, go in runs.items():
            start = time.perf_counter()
            go()
            times[name].append(time.perf_counter() - start)
        log(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    median = {k: statistics.median(v) for k, v in times.items()}
    base = median["uncached"]
    return {"benchmark": "step-cache", "config": c, "num_steps": num_steps, "repeats": repeats,
            "seconds": median, "blocks": blocks,
            "speedup": {k: base / v for k, v in median.items()},
            "block_ratio": {k: blocks["uncached"] / v for k, v in blocks.items()}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    result = run(args.repeats, args.steps, args.batch)
    emit(result)
    for k in result["seconds"]:
        print(f"{k:18s} {result['seconds'][k]:.2f} s  speed-up {result['speedup'][k]:.2f}x  "
              f"blocks {result['blocks'][k]} ({result['block_ratio'][k]:.2f}x fewer)",
              file=sys.stderr)
    return 0
