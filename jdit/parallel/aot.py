"""Ahead-of-time compilation for a TPU pod, without the pod: does a recipe fit, how fast can it be?

    jdit aot --config configs/pixart_sigma_xl2_1024.py --topology v5p:4x4x4 [--max-batch]

libtpu (the ``tpu`` extra) describes real TPU topologies on any machine; the train step (and
optionally the sampler) is lowered with the run's shardings and compiled for those devices. The
report reads ``memory_analysis()`` (arguments + outputs + temporaries, minus outputs that reuse
donated arguments) and ``cost_analysis()`` (FLOPs and HBM bytes per device) and turns them into a
roofline: ``max(flops / peak, bytes / HBM bandwidth, collective bytes / ICI bandwidth)``.

XLA's cost analysis counts a ``while`` loop's body once, so the report compiles the blocks
unrolled (``scan_layers=False``) unless told otherwise: the costs are then per step, not per
loop iteration. The memory figures are those of the program as compiled.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (bf16 dense peak, HBM, HBM and ICI bandwidth)."""

    name: str
    peak_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    ici_bandwidth: float
    cores_per_chip: int


# Keyed by ``device.device_kind``. Sources: the Cloud TPU system-architecture pages (v4, v5e,
# v5p, v6e); ICI is the per-chip aggregate, in bytes/s.
CHIPS: dict[str, Chip] = {
    "TPU v4": Chip("v4", 275e12, 32 * GiB, 1228e9, 2400e9 / 8, 2),
    "TPU v5 lite": Chip("v5e", 197e12, 16 * GiB, 819e9, 1600e9 / 8, 1),
    "TPU v5": Chip("v5p", 459e12, 95 * GiB, 2765e9, 4800e9 / 8, 2),
    "TPU v6 lite": Chip("v6e", 918e12, 32 * GiB, 1640e9, 3584e9 / 8, 1),
}

# Used when a config holds only a model (e.g. configs/pixart_sigma_xl2_1024.py): what a TPU
# training run of it would look like (bfloat16, full remat, the Pallas flash-attention kernel,
# AdamW, FSDP over every chip, 8 examples per chip). Reported under "assumed".
TRAIN_DEFAULTS: dict[str, Any] = {
    "model": {"dtype": "bfloat16", "remat_policy": "full", "attention_impl": "pallas"},
    "diffusion": {"objective": "ddpm", "schedule": "linear"},
    "optim": {"name": "adamw", "lr": 2e-5, "weight_decay": 3e-2, "grad_clip": 0.01,
              "warmup_steps": 1000, "schedule": "constant"},
    "train": {"steps": 100_000, "seed": 0, "ema_decay": 0.9999, "cond_dropout": 0.1,
              "per_device_batch": 8},  # within the official recipes' per-GPU 2-12 at 1024
    "parallel": {"mesh": {"data": 1, "fsdp": -1, "tensor": 1}, "rules": "fsdp"},
}


def topology_devices(topology: str) -> list[Any]:
    """The devices of a TPU topology such as ``v5p:4x4x4`` (needs libtpu: ``pip install
    jdit[tpu]``)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu's lock file
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # noqa: BLE001 - libtpu missing or a bad name: say which
        raise RuntimeError(f"cannot describe TPU topology {topology!r} ({e}); it needs libtpu "
                           "(pip install 'jdit[tpu]') and a name like v5e:2x2, v5p:4x4x4, "
                           "v6e:4x4") from None
    return list(desc.devices)


def chip_of(device: Any) -> tuple[Chip, float]:
    """The chip table entry and the fraction of a chip one device is (v4 devices are cores)."""
    try:
        chip = CHIPS[device.device_kind]
    except KeyError:
        raise ValueError(f"no figures for device kind {device.device_kind!r}; known: "
                         f"{sorted(CHIPS)}") from None
    return chip, getattr(device, "num_cores", chip.cores_per_chip) / chip.cores_per_chip


_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(-start)?\(")
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16}


def collective_bytes(hlo_text: str) -> int:
    """Bytes produced by cross-device collectives in a compiled module (an estimate: results
    only, loop bodies once). Combined collectives return tuples: every element counts; async
    ``*-start`` ops return (operands, results), of which the results count (all-reduce-start
    returns just its results)."""
    total = 0
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        shapes = _SHAPE.findall(m.group(1))
        if m.group(3) and m.group(2) != "all-reduce":
            shapes = shapes[len(shapes) // 2:]
        for dtype, dims in shapes:
            bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype) or 32)
            total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


def with_defaults(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A full training config from ``config``; the second value lists what was assumed."""
    c = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.items()}
    if "model" not in c:
        raise ValueError("the config has no 'model' section")
    assumed: dict[str, Any] = {}
    model_only = "train" not in c
    for section, values in TRAIN_DEFAULTS.items():
        if section == "model":
            if model_only:  # model presets say float32 / no remat: not how a pod trains
                c["model"].update(values)
                assumed["model"] = values
            continue
        if section not in c:
            c[section] = dict(values)
            if section == "diffusion" and c["model"].get("family") == "sana":  # flow models
                c[section] = {"objective": "flow", "flow_shift": float(c.get("flow_shift", 3.0)),
                              "timestep_sampler": "logit_normal"}
            assumed[section] = c[section]
    return c, assumed


