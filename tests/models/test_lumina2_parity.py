"""Lumina-Image 2.0 against diffusers' Lumina2Transformer2DModel on small random models; the
official layout; scanning; logical axes; clear errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import Lumina2Transformer2DModel
from flax import linen as nn
from safetensors.torch import load_file, save_file

import jdit
from jdit.nn import LOGICAL_AXES, abstract_params
from jdit.weights.lumina2 import config_from_diffusers
from jdit.weights.state_dict import CheckpointMismatchError
from tests.helpers import nchw_to_nhwc, randomize, rel_err

TOL = 1e-4
TINY = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=64, num_layers=2,
            num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2, multiple_of=16,
            axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32), cap_feat_dim=32)
# wider than 1024: the timestep embedding (min(D, 1024)) is narrower than the tokens
WIDE = dict(TINY, hidden_size=1032, num_attention_heads=2, num_kv_heads=1, multiple_of=8,
            ffn_dim_multiplier=0.1, axes_dim_rope=(172, 172, 172), num_layers=1)


def make_diffusers(tmp_path, config, seed=0):
    model = randomize(Lumina2Transformer2DModel(**config), seed)
    folder = tmp_path / f"lumina2_{seed}"
    model.save_pretrained(folder)
    return model, folder


def inputs(model, hw, valid_lens, seed=1):
    """Latents, captions right-padded to the longest valid length plus one (every sample has
    padding), and their masks."""
    gen = torch.Generator().manual_seed(seed)
    b, caption_len = len(valid_lens), max(valid_lens) + 1
    x = torch.randn(b, model.config.in_channels, *hw, generator=gen)
    ctx = torch.randn(b, caption_len, model.config.cap_feat_dim, generator=gen)
    mask = torch.zeros(b, caption_len, dtype=torch.long)
    for i, n in enumerate(valid_lens):
        mask[i, :n] = 1
    return x, ctx, mask


def reference(model, x, t, ctx, mask):
    """diffusers in jdit's convention: Lumina time 1 - t/1000 (as its pipeline), velocity
    noise - data (minus its output)."""
    with torch.no_grad():
        out = model(x, 1 - t / 1000, ctx, mask, return_dict=False)[0]
    return -nchw_to_nhwc(out)


def ours(apply, params, x, t, ctx, mask):
    out = apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()),
                context=jnp.asarray(ctx.numpy()), context_mask=jnp.asarray(mask.numpy()))
    return np.asarray(out)


@pytest.mark.parametrize("config, hw, valid", [(TINY, (8, 12), [6, 2]), (WIDE, (6, 4), [3, 5])],
                         ids=["tiny", "wider_than_1024"])
def test_matches_diffusers_with_padded_captions_and_non_square_latents(tmp_path, config, hw,
                                                                        valid):
    model, folder = make_diffusers(tmp_path, config)
    x, ctx, mask = inputs(model, hw, valid)
    module, params = jdit.models.from_pretrained(folder)
    assert module.conditioning_size == min(config["hidden_size"], 1024)
    apply = jax.jit(module.apply)
    full = torch.ones_like(mask)  # no padding: diffusers passes no mask to its joint layers
    for t, m in (([1000.0, 517.5], mask), ([3.0, 0.0], mask), ([420.0, 61.0], full)):
        t = torch.tensor(t)  # 1000: pure noise (Lumina time 0)
        assert rel_err(ours(apply, params, x, t, ctx, m), reference(model, x, t, ctx, m)) <= TOL


def test_padding_is_ignored_and_scanning_changes_nothing(tmp_path):
    model, folder = make_diffusers(tmp_path, TINY, seed=2)
    x, ctx, mask = inputs(model, (8, 8), [5, 2])
    t = torch.tensor([250.0, 800.0])
    module, params = jdit.models.from_pretrained(folder)
    apply = jax.jit(module.apply)
    out = ours(apply, params, x, t, ctx, mask)
    garbage = torch.where(mask[..., None].bool(), ctx, 1e3 * torch.randn_like(ctx))
    np.testing.assert_array_equal(ours(apply, params, x, t, garbage, mask), out)
    scanned, stacked = jdit.models.from_pretrained(folder, scan_layers=True, remat_policy="dots")
    assert "blocks_0_1" in stacked and "block_0" not in stacked
    assert rel_err(ours(jax.jit(scanned.apply), stacked, x, t, ctx, mask), out) <= 1e-6


def test_pallas_kernel_matches_the_xla_path(tmp_path):
    """attention_impl="pallas" (interpreted on CPU): GQA with masked caption keys."""
    model, folder = make_diffusers(tmp_path, TINY, seed=5)
    x, ctx, mask = inputs(model, (4, 6), [5, 1])
    t = torch.tensor([333.0, 999.0])
    module, params = jdit.models.from_pretrained(folder)
    kernels, _ = jdit.models.from_pretrained(folder, attention_impl="pallas")
    assert rel_err(ours(jax.jit(kernels.apply), params, x, t, ctx, mask),
                   ours(jax.jit(module.apply), params, x, t, ctx, mask)) <= TOL


def official_from_diffusers(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official key layout, rebuilt from a diffusers state dict (notes §3, inverted)."""
    renames = [("time_caption_embed.caption_embedder", "cap_embedder"),
               ("time_caption_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
               ("time_caption_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
               ("norm_out.linear_1", "final_layer.adaLN_modulation.1"),
               ("norm_out.linear_2", "final_layer.linear"), ("norm1.linear", "adaLN_modulation.1"),
               (".norm1.norm.", ".attention_norm1."), (".norm2.", ".attention_norm2."),
               ("attn.to_out.0", "attention.out"), ("attn.norm_q", "attention.q_norm"),
               ("attn.norm_k", "attention.k_norm"), ("linear_1", "w1"), ("linear_2", "w2"),
               ("linear_3", "w3")]
    o = {"norm_final.weight": torch.ones(d["x_embedder.bias"].shape)}  # unused, ignored
    for key, value in d.items():
        if ".attn.to_k." in key or ".attn.to_v." in key:
            continue
        if ".attn.to_q." in key:
            o[key.replace("attn.to_q", "attention.qkv")] = torch.cat(
                [d[key.replace("to_q", f"to_{n}")] for n in "qkv"])
            continue
        if key.startswith("context_refiner.") and ".norm1." in key:
            key = key.replace(".norm1.", ".attention_norm1.")
        for theirs, official in renames:
            key = key.replace(theirs, official)
        o[key] = value
    return o


def test_official_layout(tmp_path):
    model, _ = make_diffusers(tmp_path, TINY, seed=3)
    path = tmp_path / "consolidated.safetensors"
    save_file(official_from_diffusers(model.state_dict()), path)
    with pytest.raises(ValueError, match="cannot infer axes_dim_rope"):
        jdit.models.from_pretrained(path)  # head dim 16: not the release's 96
    module, params = jdit.models.from_pretrained(path, axes_dim_rope=(4, 6, 6))
    assert (module.num_kv_heads, module.depth, module.refiner_depth) == (2, 2, 1)
    x, ctx, mask = inputs(model, (4, 6), [4, 1])
    t = torch.tensor([90.0, 640.0])
    assert rel_err(ours(jax.jit(module.apply), params, x, t, ctx, mask),
                   reference(model, x, t, ctx, mask)) <= TOL


@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_has_logical_axes(scan):
    module = jdit.models.build("lumina2", **config_from_diffusers(TINY),
                               scan_layers=scan)
    boxed = abstract_params(module, boxed=True)
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    assert {path[0].key for path, _ in leaves} >= {"context_refiner", "noise_refiner"}
    for path, leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == len(leaf.value.shape), path
        assert set(leaf.names) - {None} <= set(LOGICAL_AXES), (path, leaf.names)
        assert (leaf.names[0] == "layers") == path[0].key.startswith("blocks_"), path


def test_published_preset_matches_diffusers_parameter_count():
    module = jdit.models.build(jdit.models.preset("lumina2_2b_1024"))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jdit.models.param_shapes(module)))
    assert module.ffn_hidden == 9216 and count == 2_609_769_152  # diffusers, on the meta device


