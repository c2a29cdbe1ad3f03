"""SANA against diffusers' SanaTransformer2DModel on small random models; the official layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SanaTransformer2DModel

import jdit
from tests.helpers import nchw_to_nhwc, randomize, rel_err

TOL = 1e-4
BASE = dict(num_attention_heads=4, attention_head_dim=8, num_cross_attention_heads=2,
            cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24, num_layers=2,
            in_channels=4, out_channels=4, sample_size=8, mlp_ratio=2.5)


def make_diffusers(tmp_path, seed=0, **config):
    model = randomize(SanaTransformer2DModel(**{**BASE, **config}), seed)
    folder = tmp_path / f"sana_{seed}"
    model.save_pretrained(folder)
    return model, folder


def inputs(model, hw, caption_len, valid_lens, seed=1):
    gen = torch.Generator().manual_seed(seed)
    b = len(valid_lens)
    x = torch.randn(b, model.config.in_channels, *hw, generator=gen)
    t = torch.tensor([3.0, 517.5, 999.0][:b])
    ctx = torch.randn(b, caption_len, model.config.caption_channels, generator=gen)
    mask = torch.zeros(b, caption_len)
    for i, n in enumerate(valid_lens):
        mask[i, :n] = 1
    return x, t, ctx, mask


def reference(model, x, t, ctx, mask):
    with torch.no_grad():
        return nchw_to_nhwc(model(x, encoder_hidden_states=ctx, timestep=t,
                                  encoder_attention_mask=mask).sample)


def ours(module, params, x, t, ctx, mask):
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()),
                       context=jnp.asarray(ctx.numpy()), context_mask=jnp.asarray(mask.numpy()))
    return np.asarray(out)


@pytest.mark.parametrize("hw, valid", [((8, 8), [7, 4]), ((6, 10), [7, 1]), ((12, 4), [3])])
def test_nope_model_non_square_latents_and_padded_captions(tmp_path, hw, valid):
    model, folder = make_diffusers(tmp_path)
    args = inputs(model, hw, 7, valid)
    module, params = jdit.models.from_pretrained(folder)
    assert type(module).__name__ == "Sana" and not module.pos_embed and not module.qk_norm
    assert rel_err(ours(module, params, *args), reference(model, *args)) <= TOL


def test_sincos_positions_qk_norm_and_patch_2(tmp_path):
    model, folder = make_diffusers(tmp_path, seed=2, interpolation_scale=1.0,
                                   qk_norm="rms_norm_across_heads", patch_size=2)
    args = inputs(model, (8, 12), 5, [5, 2])
    module, params = jdit.models.from_pretrained(folder)
    assert module.pos_embed and module.qk_norm and module.patch_size == 2
    assert rel_err(ours(module, params, *args), reference(model, *args)) <= TOL


@pytest.mark.parametrize("timestep_scale", [1.0, 1000.0])
def test_sprint_guidance_embedding_and_its_timestep_convention(tmp_path, timestep_scale):
    """SANA-Sprint's transformer: the guidance scale embedded beside the timestep. Its pipeline
    hands the model σ = t / 1000 (whatever the config's timestep_scale says); jdit keeps
    t = 1000 σ and embeds t × 1e-3."""
    model, folder = make_diffusers(tmp_path, seed=4, guidance_embeds=True,
                                   qk_norm="rms_norm_across_heads", guidance_embeds_scale=0.1,
                                   timestep_scale=timestep_scale)
    x, t, ctx, mask = inputs(model, (8, 8), 6, [6, 3])
    guidance = torch.tensor([4.5, 2.0])
    with torch.no_grad():
        want = nchw_to_nhwc(model(x, encoder_hidden_states=ctx, timestep=t / 1000.0,
                                  guidance=guidance * 0.1, encoder_attention_mask=mask).sample)
    module, params = jdit.models.from_pretrained(folder)
    assert module.guidance_embeds and module.timestep_scale == 1e-3
    got = np.asarray(jax.jit(module.apply)(
        {"params": params}, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()),
        context=jnp.asarray(ctx.numpy()), context_mask=jnp.asarray(mask.numpy()),
        guidance=jnp.asarray(guidance.numpy())))
    assert rel_err(got, want) <= TOL
    with pytest.raises(ValueError, match="embeds the guidance scale"):
        module.apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()),
                     context=jnp.asarray(ctx.numpy()), context_mask=jnp.asarray(mask.numpy()))
    plain, plain_folder = make_diffusers(tmp_path, seed=5)
    m2, p2 = jdit.models.from_pretrained(plain_folder)
    with pytest.raises(ValueError, match="guidance= is for models with guidance_embeds"):
        m2.apply({"params": p2}, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()),
                 context=jnp.asarray(ctx.numpy()), context_mask=jnp.asarray(mask.numpy()),
                 guidance=jnp.asarray(guidance.numpy()))


def official_from_diffusers(d: dict[str, torch.Tensor], depth: int, qk_norm: bool) -> dict:
    """The official key layout, rebuilt from a diffusers state dict (the map of D-conv,
    reference/linear_attention_and_flow.md §1.12)."""
    emb = "time_embed.emb.timestep_embedder"
    o = {"x_embedder.proj.weight": d["patch_embed.proj.weight"],
         "x_embedder.proj.bias": d["patch_embed.proj.bias"],
         "attention_y_norm.weight": d["caption_norm.weight"],
         "final_layer.scale_shift_table": d["scale_shift_table"],
         # buffers the official files carry and the loader ignores
         "y_embedder.y_embedding": torch.zeros(300, 24), "pos_embed": torch.zeros(1, 64, 32)}
    for ours_, theirs in (("t_embedder.mlp.0", f"{emb}.linear_1"),
                          ("t_embedder.mlp.2", f"{emb}.linear_2"), ("t_block.1", "time_embed.linear"),
                          ("y_embedder.y_proj.fc1", "caption_projection.linear_1"),
                          ("y_embedder.y_proj.fc2", "caption_projection.linear_2"),
                          ("final_layer.linear", "proj_out")):
        for wb in ("weight", "bias"):
            o[f"{ours_}.{wb}"] = d[f"{theirs}.{wb}"]
    for i in range(depth):
        s, b = f"transformer_blocks.{i}", f"blocks.{i}"
        o[f"{b}.scale_shift_table"] = d[f"{s}.scale_shift_table"]
        o[f"{b}.attn.qkv.weight"] = torch.cat([d[f"{s}.attn1.to_{n}.weight"] for n in "qkv"])
        for wb in ("weight", "bias"):
            o[f"{b}.attn.proj.{wb}"] = d[f"{s}.attn1.to_out.0.{wb}"]
            o[f"{b}.cross_attn.q_linear.{wb}"] = d[f"{s}.attn2.to_q.{wb}"]
            o[f"{b}.cross_attn.kv_linear.{wb}"] = torch.cat([d[f"{s}.attn2.to_{n}.{wb}"]
                                                             for n in "kv"])
            o[f"{b}.cross_attn.proj.{wb}"] = d[f"{s}.attn2.to_out.0.{wb}"]
            o[f"{b}.mlp.inverted_conv.conv.{wb}"] = d[f"{s}.ff.conv_inverted.{wb}"]
            o[f"{b}.mlp.depth_conv.conv.{wb}"] = d[f"{s}.ff.conv_depth.{wb}"]
        o[f"{b}.mlp.point_conv.conv.weight"] = d[f"{s}.ff.conv_point.weight"]
        if qk_norm:
            for a, theirs in (("attn", "attn1"), ("cross_attn", "attn2")):
                o[f"{b}.{a}.q_norm.weight"] = d[f"{s}.{theirs}.norm_q.weight"]
                o[f"{b}.{a}.k_norm.weight"] = d[f"{s}.{theirs}.norm_k.weight"]
    return o


@pytest.mark.parametrize("qk_norm", [None, "rms_norm_across_heads"])
def test_official_pth_layout(tmp_path, qk_norm):
    model, _ = make_diffusers(tmp_path, seed=3, qk_norm=qk_norm)
    path = tmp_path / "sana.pth"
    state = official_from_diffusers(model.state_dict(), 2, qk_norm is not None)
    torch.save({"state_dict": state}, path)
    args = inputs(model, (8, 8), 6, [6, 3])
    # head dims are not in the weights: 32 channels per linear head in every release, so a
    # 32-wide toy model needs its head count given
    with pytest.raises(ValueError, match="cross_num_heads"):
        jdit.models.from_pretrained(path, input_size=8)
    module, params = jdit.models.from_pretrained(path, input_size=8, cross_num_heads=2,
                                                 num_heads=4)
    assert module.qk_norm == (qk_norm is not None)
    assert rel_err(ours(module, params, *args), reference(model, *args)) <= TOL


def test_pallas_kernels_match_the_xla_path(tmp_path):
    """attention_impl="pallas" (interpreted on CPU): linear self-attention and the masked
    cross-attention through the kernels equal the XLA path."""
    model, folder = make_diffusers(tmp_path, seed=4)
    args = inputs(model, (8, 6), 7, [7, 2])
    module, params = jdit.models.from_pretrained(folder)
    kernels, _ = jdit.models.from_pretrained(folder, attention_impl="pallas")
    assert rel_err(ours(kernels, params, *args), ours(module, params, *args)) <= TOL


def test_fp16_compute_clips_the_linear_attention_output():
    from jdit.nn.linear_attention import FP16_MAX, LinearSelfAttention

    layer = LinearSelfAttention(2, 8, dtype=jnp.float16)
    x = jnp.full((1, 4, 16), 30.0, jnp.float16)
    params = layer.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: jnp.full_like(p, 40.0), params)  # overflow float16 on purpose
    out = layer.apply(params, x)
    assert out.dtype == jnp.float16 and bool(jnp.all(jnp.abs(out) <= FP16_MAX))
    assert bool(jnp.all(jnp.isfinite(out)))
