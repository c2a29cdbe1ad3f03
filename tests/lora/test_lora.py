"""jdit.lora: adapters beside the parameters, against PEFT / diffusers on small random models."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jdit
from jdit import lora
from jdit.lora.formats import LoraMismatchError
from jdit.models import registry
from jdit.nn.init import init_params, perturbed
from tests.helpers import nchw_to_nhwc, randomize

peft = pytest.importorskip("peft")

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
            caption_channels=16)


def _random(adapters, seed):
    """Non-zero A and B (B starts at zero: a test of it would prove nothing)."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape) for k, x in
                                     zip(keys, leaves, strict=True)])


@pytest.mark.parametrize("scan", [False, True])
def test_unmerged_equals_merged_and_unmerge_restores_the_base(scan):
    module = registry.build("pixart", **TINY, scan_layers=scan)
    params = perturbed(init_params(module, jax.random.key(0)), jax.random.key(1))
    cfg = lora.LoraConfig(rank=4, alpha=6.0, targets=("attention", "cross_attention", "mlp"))
    first = lora.init(params, cfg, jax.random.key(2), module=module)
    inputs = module.example_inputs(batch=2)
    run = jax.jit(lambda p: module.apply({"params": p}, **inputs))
    base = run(params)
    # B = 0 at first: the adapted model is the base model
    np.testing.assert_array_equal(np.asarray(run(lora.apply(params, first))), np.asarray(base))
    first = _random(first, 3)
    second = _random(lora.init(params, lora.LoraConfig(rank=2, targets=("mlp",)),
                               jax.random.key(4), module=module), 5)
    for adapters, scale in ((first, 1.0), (first, 0.5), ([first, second], [0.7, -1.3])):
        unmerged = run(lora.apply(params, adapters, scale))
        merged = run(lora.merge(params, adapters, scale))
        assert float(jnp.abs(unmerged - base).max()) > 1e-2  # the adapters do something
        assert float(jnp.abs(unmerged - merged).max()) <= 1e-5
    back = lora.unmerge(lora.merge(params, [first, second], [0.7, -1.3]), [first, second],
                        [0.7, -1.3])
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-7 * max(1.0, float(jnp.abs(want).max())))


def test_adapters_are_laid_out_like_their_kernels():
    module = registry.build("pixart", **TINY, scan_layers=True)
    params = init_params(module, jax.random.key(0))
    adapters = lora.init(params, lora.LoraConfig(rank=3), jax.random.key(1), module=module)
    items = lora.adapter_items(adapters)
    assert sorted(items) == ["blocks_0_2/attn/out", "blocks_0_2/attn/qkv",
                             "blocks_0_2/cross_attn/kv", "blocks_0_2/cross_attn/out",
                             "blocks_0_2/cross_attn/q"]
    qkv, out = items["blocks_0_2/attn/qkv"], items["blocks_0_2/attn/out"]
    assert qkv.a.shape == (3, 32, 3) and qkv.b.shape == (3, 3, 3, 2, 16)
    assert out.a.shape == (3, 2, 16, 3) and out.b.shape == (3, 3, 32)
    axes = lora.adapter_items(lora.logical_axes(adapters, module))
    assert axes["blocks_0_2/attn/qkv"].a == ("layers", "embed", None)
    assert axes["blocks_0_2/attn/qkv"].b == ("layers", None, None, "heads", "kv")
    assert axes["blocks_0_2/attn/out"].a == ("layers", "heads", "kv", None)
    # the unscanned layout round-trips
    flat = lora.unstack(adapters, module.per_layer())
    assert sorted(flat) == ["block_0", "block_1", "block_2"]
    restacked = lora.stack(flat, module.per_layer())
    for a, b in zip(jax.tree.leaves(restacked), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(a, b)


def _pixart_peft(tmp_path, seed=0):
    from diffusers import PixArtTransformer2DModel

    model = randomize(PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8,
        num_layers=2, cross_attention_dim=24, caption_channels=16, sample_size=8), seed)
    model.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"])
    torch.manual_seed(seed + 1)
    return peft.get_peft_model(model, config).eval()


