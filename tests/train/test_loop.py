"""The training loop: exact resume, SIGTERM, killed runs, outputs, sample and eval commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jdit.cli import main as cli_main
from jdit.config import load_config
from jdit.files import DirectoryLocked
from jdit.train.checkpoint import Checkpointer
from jdit.train.loop import Run, evaluate, load_trained, sample_prompts, train
from jdit.train.writers import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
TINY_SHAPES = [
    "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=4",
    "model.caption_channels=16", "data.text_dim=16", "train.batch_size=8", "train.steps=6",
    "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=100",
    "sample.steps=2",
]
TINY_DIGITS = [
    "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=8",
    "train.batch_size=8", "train.steps=4", "train.log_every=1", "train.sample_every=0",
    "sample.steps=2",
]


def tiny(name: str, extra: list[str] = ()):
    overrides = TINY_SHAPES if name == "shapes_tiny" else TINY_DIGITS
    return load_config(ROOT / "configs" / f"{name}.py", overrides + list(extra))


def losses(workdir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_jsonl(workdir / "metrics.jsonl")]


@pytest.mark.slow
def test_interrupted_and_resumed_run_reaches_the_same_losses(tmp_path):
    config = tiny("shapes_tiny")
    train(config, tmp_path / "straight", quiet=True)
    train(config, tmp_path / "resumed", stop_after=3, quiet=True)
    assert Checkpointer(tmp_path / "resumed" / "checkpoints", every=0,
                        read_only=True).latest_step() == 3
    train(config, tmp_path / "resumed", quiet=True)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [s for s, _ in straight] == list(range(1, 7)) == [s for s, _ in resumed]
    assert straight == resumed  # bit-exact: same batches, same RNG, same state


@pytest.mark.slow
def test_outputs_sample_and_eval_commands(tmp_path):
    config = tiny("digits_tiny", ["train.sample_every=4"])
    train(config, tmp_path, quiet=True)
    assert (tmp_path / "samples" / "step_0000004.png").exists()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "config.json").read_text())["model"]["family"] == "dit"
    run, params, step = load_trained(tmp_path)
    assert step == 4 and isinstance(run, Run)
    images = sample_prompts(tmp_path, ["3", "7"], tmp_path / "grid.png", num_per_prompt=2)
    assert images.shape == (4, 32, 32, 1) and (tmp_path / "grid.png").exists()
    result = evaluate(tmp_path, per_class=2)
    assert set(result) >= {"step", "digit_accuracy", "frechet_distance", "frechet_distance_real"}


@pytest.mark.slow
def test_changed_config_in_an_existing_workdir_is_refused(tmp_path):
    train(tiny("digits_tiny"), tmp_path, quiet=True)
    train(tiny("digits_tiny", ["train.steps=5"]), tmp_path, quiet=True)  # more steps is fine
    with pytest.raises(ValueError, match="holds a different config"):
        train(tiny("digits_tiny", ["optim.lr=0.5"]), tmp_path, quiet=True)
    # fewer steps than the run has reached: refused before the run's config is rewritten
    before = (tmp_path / "config.json").read_bytes()
    with pytest.raises(ValueError, match="train.steps=3 is below step 5, which the run"):
        train(tiny("digits_tiny", ["train.steps=3"]), tmp_path, quiet=True)
    assert (tmp_path / "config.json").read_bytes() == before


@pytest.mark.slow
def test_a_diverging_run_stops_or_skips_and_never_saves_a_non_finite_state(tmp_path, capsys):
    diverging = ["optim.lr=1e30", "train.steps=12", "train.checkpoint_every=1",
                 "train.keep_checkpoints=20"]
    args = ["train", "--config", str(ROOT / "configs" / "digits_tiny.py"), "--workdir",
            str(tmp_path / "stop")] + [f"--config.{o}" for o in TINY_DIGITS + diverging]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "jdit train: error: training diverged at step" in err and "Traceback" not in err
    step = int(err.split("diverged at step ")[1].split(":")[0])
    assert step < 12
    # metrics.jsonl stays strict JSON, up to the step that was not applied
    lines = (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=pytest.fail) for line in lines]
    assert [r["step"] for r in rows] == list(range(1, step + 1))
    # every checkpoint left is finite and the latest one restores
    run, params, latest = load_trained(tmp_path / "stop")
    assert latest <= step and all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))

    config = tiny("digits_tiny", diverging + ["train.nonfinite=skip", "train.log_every=1"])
    last = train(config, tmp_path / "skip", quiet=True)
    assert last["skipped_steps"] >= 1
    assert [r["step"] for r in read_jsonl(tmp_path / "skip" / "metrics.jsonl")] == list(range(1, 13))
    params = load_trained(tmp_path / "skip")[1]
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def _start(workdir: Path, steps: int, checkpoint_every: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "jdit.cli", "train", "--config",
            str(ROOT / "configs" / "shapes_tiny.py"), "--workdir", str(workdir)]
    args += [f"--config.{o}" for o in TINY_SHAPES]
    args += [f"--config.train.steps={steps}", f"--config.train.checkpoint_every={checkpoint_every}"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _wait_for_steps(workdir: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = workdir / "metrics.jsonl"
        if path.exists() and len(read_jsonl(path)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode()[-3000:])
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("training did not make progress")


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = _start(tmp_path, steps=100_000, checkpoint_every=100_000)
    _wait_for_steps(tmp_path, 3, proc)
    # a second process on the same run directory is refused, naming the holder
    with pytest.raises(DirectoryLocked, match=f"in use by another process \\(pid {proc.pid} "):
        train(tiny("shapes_tiny"), tmp_path, quiet=True)
    proc.send_signal(signal.SIGTERM)
    code, err = proc.wait(timeout=120), proc.stderr.read().decode()
    # saved, and not a success: `jdit train ... && next-step` stops here
    assert code == 128 + signal.SIGTERM, err[-3000:]
    done = len(read_jsonl(tmp_path / "metrics.jsonl"))
    assert f"stopped at step {done} by SIGTERM (resumable" in err
    assert Checkpointer(tmp_path / "checkpoints", every=0, read_only=True).latest_step() == done


@pytest.mark.slow
def test_killed_runs_never_leave_a_corrupt_latest_checkpoint(tmp_path):
    """SIGKILL while checkpoints are written every step; the latest one must restore."""
    def latest() -> int:
        return Checkpointer(tmp_path / "checkpoints", every=0, read_only=True).latest_step() or 0

    for delay in (0.0, 0.15, 0.4):
        before = latest()
        proc = _start(tmp_path, steps=100_000, checkpoint_every=1)
        _wait_for_steps(tmp_path, 2 + len(read_jsonl(tmp_path / "metrics.jsonl"))
                        if (tmp_path / "metrics.jsonl").exists() else 2, proc)
        deadline = time.time() + 120  # a save of this process has completed: kill mid-stream
        while latest() <= before:
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        run, params, step = load_trained(tmp_path)  # raises if the latest is unreadable
        assert step >= 1 and np.all(np.isfinite(np.asarray(params["t_block"]["linear"]["kernel"])))
    # and the run still resumes to the end (the killed processes' locks died with them), its
    # metrics one line per step although the killed runs logged steps they never saved
    config = tiny("shapes_tiny", [f"train.steps={step + 2}", "train.checkpoint_every=1"])
    train(config, tmp_path, quiet=True)
    assert load_trained(tmp_path)[2] == step + 2
    assert [m["step"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, step + 3))


def test_prefetch_keeps_order_raises_errors_and_stops_early():
    from jdit.train.loop import prefetch

    assert list(prefetch(lambda i: i * i, 3, 9)) == [i * i for i in range(3, 9)]

    def broken(i):
        if i == 2:
            raise KeyError("batch 2")
        return i

    got = []
    with pytest.raises(KeyError, match="batch 2"):
        for value in prefetch(broken, 0, 5):
            got.append(value)
    assert got == [0, 1]
    gen = prefetch(lambda i: i, 0, 10_000, depth=2)
    assert next(gen) == 0
    gen.close()  # joins the worker: no thread left blocked on a full queue


@pytest.mark.slow
def test_jdit_train_reports_its_start_up_and_a_resumed_run_does_not_compile_again(
        tmp_path, monkeypatch):
    """`jdit train` keeps XLA's programs under the run directory: resuming loads them (unless
    the user has a compilation cache of their own, as the test session does)."""
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)

    def first_row(steps: int) -> dict:
        proc = _start(tmp_path, steps=steps, checkpoint_every=100)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]
        rows = read_jsonl(tmp_path / "metrics.jsonl")
        return next(r for r in rows if "startup_s" in r and r["step"] > steps - 3)

    fresh = first_row(3)
    assert any((tmp_path / "compile_cache").iterdir())
    assert fresh["process_s"] >= fresh["startup_s"] >= fresh["first_step_s"] > 0
    resumed = first_row(6)  # steps 4-6: the same programs, read back instead of compiled
    assert resumed["first_step_s"] < fresh["first_step_s"]