def example_batch(module: Any, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of a training batch for ``module`` (images at its training size)."""
    inputs = jax.eval_shape(lambda: module.example_inputs(
        batch, **({"caption_length": 300} if hasattr(module, "caption_channels") else {})))
    out = {"images": inputs["x"]}
    for k in ("context", "context_mask", "resolution", "aspect_ratio", "labels"):
        if k in inputs:
            out[k] = inputs[k]
    if "context" not in inputs and "labels" not in inputs:
        out["labels"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return out


def report(config: Mapping[str, Any], topology: str, per_device_batch: int | None = None, *,
           caption_length: int | None = None, sampler: bool = False,
           scan_layers: bool | None = False) -> dict[str, Any]:
    """Compile the train step for ``topology`` and report memory, costs and the roofline."""

    from jdit.models import build
    from jdit.parallel.partition import Partitioner
    from jdit.train.optim import learning_rate, make_optimizer
    from jdit.train.step import init_state, make_train_step

    devices = topology_devices(topology)
    c, assumed = with_defaults(config)
    if scan_layers is not None:
        c["model"]["scan_layers"] = scan_layers
    part = Partitioner.from_config(c["parallel"], devices)
    if per_device_batch is None:
        per_device_batch = int(c["train"].get("per_device_batch") or max(
            1, int(c["train"].get("batch_size", part.batch_shards)) // part.batch_shards))
    global_batch = per_device_batch * part.batch_shards
    module = build(c["model"])
    steps = int(c["train"]["steps"])
    tx = make_optimizer(c["optim"], steps)
    lr = learning_rate(c["optim"], steps)
    batch = example_batch(module, global_batch)
    if caption_length is not None and "context" in batch:
        b, _, d = batch["context"].shape
        batch["context"] = jax.ShapeDtypeStruct((b, caption_length, d), jnp.float32)
        batch["context_mask"] = jax.ShapeDtypeStruct((b, caption_length), jnp.int32)
    null = None
    if "context" in batch:
        _, length, dim = batch["context"].shape
        null = (jnp.zeros((1, length, dim), jnp.float32), jnp.ones((1, length), jnp.int32))

    shardings = part.state_shardings(module, tx)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(lambda: init_state(module, tx, 0)), shardings)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                              sharding=part.batch_sharding(len(v.shape)))
                      for k, v in batch.items()}
    step = jax.jit(make_train_step(module, tx, lr, c, null),
                   in_shardings=(shardings, {k: v.sharding for k, v in abstract_batch.items()}),
                   out_shardings=(shardings, part.replicated), donate_argnums=0)
    t0 = time.perf_counter()
    try:
        with part.activate():
            compiled = step.lower(abstract_state, abstract_batch).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled = None  # the compiler itself found that it does not fit in HBM
        error = str(e)
    compile_seconds = time.perf_counter() - t0
    if compiled is None:
        return {"topology": topology, "devices": len(devices), "per_device_batch": per_device_batch,
                "global_batch": global_batch, "fits": False, **_oom_figures(error, devices[0]),
                "compile_seconds": round(compile_seconds, 1), "error": error.splitlines()[0][:500]}
    out = {
        "topology": topology, "devices": len(devices), "device_kind": devices[0].device_kind,
        "mesh": {k: int(v) for k, v in part.mesh.shape.items()}, "rules": c["parallel"].get("rules", "fsdp"),
        "per_device_batch": per_device_batch, "global_batch": global_batch,
        "tokens_per_example": _tokens(module),
        "parameters": int(sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_state.params))),
        "dtype": str(c["model"].get("dtype")), "remat_policy": c["model"].get("remat_policy"),
        "scan_layers": bool(c["model"].get("scan_layers")), "optimizer": c["optim"].get("name"),
        **analyse(compiled, devices[0]), "compile_seconds": round(compile_seconds, 1),
    }
    if assumed:
        out["assumed"] = assumed
    if sampler:
        out["sampler"] = sampler_report(module, part, c, abstract_state.params, batch)
    return out


_OOM = re.compile(r"required for .*?\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def _oom_figures(error: str, device: Any) -> dict[str, Any]:
    """What the compiler's out-of-memory message says: needed and available GiB."""
    chip, fraction = chip_of(device)
    m = _OOM.search(error)
    needed = int(float(m.group(1)) * GiB) if m else None
    return {"chip": chip.name, "hbm_per_device_bytes": needed,
            "hbm_capacity_bytes": int(chip.hbm_bytes * fraction),
            "hbm_available_per_compiler_bytes": int(float(m.group(2)) * GiB) if m else None}


def _tokens(module: Any) -> int | None:
    size, patch = getattr(module, "input_size", None), getattr(module, "patch_size", None)
    return None if size is None or patch is None else (size // patch) ** 2


def analyse(compiled: Any, device: Any) -> dict[str, Any]:
    """Memory, cost and roofline figures of a compiled program, per device."""
    chip, fraction = chip_of(device)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hbm = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes)
    capacity = chip.hbm_bytes * fraction
    flops, hbm_traffic = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    comm = collective_bytes(compiled.as_text())
    peak, bandwidth, ici = (chip.peak_flops * fraction, chip.hbm_bandwidth * fraction,
                            chip.ici_bandwidth * fraction)
    times = {"compute": flops / peak, "hbm": hbm_traffic / bandwidth, "ici": comm / ici}
    roofline = max(times.values())
    return {
        "chip": chip.name,
        "hbm_per_device_bytes": int(hbm),
        "hbm_capacity_bytes": int(capacity),
        "fits": bool(hbm <= capacity),
        "memory": {"arguments": int(mem.argument_size_in_bytes),
                   "outputs": int(mem.output_size_in_bytes),
                   "temporaries": int(mem.temp_size_in_bytes),
                   "aliased": int(mem.alias_size_in_bytes)},
        "flops_per_step": flops,
        "bytes_per_step": hbm_traffic,
        "collective_bytes_per_step": comm,
        "peak_flops_per_device": peak,
        "roofline_seconds": {k: v for k, v in times.items()},
        "roofline_step_seconds": roofline,
        "roofline_bound_by": max(times, key=times.get),
        "roofline_mfu_bound": (times["compute"] / roofline) if roofline > 0 else 0.0,
    }


def sampler_report(module: Any, part: Any, c: Mapping[str, Any], abstract_params: Any,
                   batch: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, Any]:
    """Compile the 20-step CFG sampler (``sample`` config or dpm++2m) for the same mesh."""
    from jdit.sampling import ClassifierFreeGuidance, sample
    from jdit.train.step import make_schedule

    schedule = make_schedule(c["diffusion"])
    sc = dict(c.get("sample", {}))
    images = batch["images"]
    b = images.shape[0]
    text = "context" in batch

    def model_fn(x, t, params, *cond):
        if text:
            return module.apply({"params": params}, x, t, context=cond[0], context_mask=cond[1])
        return module.apply({"params": params}, x, t, labels=cond[0])

    guided = ClassifierFreeGuidance(model_fn)
    prediction = "flow" if c["diffusion"].get("objective") == "flow" else "epsilon"

    def run(params, noise, *cond):
        cond2 = tuple(jnp.concatenate([x, x]) for x in cond)  # null half: the same shapes
        return sample(guided, noise, solver=sc.get("solver", "dpm++2m"),
                      num_steps=int(sc.get("steps", 20)), schedule=schedule,
                      prediction=prediction, args=(jnp.float32(4.5), params) + cond2)

    keys = ("context", "context_mask") if text else ("labels",)
    cond = [jax.ShapeDtypeStruct(batch[k].shape, batch[k].dtype,
                                 sharding=part.batch_sharding(len(batch[k].shape))) for k in keys]
    noise = jax.ShapeDtypeStruct(images.shape, jnp.float32,
                                 sharding=part.batch_sharding(len(images.shape)))
    t0 = time.perf_counter()
    with part.activate():
        compiled = jax.jit(run).lower(abstract_params, noise, *cond).compile()
    seconds = time.perf_counter() - t0
    out = analyse(compiled, part.mesh.devices.flat[0])
    steps = int(sc.get("steps", 20))
    # The solver loop is a while loop: its cost is counted once; scale to all steps.
    for k in ("flops_per_step", "bytes_per_step"):
        out[k.replace("_per_step", "_per_image_batch")] = out.pop(k) * steps
    out.update(batch=b, num_steps=steps, compile_seconds=round(seconds, 1))
    return out


def max_batch(config: Mapping[str, Any], topology: str, *, start: int = 1, limit: int = 4096,
              **kwargs: Any) -> dict[str, Any]:
    """The largest per-device batch whose train step fits in HBM.

    Memory grows linearly with the batch, so two compiles (``start`` and ``2 * start``) predict
    the answer; compiles at and next to the prediction confirm it (about four compiles where
    bisection needs eight or more, and each compile of an XL model for a pod takes minutes).
    """
    tried: list[dict[str, Any]] = []
    results: dict[int, dict[str, Any]] = {}

    def fits(b: int) -> bool:
        if b not in results:
            r = report(config, topology, b, **kwargs)
            results[b] = r
            need = r["hbm_per_device_bytes"]
            print(f"  per-device batch {b}: "
                  f"{'?' if need is None else f'{need / GiB:.2f}'} GiB "
                  f"({'fits' if r['fits'] else 'does not fit'}; compiled in "
                  f"{r.get('compile_seconds', 0):.0f} s)", file=sys.stderr, flush=True)
            tried.append({"per_device_batch": b, "fits": r["fits"],
                          "hbm": r["hbm_per_device_bytes"]})
        return bool(results[b]["fits"])

    b = max(1, min(start, limit))
    while not fits(b):
        if b == 1:
            need = results[1]["hbm_per_device_bytes"]
            raise ValueError(f"not even a per-device batch of 1 fits on {topology}"
                             + ("" if need is None else f": {need / GiB:.1f} GiB needed"))
        b //= 2
    lo, hi = b, None  # lo fits; hi (if known) does not
    if b < limit:
        b2 = min(2 * b, limit)
        if fits(b2):
            h1, h2 = results[b]["hbm_per_device_bytes"], results[b2]["hbm_per_device_bytes"]  # fit: known
            per_example = (h2 - h1) / (b2 - b)
            cap = results[b]["hbm_capacity_bytes"]
            guess = limit if per_example <= 0 else b + int((cap - h1) // per_example)
            lo, guess = b2, max(b2, min(guess, limit))
            if guess > lo and not fits(guess):
                hi, step = guess, 1  # just over: gallop downwards from the prediction
                while hi - step > lo and not fits(hi - step):
                    hi, step = hi - step, step * 2
                if hi - step > lo:
                    lo = hi - step
            else:
                lo, step = guess, 1  # it fitted: gallop upwards until something does not
                while hi is None and lo + step <= limit:
                    if fits(lo + step):
                        lo, step = lo + step, step * 2
                    else:
                        hi = lo + step
        else:
            hi = b2
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    b = lo
    return {**results[b], "max_per_device_batch": b, "search": tried}


__all__ = ["CHIPS", "Chip", "analyse", "collective_bytes", "max_batch", "report",
           "topology_devices", "with_defaults", "np"]
