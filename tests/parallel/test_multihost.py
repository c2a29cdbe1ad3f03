"""Two processes on localhost (CPU collectives, 2 devices each) train like one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).parents[2]
OVERRIDES = ["--config.train.steps=4", "--config.train.batch_size=8",
             "--config.model.hidden_size=64", "--config.model.depth=2",
             "--config.train.log_every=1", "--config.train.sample_every=0",
             "--config.train.checkpoint_every=2", "--config.optim.warmup_steps=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir: Path, devices: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    cmd = [sys.executable, "-m", "jdit.cli", "train", "--config",
           str(ROOT / "configs" / "shapes_tiny.py"), "--workdir", str(workdir),
           "--config.parallel.mesh={'data': 2, 'fsdp': 2, 'tensor': 1}", *OVERRIDES, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses(workdir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    from jdit.train.loop import load_trained

    single = start(tmp_path / "single", 4, [])
    port = free_port()
    procs = [start(tmp_path / "multi", 2, ["--coordinator", f"127.0.0.1:{port}",
                                           "--num-processes", "2", "--process-id", str(i)])
             for i in range(2)]
    for p in [single, *procs]:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-4000:]
    one, two = losses(tmp_path / "single"), losses(tmp_path / "multi")
    assert len(one) == len(two) == 4  # only process 0 wrote metrics
    np.testing.assert_allclose(two, one, rtol=1e-5)
    _, params_one, step_one = load_trained(tmp_path / "single")
    _, params_two, step_two = load_trained(tmp_path / "multi")
    assert step_one == step_two == 4
    for a, b in zip(jax.tree.leaves(params_two), jax.tree.leaves(params_one), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
