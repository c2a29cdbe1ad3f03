"""Official PixArt ``.pth`` checkpoints (α, Σ, KV compression, QK-norm) loaded without torch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel

import jdit
from jdit.weights import CheckpointMismatchError
from tests.helpers import nchw_to_nhwc, randomize, rel_err
from tests.reference.official_pixart import OfficialPixArt

TOL = 1e-4


def official_from_diffusers(d: dict[str, torch.Tensor], depth: int, micro: bool) -> dict:
    """The official key layout, rebuilt from a diffusers state dict (pixart.md §5)."""
    o = {
        "x_embedder.proj.weight": d["pos_embed.proj.weight"],
        "x_embedder.proj.bias": d["pos_embed.proj.bias"],
        "t_block.1.weight": d["adaln_single.linear.weight"],
        "t_block.1.bias": d["adaln_single.linear.bias"],
        "y_embedder.y_proj.fc1.weight": d["caption_projection.linear_1.weight"],
        "y_embedder.y_proj.fc1.bias": d["caption_projection.linear_1.bias"],
        "y_embedder.y_proj.fc2.weight": d["caption_projection.linear_2.weight"],
        "y_embedder.y_proj.fc2.bias": d["caption_projection.linear_2.bias"],
        "final_layer.linear.weight": d["proj_out.weight"],
        "final_layer.linear.bias": d["proj_out.bias"],
        "final_layer.scale_shift_table": d["scale_shift_table"],
    }
    embedders = [("t_embedder", "timestep_embedder")]
    if micro:
        embedders += [("csize_embedder", "resolution_embedder"), ("ar_embedder", "aspect_ratio_embedder")]
    for ours, theirs in embedders:
        for j, k in (("0", "1"), ("2", "2")):
            for wb in ("weight", "bias"):
                o[f"{ours}.mlp.{j}.{wb}"] = d[f"adaln_single.emb.{theirs}.linear_{k}.{wb}"]
    for i in range(depth):
        o.update(official_block(d, f"transformer_blocks.{i}", f"blocks.{i}"))
    return o


def official_block(d: dict[str, torch.Tensor], s: str, b: str) -> dict:
    """One diffusers PixArt block (``s``) under the official block names (``b``)."""
    o = {f"{b}.scale_shift_table": d[f"{s}.scale_shift_table"]}
    for wb in ("weight", "bias"):
        o[f"{b}.attn.qkv.{wb}"] = torch.cat([d[f"{s}.attn1.to_{n}.{wb}"] for n in "qkv"])
        o[f"{b}.attn.proj.{wb}"] = d[f"{s}.attn1.to_out.0.{wb}"]
        o[f"{b}.cross_attn.q_linear.{wb}"] = d[f"{s}.attn2.to_q.{wb}"]
        o[f"{b}.cross_attn.kv_linear.{wb}"] = torch.cat([d[f"{s}.attn2.to_{n}.{wb}"] for n in "kv"])
        o[f"{b}.cross_attn.proj.{wb}"] = d[f"{s}.attn2.to_out.0.{wb}"]
        o[f"{b}.mlp.fc1.{wb}"] = d[f"{s}.ff.net.0.proj.{wb}"]
        o[f"{b}.mlp.fc2.{wb}"] = d[f"{s}.ff.net.2.{wb}"]
    return o


def inputs(b, hw, caption_len, caption_channels, valid, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, *hw, generator=gen)
    t = torch.tensor([7.0, 250.25, 998.0][:b])
    y = torch.randn(b, caption_len, caption_channels, generator=gen)
    mask = torch.zeros(b, caption_len)
    for i, n in enumerate(valid):
        mask[i, :n] = 1
    return x, t, y, mask


def jdit_forward(module, params, x, t, y, mask, **extra):
    out = jax.jit(module.apply)(
        {"params": params}, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()),
        context=jnp.asarray(y.numpy()), context_mask=jnp.asarray(mask.numpy()),
        **{k: jnp.asarray(v.numpy()) for k, v in extra.items()})
    return np.asarray(out)


@pytest.mark.parametrize("micro", [False, True])
def test_transcription_matches_diffusers(micro):
    """Validates the test's official transcription and key mapping against diffusers."""
    diff = randomize(PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=12, num_layers=2, cross_attention_dim=48,
        caption_channels=24, sample_size=8, use_additional_conditions=micro))
    off = OfficialPixArt(depth=2, micro_condition=micro)
    off.load_state_dict({**official_from_diffusers(diff.state_dict(), 2, micro),
                         "pos_embed": off.pos_embed, "y_embedder.y_embedding": off.y_embedder.y_embedding})
    x, t, y, mask = inputs(2, (8, 12), 6, 24, [6, 2])
    extra = {}
    if micro:
        extra = dict(img_hw=torch.tensor([[64.0, 96.0]] * 2), aspect_ratio=torch.tensor([[0.67]] * 2))
    with torch.no_grad():
        ref = diff(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                   added_cond_kwargs={"resolution": extra["img_hw"], "aspect_ratio": extra["aspect_ratio"]}
                   if micro else None).sample
        got = off(x, t, y, mask, **extra)
    assert rel_err(got.numpy(), ref.numpy()) <= 1e-5


def save_official(tmp_path, model, name="model.pth", wrap=True):
    path = tmp_path / name
    sd = model.state_dict()
    torch.save({"state_dict": sd} if wrap else sd, path)
    return path


