"""``jdit bench lit``: LiT end to end on the embedded ``shapes`` data: distil a tiny PixArt
into a tiny linear-attention DiT and compare their prompt adherence.

A short ``shapes_tiny`` run (1000 steps of 32) gives a teacher that follows single-object prompts
about a third of the time; a LiT student (2 linear heads, 5×5 conv on V, every non-attention
weight inherited, the teacher's output as an extra target) trained 150 steps must follow them
as well, within 0.05, on the held-out prompts. Two-object prompts are not compared: a teacher
this short follows them about 5 % of the time, so "within 0.05" would say nothing (the
full-length comparison, pairs included, is in BENCHMARKS.md). The teacher must have learned
something (``adherence_single`` >= 0.25), or the comparison says nothing either.

Takes 6-9 minutes on 2 CPU cores: too long for the test suite (whose test runs the same code at
a toy size), so it is a benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "shapes_tiny.py"
MIN_TEACHER = 0.25
MARGIN = 0.05


def _run(config: Any, workdir: Path, steps: int, batch_size: int, seed: int,
         single_repeats: int) -> tuple[dict[str, Any], float]:
    from jdit.train.loop import evaluate, train

    config.train.steps, config.train.sample_every, config.train.batch_size = steps, 0, batch_size
    config.train.checkpoint_every, config.train.seed = steps, seed
    config.optim.warmup_steps = min(100, steps // 5)
    start = time.perf_counter()
    train(config, workdir, quiet=True)
    seconds = time.perf_counter() - start
    return evaluate(workdir, num_pairs=0, single_repeats=single_repeats), seconds


def run(teacher_steps: int = 1000, student_steps: int = 150, batch_size: int = 32,
        seed: int = 0, overrides: Sequence[str] = (), single_repeats: int = 4,
        config: str | Path = CONFIG, workdir: str | Path | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``overrides``: ``key=value`` settings of the teacher's config (the student's follows)."""
    from jdit.config import load_config
    from jdit.models import lit

    log = log or (lambda s: print(s, file=sys.stderr))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        log(f"teacher: {teacher_steps} steps ...")
        teacher, teacher_s = _run(load_config(str(config), list(overrides)), root / "teacher",
                                  teacher_steps, batch_size, seed, single_repeats)
        student_config = load_config(str(config), list(overrides))
        student_config.model = lit.student_config(dict(student_config.model), linear_heads=2,
                                                  linear_v_conv=5)
        student_config.distill = dict(teacher=str(root / "teacher"), inherit=True,
                                      output_weight=0.5)
        log(f"teacher adherence_single {teacher['adherence_single']:.3f}; student: "
            f"{student_steps} steps ...")
        student, student_s = _run(student_config, root / "student", student_steps, batch_size,
                                  seed, single_repeats)
        inherited = json.loads((root / "student" / "inherited.json").read_text())
    t, s = teacher["adherence_single"], student["adherence_single"]
    checks = {"teacher_learned": t >= MIN_TEACHER, "student_within_margin": s >= t - MARGIN}
    return {"benchmark": "lit", "seed": seed, "teacher_steps": teacher_steps,
            "student_steps": student_steps, "batch_size": batch_size,
            "teacher_adherence_single": t, "student_adherence_single": s,
            "teacher_train_s": teacher_s, "student_train_s": student_s,
            "bars": {"min_teacher": MIN_TEACHER, "margin": MARGIN}, "passed": checks,
            "all_passed": all(checks.values()), "inherited": inherited}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: temporary)")


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    result = run(args.teacher_steps, args.student_steps, seed=args.seed, workdir=args.workdir)
    result.pop("inherited")
    emit(result)
    print(f"teacher {result['teacher_adherence_single']:.3f}, student "
          f"{result['student_adherence_single']:.3f}: "
          f"{'PASS' if result['all_passed'] else 'FAIL'} {result['passed']}", file=sys.stderr)
    return 0 if result["all_passed"] else 1
