"""Sharded training, sampling and checkpoints on 8 simulated devices equal one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def run_checks(name: str) -> list[dict]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "tests.parallel.eight_devices", name], env=env,
                          cwd=HERE.parents[1], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_training_on_meshes_matches_one_device():
    results = run_checks("training")
    assert [r["mesh"] for r in results] == [
        {"data": 8, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2},
        {"data": 1, "fsdp": 4, "tensor": 2}, {"data": 1, "fsdp": 8, "tensor": 1},
        {"data": 2, "fsdp": 1, "tensor": 1, "context": 4}]
    for r in results:
        assert r["devices"] == 8
        assert r["loss_rel"] <= 1e-5, r
        assert r["params_rel"] <= 1e-5 and r["ema_rel"] <= 1e-5 and r["opt_rel"] <= 1e-5, r
    dp, fsdp_tp, _, fsdp, _ = results
    assert dp["sharded_leaves"] == 0  # data parallel: everything replicated
    assert fsdp_tp["qkv_spec"] == ["fsdp", None, "tensor", None]
    assert fsdp["qkv_spec"] == ["fsdp", None, None, None]
    # parameters, EMA and both Adam moments are split (4 copies of each split weight); tensor
    # parallelism splits more of them (head and MLP biases too)
    assert fsdp_tp["sharded_leaves"] > fsdp["sharded_leaves"] > 0
    assert fsdp["sharded_leaves"] % 4 == 0


@pytest.mark.slow
def test_sampling_sharded_over_data_matches_one_device():
    for r in run_checks("sampling"):
        assert r["ref_std"] > 0.1  # a real image, not a constant
        assert r["max_abs"] <= 1e-5, r


@pytest.mark.slow
def test_checkpoint_saved_on_one_mesh_restores_on_others():
    results = run_checks("checkpoints")
    assert [r["devices"] for r in results] == [4, 1]
    for r in results:
        assert r["max_abs"] == 0.0 and r["step"] == 2, r
    assert results[0]["sharded_leaves"] > 0 and results[1]["sharded_leaves"] == 0


@pytest.mark.slow
def test_pallas_attention_inside_shard_map_matches_xla_on_one_device():
    results = run_checks("pallas")
    assert len(results) == 2
    for r in results:
        assert r["shard_map"], r
        assert r["loss_rel"] <= 1e-5 and r["grads_rel"] <= 1e-5, r


@pytest.mark.slow
def test_lora_adapters_shard_like_their_kernels_and_match_one_device():
    fsdp, fsdp_tp = run_checks("lora")
    for r in (fsdp, fsdp_tp):
        assert r["loss_rel"] <= 1e-5 and r["adapters_rel"] <= 1e-5, r
    # A takes the kernel's input axes (embed -> fsdp), B its output axes (heads -> tensor)
    assert fsdp["kernel_spec"][0] == fsdp["qkv_a_spec"][0] == "fsdp"
    assert fsdp_tp["kernel_spec"] == ["fsdp", None, "tensor", None]
    assert fsdp_tp["qkv_a_spec"] == ["fsdp", None]
    assert fsdp_tp["qkv_b_spec"] == [None, None, "tensor", None]
    assert fsdp_tp["out_a_spec"] == ["tensor", None, None]


@pytest.mark.slow
def test_consistency_distillation_shards_and_matches_one_device():
    results = run_checks("consistency")
    assert [(r["method"], r["mesh"]) for r in results] == [
        (m, {"data": 2, "fsdp": 2, "tensor": 2}) for m in ("consistency", "scm")]
    for r in results:
        assert r["loss_rel"] <= 1e-4 and r["teacher_sharded"], r
