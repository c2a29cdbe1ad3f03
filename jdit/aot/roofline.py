"""Per-chip figures of TPU generations and the roofline of a compiled program.

``analyse(compiled, device)`` reads ``memory_analysis()`` (arguments + outputs + temporaries,
minus outputs that reuse donated arguments) and ``cost_analysis()`` (FLOPs and HBM bytes per
device) and turns them into a roofline: ``max(flops / peak, bytes / HBM bandwidth, collective
bytes / ICI bandwidth)``. XLA's cost analysis counts a ``while`` loop's body once, so costs are
per step only when the program has no loop over layers (compile with ``scan_layers=False``)
and no collective matmul loops: :func:`loop_free_analysis` recompiles without the latter.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

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
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")


def collective_bytes(hlo_text: str) -> int:
    """Bytes produced by cross-device collectives in a compiled module (an estimate: results
    only, loop bodies once). Combined collectives return tuples: every element counts; async
    ``*-start`` ops return (operands, results), of which the results count (all-reduce-start
    returns just its results). A collective that the TPU compiler splits into async pieces (a
    start, continuation fusions, a done: each holds a copy of the op) counts once, by its
    ``channel_id``."""
    total = 0
    channels: set[str] = set()
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        channel = _CHANNEL.search(line)
        if channel:
            if channel.group(1) in channels:
                continue
            channels.add(channel.group(1))
        shapes = _SHAPE.findall(m.group(1))
        if m.group(3) and m.group(2) != "all-reduce":
            shapes = shapes[len(shapes) // 2:]
        for dtype, dims in shapes:
            bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype) or 32)
            total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


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


_OOM = re.compile(r"required for .*?\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def oom_figures(error: str, device: Any) -> dict[str, Any]:
    """What the compiler's out-of-memory message says: needed and available GiB."""
    chip, fraction = chip_of(device)
    m = _OOM.search(error)
    needed = int(float(m.group(1)) * GiB) if m else None
    return {"chip": chip.name, "hbm_per_device_bytes": needed,
            "hbm_capacity_bytes": int(chip.hbm_bytes * fraction),
            "hbm_available_per_compiler_bytes": int(float(m.group(2)) * GiB) if m else None}


# XLA flags of the costs-only recompile of a program that loops (see loop_free_analysis)
NO_WINDOWED_EINSUM = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                      "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
_WHILE = re.compile(r"\swhile\(")
UNDERCOUNT = "as compiled: loop bodies counted once (an undercount)"


def while_loops(compiled: Any) -> int:
    """``while`` loops in a compiled program (XLA's cost analysis counts their bodies once)."""
    return len(_WHILE.findall(compiled.as_text()))


def loop_free_analysis(lowered: Any, compiled: Any, device: Any
                       ) -> tuple[dict[str, Any], int, str]:
    """:func:`analyse` of ``compiled``, its ``while`` loops, and where its costs come from.

    Once the batch is large enough, the TPU compiler turns FSDP weight gathers and gradient
    reductions into collective matmuls (windowed einsums: a loop over the ring) whose bodies
    the cost analysis counts once. A program that loops is then recompiled without them (the
    same products and the same bytes over the ICI, every step counted) for its costs; memory
    stays that of the program as compiled. A recompile that still loops, or that the compiler
    refuses, leaves the costs as compiled (and says so)."""
    figures, loops = analyse(compiled, device), while_loops(compiled)
    if not loops:
        return figures, 0, "as compiled"
    try:
        loop_free = lowered.compile(compiler_options=NO_WINDOWED_EINSUM)
    except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory is expected
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return figures, loops, UNDERCOUNT
    if while_loops(loop_free):
        return figures, loops, UNDERCOUNT
    memory = {k: figures[k] for k in ("hbm_per_device_bytes", "hbm_capacity_bytes", "fits",
                                      "memory")}
    return ({**analyse(loop_free, device), **memory}, loops,
            "recompiled without windowed einsums (loop-free)")
