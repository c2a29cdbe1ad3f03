"""``jdit bench scaling``: forward time of one SANA block (linear self-attention, Mix-FFN) and one
PixArt block (softmax self-attention, MLP) on this CPU, from 1K to 16K tokens, measured in the
same run (float32, batch 1, 16 caption tokens, medians). The XLA paths of both, as the models
run them with ``attention_impl="xla"``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jdit.models.pixart import PixArtBlock
from jdit.models.sana import SanaBlock

CAPTION = 16


def _blocks(width: int, grid: tuple[int, int]) -> dict[str, Any]:
    return {
        # SANA's head layout (32 channels per linear head) and Mix-FFN ratio
        "sana": SanaBlock(hidden_size=width, num_heads=width // 32, cross_num_heads=width // 64,
                          mlp_ratio=2.5, grid_hw=grid),
        "pixart": PixArtBlock(hidden_size=width, num_heads=width // 64, mlp_ratio=4.0,
                              grid_hw=grid),
    }


def _time(fn: Callable[..., Any], args: Sequence[Any]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def run(tokens: Sequence[int] = (1024, 4096, 16384), width: int = 256, repeats: int = 3,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Each size: the softmax block ``repeats`` times; the linear block ``5 * repeats`` rounds
    over all sizes in turn (so that a drifting machine load does not skew its growth ratio)."""
    log = log or (lambda s: print(s, file=sys.stderr))
    cases = {}
    for n in tokens:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"token counts must be square grids, got {n}")
        keys = jax.random.split(jax.random.PRNGKey(n), 4)
        x = jax.random.normal(keys[0], (1, n, width))
        ctx = jax.random.normal(keys[1], (1, CAPTION, width))
        mask = jnp.ones((1, CAPTION), jnp.int32)
        t0 = jax.random.normal(keys[2], (1, 6, width)) * 0.1
        fns = {}
        for name, block in _blocks(width, (side, side)).items():
            params = block.init(keys[3], x, ctx, mask, t0)
            fns[name] = (jax.jit(lambda p, *a, b=block: b.apply(p, *a)[0]),
                         (params, x, ctx, mask, t0))
            jax.block_until_ready(fns[name][0](*fns[name][1]))  # compile
        cases[n] = fns
    sana: dict[int, list[float]] = {n: [] for n in tokens}
    for _ in range(5 * repeats):
        for n in tokens:
            sana[n].append(_time(*cases[n]["sana"]))
    rows = []
    for n in tokens:
        soft = statistics.median(_time(*cases[n]["pixart"]) for _ in range(repeats))
        lin = statistics.median(sana[n])
        rows.append({"tokens": n, "pixart_block_s": soft, "sana_block_s": lin,
                     "speedup": soft / lin})
        log(f"{n:6d} tokens: PixArt block {soft * 1e3:9.1f} ms, SANA block {lin * 1e3:8.1f} ms, "
            f"SANA faster by {soft / lin:6.1f}x")
    out: dict[str, Any] = {"width": width, "caption_tokens": CAPTION, "rows": rows}
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        out["sana_growth"] = {"tokens_ratio": b["tokens"] / a["tokens"],
                              "time_ratio": b["sana_block_s"] / a["sana_block_s"]}
        log(f"SANA block, {a['tokens']} -> {b['tokens']} tokens: time "
            f"x{out['sana_growth']['time_ratio']:.2f}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", default="1024,4096,16384", help="comma-separated lengths")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    tokens = tuple(int(t) for t in args.tokens.split(","))
    emit(run(tokens, width=args.width, repeats=args.repeats))
    return 0