@pytest.mark.parametrize("scan", [False, True])
def test_a_peft_pixart_adapter_gives_the_peft_model_outputs(tmp_path, scan):
    peft_model = _pixart_peft(tmp_path)
    peft_model.save_pretrained(tmp_path / "adapter")  # adapter_model.safetensors + config
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([3.0, 517.5])
    ctx = torch.randn(2, 5, 16, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.float32)
    with torch.no_grad():
        want = peft_model(x, encoder_hidden_states=ctx, timestep=t, encoder_attention_mask=mask,
                          added_cond_kwargs=None).sample
        with peft_model.disable_adapter():
            base = peft_model(x, encoder_hidden_states=ctx, timestep=t,
                              encoder_attention_mask=mask, added_cond_kwargs=None).sample
    assert float((want - base).abs().max()) > 1e-2
    module, params = jdit.models.from_pretrained(tmp_path / "base", scan_layers=scan)
    adapters, cfg = lora.read(tmp_path / "adapter", module)
    assert cfg.rank == 4 and cfg.alpha == 6.0
    qkv = lora.adapter_items(adapters)["blocks_0_1/attn/qkv" if scan else "block_0/attn/qkv"]
    assert qkv.rank == 12  # to_q, to_k, to_v fused: their ranks concatenated
    run = jax.jit(lambda p: module.apply({"params": p}, jnp.asarray(nchw_to_nhwc(x)),
                                         jnp.asarray(t.numpy()), context=jnp.asarray(ctx.numpy()),
                                         context_mask=jnp.asarray(mask.numpy())))
    got = np.asarray(run(lora.apply(params, adapters)))
    assert np.abs(got - nchw_to_nhwc(want)).max() <= 1e-4
    # written back by jdit (PEFT layout), PEFT reads the same adapter: each projection keeps
    # its own rank-4 block
    lora.write(tmp_path / "again", adapters, module, format="peft")
    from safetensors.numpy import load_file

    theirs = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert (again["r"], again["lora_alpha"], again["rank_pattern"]) == (4, 6.0, {})


def test_a_lora_for_another_model_is_refused_with_every_offending_key(tmp_path):
    peft_model = _pixart_peft(tmp_path)
    peft_model.save_pretrained(tmp_path / "adapter")
    other = registry.build("pixart", input_size=8, patch_size=2, in_channels=4, hidden_size=48,
                           depth=1, num_heads=2, caption_channels=16)
    with pytest.raises(LoraMismatchError) as e:
        lora.read(tmp_path / "adapter", other)
    text = str(e.value)
    assert "transformer_blocks.1.attn1.to_q" in text  # no block 1 in a 1-block model
    assert "transformer_blocks.0.attn1.to_q: lora_A (4, 24)" in text  # wrong width
    sana = registry.build("sana", input_size=8, patch_size=1, in_channels=4, out_channels=4,
                          hidden_size=24, depth=2, num_heads=2, cross_num_heads=2,
                          caption_channels=16)
    with pytest.raises(LoraMismatchError, match="ff.net.0.proj"):
        lora.read(tmp_path / "adapter", sana)


def test_a_rank_mismatch_and_bad_scales_are_named(tmp_path):
    from jdit.weights.safetensors_io import write_safetensors

    module = registry.build("pixart", **TINY)
    write_safetensors(tmp_path / "bad.safetensors", {
        "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": np.zeros((4, 32), np.float32),
        "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": np.zeros((32, 3), np.float32),
    })
    with pytest.raises(LoraMismatchError, match=r"rank of lora_A \(4\) differs from rank of "
                                                r"lora_B \(3\)"):
        lora.read(tmp_path / "bad.safetensors", module)
    params = init_params(module, jax.random.key(0))
    adapters = lora.init(params, lora.LoraConfig(rank=2), jax.random.key(1), module=module)
    with pytest.raises(ValueError, match="finite"):
        lora.merge(params, adapters, float("nan"))
    with pytest.raises(ValueError, match="match no Dense kernel"):
        lora.init(params, lora.LoraConfig(targets=("nothing/kernel",)), jax.random.key(0))
    with pytest.raises(ValueError, match="rank"):
        lora.LoraConfig(rank=0)


def test_lora_plus_scales_the_b_factors_updates_only():
    import optax

    from jdit.train.optim import scale_lora_b

    params = {"block_0": {"attn": {"qkv": {"kernel": jnp.ones((8, 3, 2, 4))}}}}
    ad = lora.init(params, lora.LoraConfig(rank=2, targets=(r"block_0/attn/qkv/kernel",)),
                   jax.random.PRNGKey(0))
    grads = jax.tree.map(lambda a: jnp.ones_like(a), ad)
    plain, plus = optax.adam(1e-2), optax.chain(optax.adam(1e-2), scale_lora_b(4.0))
    u1, _ = plain.update(grads, plain.init(ad), ad)
    u4, _ = plus.update(grads, plus.init(ad), ad)
    (a1, b1), (a4, b4) = jax.tree.leaves(u1), jax.tree.leaves(u4)
    np.testing.assert_array_equal(a4, a1)
    np.testing.assert_allclose(b4, 4.0 * b1)
