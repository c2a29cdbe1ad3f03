"""``jdit bench kernels``: the Pallas kernels against the XLA attention they replace, compiled for
a TPU (libtpu; no TPU needed): per-device FLOPs and HBM bytes from ``cost_analysis()`` and the
roofline time on that chip, forward and forward + backward, bfloat16, one example per device.
"""

from __future__ import annotations

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
    q, k = sds(case["lq"], h, d), sds(case["lk"], h, d)
    if case["kind"] == "softmax":
        fn: Callable[..., jax.Array] = (
            (lambda q, k, v, m: flash_attention(q, k, v, kv_mask=m)) if impl == "pallas"
            else (lambda q, k, v, m: reference.flash_attention(q, k, v, kv_mask=m)))
        args = (q, k, k, sds(case["lk"], dtype=jnp.int32))
    else:
        chunk = case["chunk"]
        fn = ((lambda q, k, v: linear_attention(q, k, v, chunk_size=chunk)) if impl == "pallas"
              else (lambda q, k, v: reference.linear_attention(q, k, v, chunk_size=chunk)))
        args = (q, k, k)
    attend = jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec,
                           check_vma=False)

    def loss(*a: jax.Array) -> jax.Array:
        return jnp.sum(attend(*a).astype(jnp.float32))

    out = {}
    for name, f in (("fwd", attend), ("fwd_bwd", jax.grad(loss, argnums=(0, 1, 2)))):
        cost = jax.jit(f).lower(*args).compile().cost_analysis()
        out[f"{name}_flops"] = float(cost.get("flops", 0.0))
        out[f"{name}_bytes"] = float(cost.get("bytes accessed", 0.0))
    return out


def run(topology: str = "v5e:2x2", cases: tuple[str, ...] = tuple(CASES)) -> dict[str, Any]:
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jdit.parallel.aot import chip_of, topology_devices

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
                row[f"{impl}_{part}_flops"] = f
                row[f"{impl}_{part}_roofline_us"] = 1e6 * max(f / peak, b / bandwidth)
        for part in ("fwd", "fwd_bwd"):
            row[f"{part}_bytes_ratio_xla_over_pallas"] = (row[f"xla_{part}_bytes"]
                                                          / max(row[f"pallas_{part}_bytes"], 1.0))
        print(f"{name}: HBM bytes xla/pallas fwd {row['fwd_bytes_ratio_xla_over_pallas']:.1f}x, "
              f"fwd+bwd {row['fwd_bwd_bytes_ratio_xla_over_pallas']:.1f}x; roofline fwd+bwd "
              f"{row['xla_fwd_bwd_roofline_us']:.0f} -> {row['pallas_fwd_bwd_roofline_us']:.0f} us",
              file=sys.stderr)
        rows.append(row)
    return {"topology": topology, "chip": chip.name, "rows": rows}
