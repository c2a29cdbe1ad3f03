"""Optimizer construction: schedules and CAME's PyTorch-equivalent factoring of jdit params."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jdit
from jdit.train.optim import learning_rate, make_optimizer, pytorch_factor_axes


def test_warmup_then_cosine():
    lr = learning_rate(dict(lr=1.0, warmup_steps=10, schedule="cosine", end_lr_factor=0.1), 110)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 5, 10, 60, 110)],
                               [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    const = learning_rate(dict(lr=0.3), 50)
    assert float(const(0)) == pytest.approx(0.3) and float(const(49)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="optim.schedule"):
        learning_rate(dict(lr=1.0, schedule="step"), 10)
    with pytest.raises(ValueError, match="optim.name"):
        make_optimizer(dict(name="sgd", lr=1.0), 10)


@pytest.mark.parametrize("scan", [False, True])
def test_came_factors_jdit_params_like_pytorch_layouts(scan):
    module = jdit.models.build("pixart", input_size=8, hidden_size=48, depth=2, num_heads=4,
                               caption_channels=16, kv_compress="conv", kv_compress_layers=(1,),
                               scan_layers=scan)
    params = jax.eval_shape(lambda: jdit.nn.stack_params(
        jdit.models.init_params(module.clone(scan_layers=False), jax.random.key(0)),
        module.per_layer()) if scan else jdit.models.init_params(module, jax.random.key(0)))
    spec = pytorch_factor_axes(params)
    lead = 1 if scan else 0
    block = spec["blocks_1_1" if scan else "block_1"]
    assert block["attn"]["qkv"]["kernel"] == ((lead,), (lead + 1, lead + 2, lead + 3))
    assert block["attn"]["out"]["kernel"] == ((lead, lead + 1), (lead + 2,))
    assert block["cross_attn"]["kv"]["kernel"] == ((lead,), (lead + 1, lead + 2, lead + 3))
    assert block["attn"]["qkv"]["bias"] is False  # a 1-D bias in PyTorch
    assert block["attn"]["kv_compress"]["kernel"] == ((lead,), (lead + 1,))
    assert block["mlp"]["fc1"]["kernel"] is None  # a plain matrix: the default rule
    assert spec["patch_embed"]["kernel"] == ((0,), (1,))
    tx = make_optimizer(dict(name="came", lr=1e-3), 10)
    state = jax.eval_shape(tx.init, params)  # the specs are valid for every leaf
    assert state is not None
