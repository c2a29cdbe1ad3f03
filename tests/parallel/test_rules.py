"""Mesh shapes, rule tables and logical -> mesh specs (one device; no arrays sharded)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jdit.parallel import RULE_TABLES, Partitioner, mesh_shape, rules_for, spec_for


def abstract_mesh(**sizes: int) -> Mesh:
    """A mesh of the given shape over copies of the one CPU device (specs only, no arrays)."""
    devices = np.array([jax.devices()[0]] * int(np.prod(list(sizes.values())))).reshape(
        tuple(sizes.values()))
    return Mesh(devices, tuple(sizes))


def test_mesh_shape_fills_minus_one_and_checks_the_device_count():
    assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 16) == {"data": 4, "fsdp": 2, "tensor": 2}
    assert mesh_shape({}, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert mesh_shape({"fsdp": -1}, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert mesh_shape({"data": 2, "context": -1}, 8)["context"] == 4
    with pytest.raises(ValueError, match="needs 8 devices, but 4"):
        mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 4)
    with pytest.raises(ValueError, match="only one axis may be -1"):
        mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="unknown axes \\['model'\\]"):
        mesh_shape({"model": 2}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        mesh_shape({"data": -1, "tensor": 3}, 8)


def test_rules_drop_axes_the_mesh_lacks():
    mesh = abstract_mesh(data=2, fsdp=2, tensor=1)
    rules = dict(rules_for("fsdp_tp", mesh))
    assert rules["batch"] == ("data", "fsdp") and rules["length"] is None
    with_context = dict(rules_for("fsdp", abstract_mesh(data=1, fsdp=2, tensor=1, context=2)))
    assert with_context["length"] == "context"
    with pytest.raises(ValueError, match="unknown table 'zero3'"):
        rules_for("zero3", mesh)


def test_specs_follow_the_table_and_replicate_indivisible_dims():
    mesh = abstract_mesh(data=1, fsdp=4, tensor=2)
    rules = rules_for("fsdp_tp", mesh)
    assert spec_for(("embed", None, "heads", "kv"), (1152, 3, 16, 72), rules, mesh) == P(
        "fsdp", None, "tensor", None)
    assert spec_for(("mlp", "embed"), (4608, 1152), rules, mesh) == P("tensor", "fsdp")
    assert spec_for(("classes", "embed"), (1001, 1152), rules, mesh) == P(None, "fsdp")
    assert spec_for(("embed",), (6,), rules, mesh) == P(None)  # 6 rows over 4 devices: replicated
    assert spec_for(("batch", "length"), (8, 256), rules, mesh) == P(("data", "fsdp"), None)
    assert spec_for(None, (3,), rules, mesh) == P()
    with pytest.raises(ValueError, match="do not match an array of shape"):
        spec_for(("embed",), (4, 4), rules, mesh)
    for name, table in RULE_TABLES.items():  # every table names only known axes
        assert {a for _, axes in table for a in ((axes,) if isinstance(axes, str) else axes or ())} \
            <= {"data", "fsdp", "tensor", "context"}, name


def test_partitioner_errors_are_clear():
    with pytest.raises(ValueError, match="unknown keys \\['mesh_shape'\\]"):
        Partitioner.from_config({"mesh_shape": {}})
    part = Partitioner.from_config({"mesh": {"data": -1}})
    assert part.batch_shards == jax.device_count()
    assert part.local_rows(4) == (0, 4)


def test_models_run_unchanged_without_a_mesh_and_under_one():
    """Activation constraints are no-ops without rules, and harmless on a 1-device mesh."""
    from jdit.models import build, init_params

    m = build(dict(family="pixart", input_size=8, patch_size=2, in_channels=4, hidden_size=32,
                   depth=2, num_heads=2, caption_channels=16, learn_sigma=False))
    inputs = m.example_inputs(batch=2)
    params = {"params": init_params(m, jax.random.PRNGKey(0))}
    plain = jax.jit(m.apply)(params, **inputs)
    part = Partitioner.from_config({"mesh": {"data": 1}, "rules": "fsdp_tp"})
    with part.activate():
        constrained = jax.jit(m.apply)(params, **inputs)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(constrained))
