"""``jdit bench kernels``: the Pallas kernels against the XLA attention they replace, compiled for
a TPU (libtpu; no TPU needed): per-device FLOPs and HBM bytes from ``cost_analysis()`` and the
roofline time on that chip, forward and forward + backward, bfloat16, one example per device.

Inputs and outputs are shaped as the models hold them: q, k, v are the (B, L, H·D) outputs of
the projections and the result goes on to the output projection as (B, L, H·D). On a TPU the
memory layout of such an array is the compiler's choice, and it matters: XLA's einsums want the
token axis minor, the kernels want it major, and converting costs a full pass over the array.
Inside a model the projections can write whichever layout their consumer wants. So each case is
compiled twice: with the arguments and result pinned to the row-major layout (``bytes``; what a
projection writes by default) and with the layouts left to the compiler (``bytes_auto``; it
picks them for the whole program, often in XLA's favour).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

CASES: dict[str, dict[str, Any]] = {
    # PixArt-Σ XL 1024 self-attention with 2x2 KV compression; without; SANA-1.6B cross-attention
    "pixart_kv_compressed": dict(kind="softmax", lq=4096, lk=1024, heads=16, dim=72),
    "pixart_full": dict(kind="softmax", lq=4096, lk=4096, heads=16, dim=72),
    "sana_cross": dict(kind="softmax", lq=4096, lk=300, heads=70, dim=32),
    "sana_linear": dict(kind="linear", lq=4096, lk=4096, heads=70, dim=32, chunk=None),
    "sana_linear_chunked": dict(kind="linear", lq=4096, lk=4096, heads=70, dim=32, chunk=256),
}


def _compile(topology: str, case: dict[str, Any], impl: str) -> dict[str, float]:
    from jax.experimental import topologies
    from jax.experimental.layout import Format, Layout
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from pallas_kernels import flash_attention, linear_attention, reference

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    n = len(devices)
    mesh = jax.make_mesh((n,), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    spec = P("data")

    def sds(*shape: int, dtype: Any = jnp.bfloat16) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((n, *shape), dtype, sharding=NamedSharding(mesh, spec))

    h, d = case["heads"], case["dim"]
    q, k = sds(case["lq"], h * d), sds(case["lk"], h * d)
    if case["kind"] == "softmax":
        inner: Callable[..., jax.Array] = (
            (lambda q, k, v, m: flash_attention(q, k, v, kv_mask=m)) if impl == "pallas"
            else (lambda q, k, v, m: reference.flash_attention(q, k, v, kv_mask=m)))
        args = (q, k, k, sds(case["lk"], dtype=jnp.int32))
    else:
        chunk = case["chunk"]
        inner = ((lambda q, k, v: linear_attention(q, k, v, chunk_size=chunk))
                 if impl == "pallas"
                 else (lambda q, k, v: reference.linear_attention(q, k, v, chunk_size=chunk)))
        args = (q, k, k)

    def fn(q: jax.Array, k: jax.Array, v: jax.Array, *mask: jax.Array) -> jax.Array:
        def heads(x: jax.Array) -> jax.Array:
            return x.reshape(*x.shape[:2], h, d)

        out = inner(heads(q), heads(k), heads(v), *mask)
        return out.reshape(*out.shape[:2], h * d)

    attend = jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec,
                           check_vma=False)

    def loss(*a: jax.Array) -> jax.Array:
        return jnp.sum(attend(*a).astype(jnp.float32))

    def row_major(x: jax.ShapeDtypeStruct) -> Format:
        return Format(Layout(major_to_minor=tuple(range(len(x.shape)))), x.sharding)

    grads = jax.grad(loss, argnums=(0, 1, 2))
    out = {}
    for name, f, result in (("fwd", attend, [row_major(q)]), ("fwd_bwd", grads, [row_major(q)] * 3)):
        pinned = jax.jit(f, in_shardings=tuple(row_major(a) for a in args),
                         out_shardings=result[0] if name == "fwd" else tuple(result))
        cost = pinned.lower(*args).compile().cost_analysis()
        out[f"{name}_flops"] = float(cost.get("flops", 0.0))
        out[f"{name}_bytes"] = float(cost.get("bytes accessed", 0.0))
        cost = jax.jit(f).lower(*args).compile().cost_analysis()
        out[f"{name}_bytes_auto"] = float(cost.get("bytes accessed", 0.0))
    return out


def run(topology: str = "v5e:2x2", cases: tuple[str, ...] = tuple(CASES)) -> dict[str, Any]:
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jdit.aot.roofline import chip_of, topology_devices

    chip, fraction = chip_of(topology_devices(topology)[0])
    peak, bandwidth = chip.peak_flops * fraction, chip.hbm_bandwidth * fraction
    rows = []
    for name in cases:
        row: dict[str, Any] = {"case": name, **CASES[name]}
        for impl in ("xla", "pallas"):
            costs = _compile(topology, CASES[name], impl)
            for part in ("fwd", "fwd_bwd"):
                f, b = costs[f"{part}_flops"], costs[f"{part}_bytes"]
                row[f"{impl}_{part}_bytes"] = b
                row[f"{impl}_{part}_bytes_auto"] = costs[f"{part}_bytes_auto"]
                row[f"{impl}_{part}_flops"] = f
                row[f"{impl}_{part}_roofline_us"] = 1e6 * max(f / peak, b / bandwidth)
        for part in ("fwd", "fwd_bwd"):
            for sfx in ("", "_auto"):
                row[f"{part}_bytes{sfx}_ratio_xla_over_pallas"] = (
                    row[f"xla_{part}_bytes{sfx}"] / max(row[f"pallas_{part}_bytes{sfx}"], 1.0))
        print(f"{name}: HBM bytes xla/pallas fwd {row['fwd_bytes_ratio_xla_over_pallas']:.1f}x, "
              f"fwd+bwd {row['fwd_bwd_bytes_ratio_xla_over_pallas']:.1f}x (compiler's layouts: "
              f"{row['fwd_bwd_bytes_auto_ratio_xla_over_pallas']:.1f}x); roofline fwd+bwd "
              f"{row['xla_fwd_bwd_roofline_us']:.0f} -> {row['pallas_fwd_bwd_roofline_us']:.0f} us",
              file=sys.stderr)
        rows.append(row)
    return {"topology": topology, "chip": chip.name, "rows": rows}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topology", default="v5e:2x2")


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    emit(run(args.topology))
    return 0
