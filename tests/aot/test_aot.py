"""Ahead-of-time compiles for real TPU topologies through libtpu (no TPU needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # xdist workers each load libtpu

from jdit import aot  # noqa: E402
from jdit.aot import train_step  # noqa: E402

pytest.importorskip("libtpu", reason="the tpu extra (libtpu) is part of the test extra")
ROOT = Path(__file__).parents[2]
SMALL = ["--config.model.hidden_size=256", "--config.model.depth=4", "--config.model.num_heads=4",
         "--config.model.input_size=32", "--config.model.caption_channels=128"]


def jdit_aot(*args: str) -> tuple[int, dict]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    proc = subprocess.run([sys.executable, "-m", "jdit.cli", "aot", *args], env=env,
                          capture_output=True, text=True, timeout=1500)
    start = proc.stdout.find("{")
    assert start >= 0, proc.stderr[-4000:]
    return proc.returncode, json.loads(proc.stdout[start:])


SMALL_PIXART = ("--config", str(ROOT / "configs" / "pixart_sigma_xl2_256.py"), "--topology",
                "v5e:2x2", "--batch", "2", "--caption-length", "32", *SMALL)


@pytest.fixture(scope="module")
def small_pixart():
    """The small PixArt's train step and sampler compiled once, for the tests that read it."""
    return jdit_aot(*SMALL_PIXART, "--sampler")


@pytest.mark.slow
def test_small_pixart_compiles_for_v5e_and_reports_a_roofline(small_pixart):
    code, r = small_pixart
    assert code == 0 and r["fits"]
    for key in ("topology", "mesh", "per_device_batch", "hbm_per_device_bytes",
                "hbm_capacity_bytes", "fits", "flops_per_step", "bytes_per_step",
                "compile_seconds", "roofline_step_seconds", "roofline_mfu_bound"):
        assert key in r, key
    assert r["topology"] == "v5e:2x2" and r["devices"] == 4 and r["chip"] == "v5e"
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and r["global_batch"] == 8
    assert r["hbm_capacity_bytes"] == 16 * 2**30
    assert 0 < r["hbm_per_device_bytes"] < r["hbm_capacity_bytes"]
    # Unrolled blocks: XLA counts every layer. A transformer step does at least 6 FLOPs per
    # parameter and token (forward 2, backward 4); full remat adds one more forward.
    tokens = r["per_device_batch"] * r["tokens_per_example"]
    model_flops = 6 * r["parameters"] * tokens
    assert model_flops <= r["flops_per_step"] <= 4 * model_flops, (model_flops, r["flops_per_step"])
    assert 0 < r["roofline_mfu_bound"] <= 1
    assert r["roofline_step_seconds"] == max(r["roofline_seconds"].values())
    # a small batch: no collective matmul loops, so the costs are the program's own
    assert r["while_loops"] == 0 and r["costs_from"] == "as compiled"
    assert r["caption_tokens_per_example"] == 32 and "sequence_tokens_per_example" not in r
    s = r["sampler"]  # the 20-step CFG sampler for the same mesh
    assert s["fits"] and s["num_steps"] == 20 and s["batch"] == 8
    # 20 steps x 2 (CFG) forwards of about 2 FLOPs per parameter and image token (less for the
    # caption and timestep weights, which see fewer tokens); the solver loop counted once would
    # be 20 times less
    forwards = 20 * 2 * 2 * r["parameters"] * tokens
    assert forwards / 2 <= s["flops_per_image_batch"] <= 2 * forwards


@pytest.mark.slow
def test_a_lora_train_step_compiles_with_the_base_frozen(small_pixart):
    """LoRA for a pod: only the adapters, their moments and EMA are state; the base is an
    input. Less memory per chip and fewer FLOPs (no weight gradients of the base)."""
    code, full = small_pixart  # (its train step: the same program with or without --sampler)
    code_lora, r = jdit_aot(*SMALL_PIXART, "--config.lora.rank=8")
    assert code == code_lora == 0 and r["fits"]
    assert r["lora"]["rank"] == 8 and r["parameters"] == full["parameters"]
    assert 0 < r["lora"]["trainable_parameters"] < r["parameters"] / 20
    assert r["hbm_per_device_bytes"] < full["hbm_per_device_bytes"]
    assert r["flops_per_step"] < full["flops_per_step"]


@pytest.mark.slow
def test_small_sana_compiles_for_v5e_with_the_linear_attention_kernel():
    code, r = jdit_aot("--config", str(ROOT / "configs" / "sana_600m_512.py"),
                       "--topology", "v5e:2x2", "--batch", "2", "--caption-length", "32",
                       "--config.model.depth=2", "--config.model.hidden_size=256",
                       "--config.model.num_heads=8", "--config.model.cross_num_heads=4")
    assert code == 0 and r["fits"], r
    assert r["assumed"]["model"]["attention_impl"] == "pallas"
    assert r["assumed"]["diffusion"]["objective"] == "flow"  # SANA is a flow model
    assert r["tokens_per_example"] == 256 and r["roofline_mfu_bound"] > 0


