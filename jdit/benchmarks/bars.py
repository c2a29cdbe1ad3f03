"""``jdit bench bars``: the issue's quality bars for the embedded recipes, end to end.

Trains ``configs/shapes_tiny.py``, ``shapes_tiny_linear.py`` and/or ``digits_tiny.py`` exactly as ``jdit train``
does (same loop, checkpoints and sample grids included), times the training wall clock, runs
``jdit eval`` on the result and compares both with the bars:

- shapes_tiny: training <= 10 min (issue 24), adherence_single >= 0.90, adherence_pair >= 0.70;
- shapes_tiny_linear (SANA-style): the same bars in <= 15 min;
- digits_tiny: training <= 10 min, digit_accuracy >= 0.95.

Takes 15-25 minutes on 2 CPU cores; too long for the test suite, so it is a benchmark.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jdit.benchmarks.isolated import peak_rss_mb

BARS: dict[str, dict[str, Any]] = {
    "shapes_tiny": {"max_train_s": 10 * 60, "min": {"adherence_single": 0.90,
                                                    "adherence_pair": 0.70}},
    "shapes_tiny_linear": {"max_train_s": 15 * 60, "min": {"adherence_single": 0.90,
                                                           "adherence_pair": 0.70}},
    "digits_tiny": {"max_train_s": 10 * 60, "min": {"digit_accuracy": 0.95}},
}


def run_one(name: str, config_dir: Path, workdir: Path, log: Callable[[str], None],
            seed: int | None = None, compile_cache: bool = False) -> dict[str, Any]:
    from jdit.config import load_config
    from jdit.train.loop import evaluate, train

    config = load_config(config_dir / f"{name}.py",
                         [] if seed is None else [f"train.seed={seed}"])
    log(f"{name}: training {config.train.steps} steps (seed {config.train.seed}) in {workdir} ...")
    start = time.perf_counter()
    last = train(config, workdir, compile_cache=compile_cache)
    train_s = time.perf_counter() - start
    log(f"{name}: trained in {train_s:.0f} s; evaluating ...")
    metrics = evaluate(workdir)
    bar = BARS[name]
    checks = {"train_seconds": train_s <= bar["max_train_s"],
              **{k: metrics[k] >= v for k, v in bar["min"].items()}}
    return {"recipe": name, "seed": int(config.train.seed), "train_seconds": train_s,
            "startup_seconds": last.get("startup_s"), "first_step_seconds": last.get("first_step_s"),
            "peak_rss_mb": peak_rss_mb(), "metrics": metrics,
            "bars": {"max_train_seconds": bar["max_train_s"], **bar["min"]},
            "passed": checks, "all_passed": all(checks.values())}


def summary(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per recipe, the mean and the worst run of every barred figure (the most seconds, the
    least of the others) over its seeds."""
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["recipe"] for r in results):
        runs = [r for r in results if r["recipe"] == name]
        figures = {"train_seconds": [r["train_seconds"] for r in runs],
                   **{k: [r["metrics"][k] for r in runs] for k in BARS[name]["min"]}}
        out[name] = {}
        for key, values in figures.items():
            out[name][f"{key}_mean"] = sum(values) / len(values)
            out[name][f"{key}_worst"] = max(values) if key == "train_seconds" else min(values)
    return out


def run(recipes: list[str], config_dir: str | Path = "configs", workdir: str | Path | None = None,
        log: Callable[[str], None] | None = None, seeds: list[int] | None = None,
        compile_cache: bool = False) -> dict[str, Any]:
    """Each recipe once per seed of ``seeds`` (None: the config's own seed); the recipe passes
    when every run passes. ``compile_cache``: as ``jdit train`` (the command line sets it)."""
    log = log or (lambda s: print(s, file=sys.stderr))
    unknown = sorted(set(recipes) - set(BARS))
    if unknown:
        raise ValueError(f"unknown recipes {unknown}; bars exist for {sorted(BARS)}")
    config_dir = Path(config_dir)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        results = [run_one(name, config_dir,
                           root / (name if seed is None else f"{name}_seed{seed}"), log, seed,
                           compile_cache)
                   for name in recipes for seed in (seeds or [None])]
    return {"benchmark": "bars", "results": results, "summary": summary(results),
            "all_passed": all(r["all_passed"] for r in results)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipes", nargs="*", default=list(BARS), help=f"some of {sorted(BARS)}")
    parser.add_argument("--configs", default="configs", help="folder holding the recipe configs")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: temporary)")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated train.seed values, one run each (e.g. 0,1,2)")


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",") if s.strip()]
    result = run(args.recipes, config_dir=args.configs, workdir=args.workdir, seeds=seeds,
                 compile_cache=True)
    emit(result)
    for r in result["results"]:
        print(f"{r['recipe']} (seed {r['seed']}): {'PASS' if r['all_passed'] else 'FAIL'} "
              f"{r['passed']}", file=sys.stderr)
    for name, figures in result["summary"].items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()),
              file=sys.stderr)
    return 0 if result["all_passed"] else 1
