"""``jdit bench attention``: the XLA paths of softmax and ReLU linear attention on this CPU,
from 1K to 16K tokens, measured in the same run (forward, float32, medians of ``repeats``).

Softmax attention is ``jdit.nn.attention.xla_attention`` (what the models run with
``attention_impl="xla"``); linear attention is ``pallas_kernels.reference.linear_attention``
(its jnp path). The Pallas kernels themselves need a TPU to be timed; their compiled costs are in
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jdit.nn.attention import xla_attention
from pallas_kernels import reference


def _median_seconds(fn: Callable[..., jax.Array], args: Sequence[jax.Array], repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(tokens: Sequence[int] = (1024, 4096, 16384), heads: int = 2, head_dim: int = 32,
        repeats: int = 3, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Softmax once per size (``repeats`` times); linear attention ``5 * repeats`` rounds over all
    sizes in turn, so that the growth ratio is not skewed by the machine's load drifting."""
    log = log or (lambda s: print(s, file=sys.stderr))
    softmax = jax.jit(lambda q, k, v: xla_attention(q, k, v))
    linear = jax.jit(lambda q, k, v: reference.linear_attention(q, k, v))
    inputs = {}
    for n in tokens:
        keys = jax.random.split(jax.random.PRNGKey(n), 3)
        inputs[n] = tuple(jax.random.normal(key, (1, n, heads, head_dim)) for key in keys)
        jax.block_until_ready(linear(*inputs[n]))  # compile
    linear_times: dict[int, list[float]] = {n: [] for n in tokens}
    for _ in range(5 * repeats):
        for n in tokens:
            linear_times[n].append(_median_seconds(linear, inputs[n], 1))
    rows = []
    for n in tokens:
        s = _median_seconds(softmax, inputs[n], repeats)
        lin = statistics.median(linear_times[n])
        rows.append({"tokens": n, "softmax_s": s, "linear_s": lin, "speedup": s / lin})
        log(f"{n:6d} tokens: softmax {s * 1e3:9.2f} ms, linear {lin * 1e3:7.2f} ms, "
            f"linear is {s / lin:7.1f}x faster")
    out: dict[str, Any] = {"heads": heads, "head_dim": head_dim, "rows": rows}
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        out["linear_growth"] = {"tokens_ratio": b["tokens"] / a["tokens"],
                                "time_ratio": b["linear_s"] / a["linear_s"]}
        log(f"linear attention, {a['tokens']} -> {b['tokens']} tokens: "
            f"time x{out['linear_growth']['time_ratio']:.2f}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", default="1024,4096,16384", help="comma-separated lengths")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    tokens = tuple(int(t) for t in args.tokens.split(","))
    emit(run(tokens, heads=args.heads, head_dim=args.head_dim, repeats=args.repeats))
    return 0
