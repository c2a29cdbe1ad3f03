"""Device meshes from config: axes ``data``, ``fsdp``, ``tensor`` and optionally ``context``.

``parallel.mesh = dict(data=-1, fsdp=1, tensor=1)``: one entry may be ``-1`` and takes the devices
left over. The mesh uses ``Auto`` axes: parameters and activations carry logical names, a rule
table (:mod:`jdit.parallel.rules`) maps them onto these axes and XLA's partitioner does the rest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "context")


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolve ``-1`` and check that the axis sizes multiply to ``num_devices``."""
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"parallel.mesh: unknown axes {unknown}; expected some of {MESH_AXES}")
    sizes = {a: int(spec[a]) for a in MESH_AXES if a in spec}
    sizes.setdefault("data", -1 if -1 not in sizes.values() else 1)
    for a in ("fsdp", "tensor"):
        sizes.setdefault(a, 1)
    free = [a for a, n in sizes.items() if n == -1]
    if len(free) > 1:
        raise ValueError(f"parallel.mesh: only one axis may be -1, got {free}")
    if any(n < 1 and n != -1 for n in sizes.values()):
        raise ValueError(f"parallel.mesh: axis sizes must be >= 1 or -1, got {sizes}")
    fixed = math.prod(n for n in sizes.values() if n != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"parallel.mesh {sizes}: {num_devices} devices are not divisible by "
                             f"the fixed axes' product {fixed}")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"parallel.mesh {sizes} needs {fixed} devices, but {num_devices} are "
                         "available (use -1 on one axis to take the rest)")
    return {a: sizes[a] for a in MESH_AXES if a in sizes}


def make_mesh(spec: Mapping[str, int] | None = None,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all devices of all processes), laid out by
    :func:`jax.make_mesh` so neighbouring mesh coordinates are neighbouring chips on a TPU."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(dict(spec or {}), len(devices))
    names = tuple(shape)
    sizes = tuple(shape.values())
    types = (AxisType.Auto,) * len(names)
    try:
        return jax.make_mesh(sizes, names, axis_types=types, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # Device kinds without a known physical layout (e.g. a subset of CPU devices).
        return Mesh(np.asarray(devices).reshape(sizes), names, axis_types=types)
