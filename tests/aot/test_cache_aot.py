"""`jdit aot --cache`: the feature-caching program (VAE encoder + T5) compiled for a TPU topology."""

from __future__ import annotations

import argparse
import json
import os

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # xdist workers each load libtpu

from jdit.aot import cache  # noqa: E402
from jdit.aot.roofline import analyse, topology_devices, while_loops  # noqa: E402

pytest.importorskip("libtpu", reason="the tpu extra (libtpu) is part of the test extra")


@pytest.fixture(scope="module")
def tiny() -> dict:
    """The tiny caching program, 2 images per device on v5e-4, with its parts (one compile of
    each, shared by the tests below)."""
    return cache.report("v5e:2x2", 2, variant="tiny")


def test_tiny_caching_program_compiles_and_its_report_adds_up(tiny):
    r = tiny
    assert r["variant"] == "tiny" and r["topology"] == "v5e:2x2" and r["chip"] == "v5e"
    assert r["devices"] == r["chips"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert r["per_device_batch"] == 2 and r["global_batch"] == 8
    assert r["hbm_capacity_bytes"] == 16 * 2**30 and r["fits"]
    assert 0 < r["hbm_per_device_bytes"] < r["hbm_capacity_bytes"]
    m = r["memory"]
    assert r["hbm_per_device_bytes"] == (m["arguments"] + m["outputs"] + m["temporaries"]
                                         - m["aliased"])
    assert r["flops_per_batch"] > 0 and r["bytes_per_batch"] > 0
    t = r["roofline_seconds"]
    assert r["roofline_total_seconds"] == max(t.values()) > 0 and r["bound_by"] in t
    assert r["images_per_second"] == pytest.approx(r["global_batch"] / r["roofline_total_seconds"])
    assert r["images_per_second_per_chip"] == pytest.approx(
        r["global_batch"] / r["roofline_total_seconds"] / r["chips"])
    assert 0 < r["mfu_bound"] <= 1
    assert r["while_loops"] == 0 and r["costs_from"] == "as compiled"
    # outputs: the latent mean at 1/8 of the side (2 levels here: 1/2), T5 features per token
    assert r["outputs"] == {"latent_mean": [8, 16, 16, 4], "text_features": [8, 16, 32]}


def test_tiny_caching_program_splits_the_batch_and_t5_over_the_chips(tiny):
    r = tiny
    s = r["shardings"]
    assert r["batch_axes"] == ["data", "fsdp"]
    assert s["images"][0] == ["data", "fsdp"] and s["images"][1:] == [None, None, None]
    assert s["ids"][0] == s["mask"][0] == ["data", "fsdp"]
    # each device holds its 2 images and their outputs, not the global 8
    assert s["images_per_device"] == [2, 32, 32, 3]
    assert s["latent_mean_per_device"] == [2, 16, 16, 4]
    assert s["text_features_per_device"] == [2, 16, 32]
    t5_bytes = 2 * r["parameters"]["t5"]  # bfloat16
    assert r["parameter_bytes_per_device"]["t5"] < t5_bytes / 2  # split, not copied to each chip
    # the VAE's conv kernels stay whole on each chip (float32); the decoder is not an argument
    vae = r["parameter_bytes_per_device"]["vae_encoder"]
    assert vae == 4 * r["parameters"]["vae_encoder"]
    assert r["memory"]["arguments"] >= vae + r["parameter_bytes_per_device"]["t5"]


def test_tiny_caching_program_parts_are_its_reference(tiny):
    r = tiny
    vae, t5 = r["parts"]["vae"], r["parts"]["t5"]
    # the whole program does what the parts do: their FLOPs add up to its FLOPs
    assert vae["flops_per_batch"] + t5["flops_per_batch"] == pytest.approx(
        r["flops_per_batch"], rel=0.02)
    assert r["parts_total_seconds"] == pytest.approx(
        vae["roofline_total_seconds"] + t5["roofline_total_seconds"])
    # the whole takes at least as long as its larger part, about as long as both in a row
    assert max(vae["roofline_total_seconds"], t5["roofline_total_seconds"]) <= \
        r["roofline_total_seconds"] * 1.02
    assert 0.8 < r["whole_over_parts"] < 1.1
    text = cache.format_report(r)
    assert "images/s per chip" in text and "vae alone" in text and "of 16.0 GiB" in text


def test_tiny_caching_memory_and_flops_grow_with_the_batch(tiny):
    one = cache.compile_report("v5e:2x2", 1, "tiny")
    assert "parts" not in one  # parts only when asked
    assert one["global_batch"] == 4 and one["shardings"]["images_per_device"][0] == 1
    assert tiny["hbm_per_device_bytes"] > one["hbm_per_device_bytes"]
    assert tiny["flops_per_batch"] == pytest.approx(2 * one["flops_per_batch"], rel=0.1)


def test_costs_of_a_program_that_loops_come_from_a_loop_free_recompile():
    """On v5e-8 the TPU compiler turns an FSDP weight gather feeding a matmul into a collective
    matmul, a loop over the ring whose body XLA's cost analysis counts once (T5-XXL at 5
    images per chip); the costs then come from a recompile without windowed einsums."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = topology_devices("v5e:2x4")
    mesh = Mesh(np.array(devices), ("fsdp",))
    tokens, k, n = 1500, 2048, 4096  # per device; the weight split over the 8 chips by rows
    x = jax.ShapeDtypeStruct((8 * tokens, k), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
    w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
    lowered = jax.jit(lambda x, w: x @ w).lower(x, w)
    compiled = lowered.compile()
    assert while_loops(compiled) >= 1
    counted = analyse(compiled, devices[0])["flops_per_step"]
    assert counted < 2 * tokens * k * n  # one trip of the loop
    r = cache.program_costs(lowered, compiled, devices[0], 8, 8)
    assert r["costs_from"].startswith("recompiled") and r["while_loops"] >= 1
    assert r["flops_per_batch"] == 2 * tokens * k * n  # every product counted
    assert r["collective_bytes_per_batch"] == k * n * 2  # the whole weight gathered, once
    assert r["hbm_per_device_bytes"] == analyse(compiled, devices[0])["hbm_per_device_bytes"]


@pytest.mark.parametrize("fixed, per_image, start, limit, expected", [
    (10.0, 1.0, 1, 256, 5), (10.0, 1.0, 4, 256, 5), (2.0, 0.3, 1, 256, 46),
    (15.5, 1.0, 2, 256, 0), (15.0, 1.0, 4, 256, 1), (1.0, 0.0, 2, 64, 64),
    (1.0, 0.001, 1, 8, 8), (10.0, 2.0, 16, 256, 2)])
def test_largest_fitting_predicts_then_confirms(fixed, per_image, start, limit, expected):
    calls = []

    def measure(n):
        calls.append(n)
        hbm = fixed + per_image * n + (0.05 if n % 3 == 0 else 0.0)  # nearly linear (16.05 at 6)
        return {"fits": hbm <= 16.0, "hbm_per_device_bytes": hbm, "hbm_capacity_bytes": 16.0}

    best, tried = cache.largest_fitting(measure, start=start, limit=limit)
    assert best == expected and tried == calls and len(set(calls)) == len(calls)
    if best:
        assert measure(best)["fits"] and (best == limit or not measure(best + 1)["fits"])
    if per_image >= 0.3 and best > 1:
        assert len(tried) <= 6, tried  # a handful of compiles, not a bisection from scratch


def test_max_batch_search_reports_the_answer_with_its_parts(monkeypatch):
    calls = []

    def fake(topology, n, variant, *, parts=False, costs=True, mesh=None):
        calls.append((n, parts, costs))
        hbm = (3.0 + 2.5 * n) * 2**30
        return {"fits": hbm <= 16 * 2**30, "hbm_per_device_bytes": int(hbm),
                "hbm_capacity_bytes": 16 * 2**30, "per_device_batch": n,
                **({"parts": {}} if parts else {})}

    monkeypatch.setattr(cache, "compile_report", fake)
    r = cache.report("v5e:2x4", 2, max_batch=True, variant="tiny")
    assert r["max_per_device_batch"] == 5 == r["per_device_batch"] and "parts" in r
    # the search compiles for memory only; the answer once more with its costs and parts
    assert calls[-1] == (5, True, True) and all(not p and not c for _, p, c in calls[:-1])
    assert [s["fits"] for s in r["search"]] == [s["per_device_batch"] <= 5 for s in r["search"]]
    monkeypatch.setattr(cache, "compile_report", lambda *a, **k: {
        "fits": False, "hbm_per_device_bytes": 40 * 2**30, "hbm_capacity_bytes": 16 * 2**30})
    with pytest.raises(ValueError, match="does not fit on v5e:2x4 even at one image"):
        cache.report("v5e:2x4", 4, max_batch=True, variant="tiny")


def test_the_command_line_arguments():
    parser = argparse.ArgumentParser()
    cache.add_arguments(parser)
    assert parser.parse_args(["--cache", "sdxl_t5xxl_1024"]).cache == "sdxl_t5xxl_1024"
    with pytest.raises(SystemExit):
        parser.parse_args(["--cache", "sdxl_t5xxl_512"])
    with pytest.raises(ValueError, match="unknown cache variant 'nope'"):
        cache.compile_report("v5e:2x2", 1, "nope")
    standalone = argparse.ArgumentParser()
    cache.add_arguments(standalone, standalone=True)
    args = standalone.parse_args(["tiny", "--topology", "v5e:2x2", "--max-batch"])
    assert (args.cache, args.topology, args.batch, args.max_batch) == ("tiny", "v5e:2x2", None,
                                                                        True)


@pytest.mark.slow
def test_jdit_aot_cache_command(capsys):
    from jdit.cli import main

    assert main(["aot", "--cache", "tiny", "--topology", "v5e:2x2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["variant"] == "tiny" and report["fits"]
    with pytest.raises(SystemExit, match="exactly one of"):
        main(["aot", "--cache", "tiny", "--pipeline", "tiny", "--topology", "v5e:2x2"])