@pytest.mark.slow
def test_pixart_sigma_xl_1024_compiles_and_fits_on_v5p_2x2x2():
    code, r = jdit_aot("--config", str(ROOT / "configs" / "pixart_sigma_xl2_1024.py"),
                       "--topology", "v5p:2x2x2", "--batch", "4", "--scan-layers", "on")
    assert code == 0 and r["fits"], r
    assert r["devices"] == 8 and r["chip"] == "v5p" and r["mesh"]["fsdp"] == 8
    assert 600e6 < r["parameters"] < 620e6  # PixArt-XL/2: 611M
    assert r["tokens_per_example"] == 4096 and r["dtype"] == "bfloat16"
    assert r["costs_from"].startswith("as compiled: the scanned blocks counted once")
    # Parameters, EMA and AdamW moments are split 8 ways: 1/8 of 4 float32 copies, plus TPU
    # tile padding (head_dim 72 is padded to 128 lanes in the q/k/v kernels: about +40 %).
    # Replicated, the arguments would be 8 times larger.
    state_bytes = 4 * 4 * r["parameters"]
    assert state_bytes / 8 < r["memory"]["arguments"] < state_bytes / 8 * 1.5


@pytest.mark.slow
def test_a_small_lumina2_compiles_for_v5e_with_flash_attention_over_the_joint_sequence():
    """Lumina2's caption and image tokens attend as one sequence: the report counts both."""
    code, r = jdit_aot("--config", str(ROOT / "configs" / "lumina2_2b_1024.py"),
                       "--topology", "v5e:2x2", "--batch", "2", "--caption-length", "32",
                       "--config.model.depth=1", "--config.model.refiner_depth=1",
                       "--config.model.hidden_size=256", "--config.model.num_heads=2",
                       "--config.model.num_kv_heads=1", "--config.model.axes_dim_rope=(32,48,48)",
                       "--config.model.input_size=32", "--config.model.caption_channels=64")
    assert code == 0 and r["fits"], r
    assert r["assumed"]["model"]["attention_impl"] == "pallas"
    assert r["assumed"]["diffusion"] == {"objective": "flow", "flow_shift": 6.0,
                                         "timestep_sampler": "logit_normal"}
    assert r["tokens_per_example"] == 256 and r["caption_tokens_per_example"] == 32
    assert r["sequence_tokens_per_example"] == 288
    assert r["costs_from"] == "as compiled" and r["roofline_mfu_bound"] > 0


@pytest.mark.parametrize("fixed, per_example, start, expected", [
    (10.0, 1.0, 1, 36), (10.0, 1.0, 4, 36), (30.0, 2.0, 8, 8), (46.0, 0.5, 2, 2),
    (10.0, 0.0, 4, 4096), (40.0, 0.01, 4, 700)])
def test_max_batch_search_predicts_then_confirms(monkeypatch, fixed, per_example, start, expected):
    calls = []
    capacity = 47.0

    def fake_report(config, topology, batch, **kwargs):
        calls.append(batch)
        hbm = fixed + per_example * batch + (0.05 if batch % 2 else 0.0)  # nearly linear
        return {"fits": hbm <= capacity, "hbm_per_device_bytes": hbm,
                "hbm_capacity_bytes": capacity, "per_device_batch": batch}

    monkeypatch.setattr(train_step, "report", fake_report)
    r = aot.max_batch({}, "v5e:2x2", start=start)
    assert r["max_per_device_batch"] == expected == r["per_device_batch"]
    assert len(calls) == len(set(calls)) <= 16, calls
    if per_example >= 0.5:  # the prediction is close: a handful of compiles
        assert len(calls) <= 6, calls  # each batch compiled once, few compiles


def test_max_batch_says_when_nothing_fits(monkeypatch):
    monkeypatch.setattr(train_step, "report", lambda *a, **k: {
        "fits": False, "hbm_per_device_bytes": 2**40, "hbm_capacity_bytes": 2**34})
    with pytest.raises(ValueError, match="not even a per-device batch of 1 fits"):
        aot.max_batch({}, "v5e:2x2", start=4)


def test_collective_bytes_reads_compiled_hlo():
    hlo = """
  %all-gather.9 = bf16[4,1024,1024]{2,1,0:T(8,128)(2,1)} all-gather(%p), channel_id=3
  %ars = (f32[256]{0}, f32[1024]{0}) all-gather-start(%q), channel_id=4
  %all-reduce.1 = f32[1152,4608]{1,0} all-reduce(%g), to_apply=%add
  %all-reduce.2 = (f32[16]{0}, bf16[8,8]{1,0}) all-reduce(%a, %b), to_apply=%add
  %fusion.1 = f32[8]{0} fusion(%all-gather.9), kind=kLoop
"""
    assert aot.collective_bytes(hlo) == (4 * 1024 * 1024 * 2 + 1024 * 4 + 1152 * 4608 * 4
                                         + 16 * 4 + 64 * 2)