def compare(model, path, hw, caption_len, valid, micro=False, **load):
    module, params = jdit.models.from_pretrained(path, **load)
    x, t, y, mask = inputs(len(valid), hw, caption_len, module.caption_channels, valid)
    extra = {}
    if micro:
        extra = dict(img_hw=torch.tensor([[hw[0] * 8.0, hw[1] * 8.0]] * len(valid)),
                     aspect_ratio=torch.tensor([[hw[0] / hw[1]]] * len(valid)))
    with torch.no_grad():
        ref = model(x, t, y, mask, **extra).numpy()
    jx = {}
    if micro:
        jx = dict(resolution=extra["img_hw"], aspect_ratio=extra["aspect_ratio"])
    out = jdit_forward(module, params, x, t, y, mask, **jx)
    return rel_err(out, nchw_to_nhwc(torch.from_numpy(ref))), module


def test_alpha_pth_infers_config(tmp_path):
    # α: 120-token null caption; a 1024-px-like grid (input 128) would give pe 2, here input 8 -> 1.
    model = randomize(OfficialPixArt(input_size=8, depth=3, micro_condition=True,
                                     model_max_length=120, pe_interpolation=1.0), seed=2)
    err, module = compare(model, save_official(tmp_path, model), (8, 8), 5, [5, 3], micro=True,
                          num_heads=4)
    assert module.micro_condition and module.pe_interpolation == 1.0 and module.input_size == 8
    assert err <= TOL


def test_sigma_pth_infers_interpolation_from_caption_length(tmp_path):
    # Σ: 300-token null caption -> pe_interpolation = input_size / 64 (= px / 512).
    model = randomize(OfficialPixArt(input_size=16, depth=2, model_max_length=300,
                                     pe_interpolation=0.25), seed=3)
    err, module = compare(model, save_official(tmp_path, model), (12, 20), 9, [9, 4], num_heads=4)
    assert module.pe_interpolation == 0.25 and not module.micro_condition
    assert err <= TOL


@pytest.mark.parametrize("hw", [(16, 16), (12, 20), (10, 14)])  # (10, 14): odd token grid 5x7
def test_sigma_kv_compress_conv_with_qk_norm(tmp_path, hw):
    model = randomize(OfficialPixArt(input_size=16, depth=4, model_max_length=300, qk_norm=True,
                                     sampling="conv", scale_factor=2, kv_compress_layer=(2, 3),
                                     pe_interpolation=0.25), seed=4)
    err, module = compare(model, save_official(tmp_path, model), hw, 6, [6, 1], num_heads=4,
                          scan_layers=True)
    assert module.kv_compress == "conv" and module.kv_compress_layers == (2, 3)
    assert module.qk_norm and module.kv_compress_ratio == 2
    assert err <= TOL


@pytest.mark.parametrize("mode,hw", [("ave", (16, 16)), ("ave", (10, 14)), ("uniform", (12, 16)),
                                     ("uniform_every", (16, 12))])
def test_parameter_free_kv_compress_modes(tmp_path, mode, hw):
    model = randomize(OfficialPixArt(input_size=16, depth=3, model_max_length=300, sampling=mode,
                                     scale_factor=2, kv_compress_layer=(1, 2),
                                     pe_interpolation=0.25), seed=5)
    err, _ = compare(model, save_official(tmp_path, model), hw, 4, [4, 2], num_heads=4,
                     kv_compress=mode, kv_compress_layers=(1, 2), kv_compress_ratio=2)
    assert err <= TOL


def test_official_layout_in_safetensors_and_bare_state_dict(tmp_path):
    from jdit.weights import write_safetensors

    model = randomize(OfficialPixArt(depth=2, model_max_length=120), seed=6)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    write_safetensors(tmp_path / "m.safetensors", sd)
    err, _ = compare(model, tmp_path / "m.safetensors", (8, 8), 3, [3, 3], num_heads=4)
    assert err <= TOL
    err, _ = compare(model, save_official(tmp_path, model, "bare.pth", wrap=False), (8, 8), 3,
                     [3, 1], num_heads=4)
    assert err <= TOL


def test_missing_unexpected_and_misshaped_keys_are_listed_together(tmp_path):
    model = OfficialPixArt(depth=2, model_max_length=120)
    sd = dict(model.state_dict())
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    sd["blocks.0.cross_attn.proj.weight"] = torch.zeros(48, 47)
    path = tmp_path / "broken.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointMismatchError) as e:
        jdit.models.from_pretrained(path, num_heads=4)
    msg = str(e.value)
    assert "blocks.1.mlp.fc2.bias" in msg and "blocks.0.extra.weight" in msg
    assert "blocks.0.cross_attn.proj.weight: expected (48, 48), got (48, 47)" in msg


def test_heads_and_grid_must_be_given_when_not_inferable(tmp_path):
    model = OfficialPixArt(depth=1, model_max_length=120)
    sd = {k: v for k, v in model.state_dict().items() if k != "pos_embed"}
    path = tmp_path / "nogrid.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ValueError, match="input_size.*num_heads"):
        jdit.models.from_pretrained(path)
    module, _ = jdit.models.from_pretrained(path, num_heads=4, input_size=8, pe_interpolation=1.0)
    assert module.input_size == 8