@pytest.mark.parametrize("fields, message", [
    (dict(axes_dim_rope=(4, 4, 4)), r"axes_dim_rope \(4, 4, 4\) must be three even numbers "
                                    r"summing to the head dim 16"),
    (dict(num_kv_heads=3), "num_heads 4 must be a multiple of num_kv_heads 3"),
    (dict(hidden_size=66), "hidden_size 66 must be divisible by num_heads 4"),
])
def test_bad_configs(fields, message):
    base = config_from_diffusers(TINY)
    with pytest.raises(ValueError, match=message):
        jdit.models.build("lumina2", **{**base, **fields})


def test_bad_diffusers_config_and_misshaped_tensors(tmp_path):
    model, folder = make_diffusers(tmp_path, TINY, seed=4)
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(json.dumps({**json.loads(config),
                                                    "axes_dim_rope": [8, 6, 6]}))
    with pytest.raises(ValueError, match=r"axes_dim_rope=\[8, 6, 6\] is not supported"):
        jdit.models.from_pretrained(folder)
    (folder / "config.json").write_text(config)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["layers.1.attn.to_k.weight"] = torch.zeros(64, 64)  # 4 kv heads' worth, not 2
    state["layers.1.attn.extra.weight"] = torch.zeros(3)
    del state["noise_refiner.0.ffn_norm2.weight"]
    save_file(state, weights)
    with pytest.raises(CheckpointMismatchError) as err:
        jdit.models.from_pretrained(folder)
    assert err.value.missing == ["noise_refiner.0.ffn_norm2.weight"]
    assert err.value.unexpected == ["layers.1.attn.extra.weight"]
    assert err.value.misshaped == ["layers.1.attn.to_k.weight: expected (32, 64), got (64, 64)"]


def test_bad_inputs_are_named():
    module = jdit.models.build("lumina2", **config_from_diffusers(TINY))
    good = dict(x=jnp.zeros((2, 8, 8, 4)), t=jnp.zeros((2,)), context=jnp.zeros((2, 5, 32)),
                context_mask=jnp.ones((2, 5)))
    for change, message in [(dict(x=jnp.zeros((2, 8, 7, 4))), "multiples of patch_size 2"),
                            (dict(context=jnp.zeros((2, 5, 16))), r"shape \(2, L, 32\)"),
                            (dict(t=jnp.zeros((2, 1))), r"t must have shape \(2,\)")]:
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(lambda c=change: module.init(jax.random.key(0), **{**good, **c}))