def test_collective_bytes_counts_an_async_collective_once():
    """libtpu splits an async all-gather into a start, continuation fusions and a done, each a
    computation holding a copy of the op with the same channel_id: it moves its bytes once."""
    piece = ("  %all-gather.{n} = bf16[4096,10240]{{1,0:T(8,128)(2,1)}} all-gather(%p.{n}), "
             "channel_id={channel}, replica_groups=[1,8]<=[8], dimensions={{0}}")
    hlo = "\n".join([piece.format(n=n, channel=17) for n in range(6)]
                    + [piece.format(n=9, channel=19)])
    assert aot.collective_bytes(hlo) == 2 * 4096 * 10240 * 2


def test_clear_errors_for_unknown_topologies_and_configs():
    with pytest.raises(RuntimeError, match="cannot describe TPU topology 'v9z:1x1'"):
        aot.topology_devices("v9z:1x1")
    with pytest.raises(ValueError, match="no 'model' section"):
        aot.with_defaults({"train": {}})
    c, assumed = aot.with_defaults({"model": {"family": "pixart"}})
    assert c["model"]["dtype"] == "bfloat16" and "optim" in assumed
    assert c["diffusion"].get("objective") != "flow"
    c, _ = aot.with_defaults({"model": {"family": "lumina2"}, "pipeline": {"flow_shift": 6.0}})
    assert c["diffusion"]["objective"] == "flow" and c["diffusion"]["flow_shift"] == 6.0


@pytest.mark.slow
def test_compiler_out_of_memory_is_a_report_not_a_crash():
    pytest.importorskip("libtpu")
    from jdit.config import load_config

    config = load_config(Path(__file__).parents[2] / "configs" / "pixart_sigma_xl2_256.py",
                         ["model.depth=2"]).to_dict()
    r = aot.report(config, "v5e:2x2", 4096, caption_length=8, scan_layers=True)
    assert r["fits"] is False and "RESOURCE_EXHAUSTED" in r["error"]
    assert r["hbm_per_device_bytes"] > r["hbm_available_per_compiler_bytes"] > 10 * 2**30


@pytest.mark.slow
def test_a_whole_pipeline_compiles_with_t5_sharded():
    """`jdit aot --pipeline`: T5 -> guided sampler -> VAE as one program (a tiny stand-in for
    pixart_sigma_1024, whose figures are in BENCHMARKS.md), parameters FSDP-sharded."""
    code, r = jdit_aot("--pipeline", "tiny", "--topology", "v5e:2x2", "--batch", "2")
    assert code == 0 and r["fits"], r
    assert r["global_batch"] == 8 and r["mesh"]["fsdp"] == 4
    assert set(r["roofline_seconds"]) == {"encode", "step", "decode"}
    assert r["images_per_second"] > 0 and 0 < r["mfu_bound"] <= 1
    t5_bytes = 2 * r["parameters"]["t5"]  # bfloat16
    assert r["t5_parameter_bytes_per_device"] < t5_bytes / 2  # split, not copied to each chip


def test_command_line_overrides_win_over_what_aot_assumes():
    """A model-only config is assumed to train as a pod would (bfloat16, Pallas attention, ...);
    an override on the command line replaces the assumption and is not reported as assumed."""
    path = str(ROOT / "configs" / "pixart_sigma_xl2_1024.py")
    config, assumed = aot.load(path, ["model.attention_impl=xla", "optim.lr=1e-4"])
    assert config["model"]["attention_impl"] == "xla" and config["optim"]["lr"] == 1e-4
    assert config["model"]["dtype"] == "bfloat16" and config["train"]["steps"] == 100_000
    assert "attention_impl" not in assumed["model"] and assumed["model"]["dtype"] == "bfloat16"
    assert "lr" not in assumed["optim"] and assumed["optim"]["name"] == "adamw"
    plain, assumed = aot.load(path)
    assert plain["model"]["attention_impl"] == "pallas" == assumed["model"]["attention_impl"]
    sana, assumed = aot.load(str(ROOT / "configs" / "sana_1600m_4k.py"))
    assert sana["diffusion"]["objective"] == "flow" and sana["diffusion"]["flow_shift"] == 6.0
    with pytest.raises(ValueError, match="unknown config key 'train.stepz'"):
        aot.load(path, ["train.stepz=3"])


@pytest.mark.slow
def test_a_pipeline_with_a_condition_compiles_cached_and_uncached():
    """`jdit aot --pipeline --control`: EasyControl's cache is an input of every step
    (memory), the uncached branch runs in every forward (FLOPs)."""
    from jdit.aot import pipeline

    cached = pipeline.report("v5e:2x2", 2, "tiny", control="cached")
    uncached = pipeline.report("v5e:2x2", 2, "tiny", control="uncached")
    for r in (cached, uncached):
        assert r["fits"] and r["parameters"]["condition_lora"] > 0
        assert r["condition_resolution"] == 8
    assert cached["cache_bytes_per_device"] > 0 and "cache_bytes_per_device" not in uncached
    # the uncached step also runs the condition's branch, for both halves of the guidance
    assert cached["roofline_seconds"]["step"] < uncached["roofline_seconds"]["step"]
    with pytest.raises(ValueError, match="control must be"):
        pipeline.report("v5e:2x2", 2, "tiny", control="sometimes")
