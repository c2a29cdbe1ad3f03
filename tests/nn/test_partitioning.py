"""Every parameter carries logical axis names, so sharding needs no model changes."""

from __future__ import annotations

import jax
import pytest
from flax import linen as nn

import jdit
from jdit.nn import LOGICAL_AXES, REMAT_POLICIES, abstract_params, init_params

TINY = {
    "dit": dict(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=5),
    "pixart": dict(input_size=8, hidden_size=48, depth=3, num_heads=4, caption_channels=16,
                   micro_condition=True, qk_norm=True, kv_compress="conv",
                   kv_compress_layers=(1, 2)),
}


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_has_logical_axes(family, scan):
    module = jdit.models.build(family, **TINY[family], scan_layers=scan)
    boxed = abstract_params(module, boxed=True)
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    assert leaves
    for path, leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == len(leaf.value.shape), path
        assert set(leaf.names) - {None} <= set(LOGICAL_AXES), (path, leaf.names)
        in_stack = path[0].key.startswith("blocks_")
        assert (leaf.names[0] == "layers") == in_stack, path
        # scanned models keep no per-layer block_{i}; unscanned ones no stacked blocks_{a}_{b}
        assert not (path[0].key.startswith("block_") and scan) and not (in_stack and not scan)


def test_scanned_segments_follow_kv_compression_layers():
    module = jdit.models.build("pixart", **TINY["pixart"], scan_layers=True)
    shapes = abstract_params(module)
    blocks = sorted(k for k in shapes if k.startswith("blocks_"))
    assert blocks == ["blocks_0_0", "blocks_1_2"]
    assert "kv_compress" in shapes["blocks_1_2"]["attn"]


def test_remat_policy_names():
    assert {"none", "full", "dots"} <= set(REMAT_POLICIES)
    module = jdit.models.build("dit", **TINY["dit"], remat_policy="sometimes")
    with pytest.raises(ValueError, match="unknown remat_policy 'sometimes'"):
        init_params(module, jax.random.key(0))
