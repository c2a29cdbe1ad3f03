"""``jdit bench bars``: the issue's quality bars for the embedded recipes, end to end.

Trains ``configs/shapes_tiny.py``, ``shapes_tiny_linear.py`` and/or ``digits_tiny.py`` exactly as ``jdit train``
does (same loop, checkpoints and sample grids included), times the training wall clock, runs
``jdit eval`` on the result and compares both with the bars:

- shapes_tiny and shapes_tiny_linear (SANA-style): training <= 15 min, adherence_single >= 0.90,
  adherence_pair >= 0.70;
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

BARS: dict[str, dict[str, Any]] = {
    "shapes_tiny": {"max_train_s": 15 * 60, "min": {"adherence_single": 0.90,
                                                    "adherence_pair": 0.70}},
    "digits_tiny": {"max_train_s": 10 * 60, "min": {"digit_accuracy": 0.95}},
}
BARS["shapes_tiny_linear"] = BARS["shapes_tiny"]


def run_one(name: str, config_dir: Path, workdir: Path,
            log: Callable[[str], None]) -> dict[str, Any]:
    from jdit.config import load_config
    from jdit.train.loop import evaluate, train

    config = load_config(config_dir / f"{name}.py")
    log(f"{name}: training {config.train.steps} steps in {workdir} ...")
    start = time.perf_counter()
    train(config, workdir)
    train_s = time.perf_counter() - start
    log(f"{name}: trained in {train_s:.0f} s; evaluating ...")
    metrics = evaluate(workdir)
    bar = BARS[name]
    checks = {"train_seconds": train_s <= bar["max_train_s"],
              **{k: metrics[k] >= v for k, v in bar["min"].items()}}
    return {"recipe": name, "train_seconds": train_s, "metrics": metrics,
            "bars": {"max_train_seconds": bar["max_train_s"], **bar["min"]},
            "passed": checks, "all_passed": all(checks.values())}


def run(recipes: list[str], config_dir: str | Path = "configs", workdir: str | Path | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    log = log or (lambda s: print(s, file=sys.stderr))
    unknown = sorted(set(recipes) - set(BARS))
    if unknown:
        raise ValueError(f"unknown recipes {unknown}; bars exist for {sorted(BARS)}")
    config_dir = Path(config_dir)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        results = [run_one(name, config_dir, root / name, log) for name in recipes]
    return {"benchmark": "bars", "results": results,
            "all_passed": all(r["all_passed"] for r in results)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipes", nargs="*", default=list(BARS), help=f"some of {sorted(BARS)}")
    parser.add_argument("--configs", default="configs", help="folder holding the recipe configs")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: temporary)")


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    result = run(args.recipes, config_dir=args.configs, workdir=args.workdir)
    emit(result)
    for r in result["results"]:
        print(f"{r['recipe']}: {'PASS' if r['all_passed'] else 'FAIL'} {r['passed']}",
              file=sys.stderr)
    return 0 if result["all_passed"] else 1
