"""``jdit bench fast``: prompt adherence against seconds per image, side by side.

For the main job's model (``--teacher``, a ``configs/shapes_tiny.py`` run) and its few-step
student (``--student``, e.g. ``configs/shapes_tiny_lcm.py``): adherence by ``jdit eval``'s
protocol and seconds per image (a batch of ``--images`` pair prompts, medians of ``--repeats``
after a warm-up) for the teacher at 20 / 10 / 5 steps, the teacher with a step cache, and the
student at 4 / 2 / 1 steps; and the anchor a user would pick: the teacher exported with ``jdit
convert --to diffusers`` and run by diffusers' ``PixArtSigmaPipeline`` at 20 steps, in its own
process (:mod:`jdit.benchmarks.fast_torch`), on the same features and noise. Its images are
compared with jdit's 20-step ones (the same pipeline: they should agree), so its adherence is
the teacher's. The headline: the fastest jdit configuration within 0.05 of the teacher's
adherence (both figures), and its speed-up over diffusers at 20 steps (the bar: ≥ 4×).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MARGIN = 0.05


def _configs(teacher: str, student: str, cache_threshold: float) -> list[dict[str, Any]]:
    from jdit.sampling.cache import FirstBlockCache

    t = dict(run=teacher, solver="dpm++2m", guidance=3.0)
    s = dict(run=student, solver=None, guidance=1.0)
    return [
        {"name": "teacher, 20 steps", "steps": 20, **t},
        {"name": "teacher, 10 steps", "steps": 10, **t},
        {"name": "teacher, 5 steps", "steps": 5, **t},
        {"name": f"teacher, 20 steps, FirstBlockCache({cache_threshold})", "steps": 20,
         "cache": FirstBlockCache(cache_threshold), **t},
        {"name": "student, 4 steps", "steps": 4, **s},
        {"name": "student, 2 steps", "steps": 2, **s},
        {"name": "student, 1 step", "steps": 1, **s},
    ]


def run(teacher: str, student: str, images: int = 64, repeats: int = 3,
        cache_threshold: float = 0.2, diffusers: bool = True, num_pairs: int = 200,
        single_repeats: int = 4, log: Callable[[str], None] | None = None) -> dict[str, Any]:

    from jdit.data import shapes
    from jdit.train.loop import load_trained

    log = log or (lambda s: print(s, file=sys.stderr))
    loaded = {p: load_trained(p) for p in {teacher, student}}
    captions = [shapes.caption(o) for o in shapes.prompts("pair", "heldout")[:images]]
    rows = []
    for cfg in _configs(teacher, student, cache_threshold):
        r, params, _ = loaded[cfg["run"]]
        kw = dict(solver=cfg["solver"], num_steps=cfg["steps"], guidance_scale=cfg["guidance"],
                  step_cache=cfg.get("cache"))
        result = r.task.evaluate(lambda c, s, r=r, p=params, kw=kw: r.generate(
            p, c, seed=1000 + s, **kw), num_pairs=num_pairs, single_repeats=single_repeats)
        conds = r.task.encode(captions)
        r.generate(params, conds, seed=0, **kw)  # compiled
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            r.generate(params, conds, seed=0, **kw)
            times.append(time.perf_counter() - start)
        row = {"name": cfg["name"], "adherence_single": result["adherence_single"],
               "adherence_pair": result.get("adherence_pair", float("nan")),
               "seconds_per_image": statistics.median(times) / len(captions)}
        rows.append(row)
        log(f"{row['name']}: {row['adherence_single']:.3f} / {row['adherence_pair']:.3f}, "
            f"{1000 * row['seconds_per_image']:.1f} ms per image")
    reference = rows[0]
    out: dict[str, Any] = {"benchmark": "fast", "teacher": teacher, "student": student,
                           "images": len(captions), "repeats": repeats, "rows": rows}
    if diffusers:
        r, params, _ = loaded[teacher]
        out["diffusers"] = _diffusers_row(r, params, captions, repeats, log)
        out["diffusers"].update(adherence_single=reference["adherence_single"],
                                adherence_pair=reference["adherence_pair"])
    close = [row for row in rows
             if row["adherence_single"] >= reference["adherence_single"] - MARGIN
             and row["adherence_pair"] >= reference["adherence_pair"] - MARGIN]
    best = min(close, key=lambda row: row["seconds_per_image"])
    out["best"] = best["name"]
    if diffusers:
        out["speedup_over_diffusers"] = (out["diffusers"]["seconds_per_image"]
                                         / best["seconds_per_image"])
        out["passed"] = out["speedup_over_diffusers"] >= 4.0
    return out


def _diffusers_row(r: Any, params: Any, captions: list[str], repeats: int,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """The teacher exported and run by diffusers in its own process; its images compared with
    jdit's on the same features and noise."""
    import jax

    from jdit.config import section
    from jdit.weights.export import save_diffusers

    c = r.config
    conds, null = r.task.encode(captions), r.task.null()
    b = len(captions)
    h, w = getattr(r.task, "sample_hw", (r.task.size, r.task.size))
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (b, h, w, r.task.channels)))
    ours = r.generate(params, conds, seed=0, solver="dpm++2m", num_steps=20, guidance_scale=3.0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_diffusers(Path(tmp) / "transformer", r.module, jax.device_get(params))
        np.savez(Path(tmp) / "in.npz", context=conds["context"].astype(np.float32),
                 context_mask=conds["context_mask"].astype(np.int64),
                 null_context=np.repeat(null["context"], b, 0).astype(np.float32),
                 null_mask=np.repeat(null["context_mask"], b, 0).astype(np.int64),
                 latents=np.ascontiguousarray(noise.transpose(0, 3, 1, 2)).astype(np.float32),
                 flow_shift=float(section("diffusion", c["diffusion"])["flow_shift"]),
                 steps=20, guidance_scale=3.0)
        log("diffusers: PixArtSigmaPipeline at 20 steps in its own process ...")
        env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
        proc = subprocess.run([sys.executable, "-m", "jdit.benchmarks.fast_torch",
                               str(Path(tmp) / "in.npz"), str(Path(tmp) / "out.npz"), str(folder),
                               str(repeats)], capture_output=True, text=True, env=env,
                              timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"the diffusers process failed:\n{proc.stderr[-3000:]}")
        timing = json.loads(proc.stdout.strip().splitlines()[-1])
        theirs = np.load(Path(tmp) / "out.npz")["images"]
    diff = float(np.max(np.abs(np.asarray(ours) - theirs)))
    return {"name": "diffusers PixArtSigmaPipeline, 20 steps",
            "seconds_per_image": timing["seconds"] / b, "torch_threads": timing["threads"],
            "max_abs_diff_vs_jdit_20_steps": diff}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="a configs/shapes_tiny.py run")
    parser.add_argument("--student", required=True, help="its few-step student's run")
    parser.add_argument("--images", type=int, default=64, help="images per timed batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-threshold", type=float, default=0.2)
    parser.add_argument("--no-diffusers", action="store_true")


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    result = run(args.teacher, args.student, args.images, args.repeats, args.cache_threshold,
                 not args.no_diffusers)
    emit(result)
    rows = result["rows"] + ([result["diffusers"]] if "diffusers" in result else [])
    for row in rows:
        print(f"{row['name']:46s} {row['adherence_single']:.3f} / {row['adherence_pair']:.3f}  "
              f"{1000 * row['seconds_per_image']:7.1f} ms/image", file=sys.stderr)
    if "speedup_over_diffusers" in result:
        print(f"best within {MARGIN} of the teacher: {result['best']}, "
              f"{result['speedup_over_diffusers']:.1f}x diffusers at 20 steps "
              f"({'meets' if result['passed'] else 'misses'} the 4x bar)", file=sys.stderr)
    return 0
