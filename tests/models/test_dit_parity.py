"""DiT against diffusers' DiTTransformer2DModel and against the official DiT layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel

import jdit
from tests.helpers import nchw_to_nhwc, randomize, rel_err
from tests.reference.official_dit import OfficialDiT

TOL = 1e-4
NUM_CLASSES = 10


def make_diffusers(seed=0, tie=True, **config):
    base = dict(num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=8,
                num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES)
    model = randomize(DiTTransformer2DModel(**{**base, **config}), seed)
    if tie:  # converted checkpoints carry identical per-block copies of the embedders
        first = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    return model


def inputs(b=3, side=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, side, side, generator=gen)
    t = torch.tensor([0.0, 411.0, 999.0][:b])
    labels = torch.tensor([3, NUM_CLASSES, 0][:b])  # NUM_CLASSES is the null class
    return x, t, labels


def run_jdit(module, params, x, t, labels):
    return np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(nchw_to_nhwc(x)),
                                   jnp.asarray(t.numpy()), labels=jnp.asarray(labels.numpy())))


@pytest.mark.parametrize("side,layout", [(8, {}), (12, {}), (8, dict(scan_layers=True,
                                                                       remat_policy="full"))])
def test_diffusers_dit_with_null_class(tmp_path, side, layout):
    model = make_diffusers()
    model.save_pretrained(tmp_path / "dit")
    x, t, labels = inputs(side=side)
    with torch.no_grad():
        ref = model(x, timestep=t, class_labels=labels).sample
    module, params = jdit.models.from_pretrained(tmp_path / "dit", **layout)
    assert module.timestep_freq_shift == 1.0 and module.mlp_norm_eps == 1e-5
    assert rel_err(run_jdit(module, params, x, t, labels), nchw_to_nhwc(ref)) <= TOL


def test_diffusers_dit_with_untied_embedders_is_refused(tmp_path):
    make_diffusers(tie=False).save_pretrained(tmp_path / "dit")
    with pytest.raises(ValueError, match="block 1 has its own"):
        jdit.models.from_pretrained(tmp_path / "dit")


def official_from_diffusers(d, depth):
    e = "transformer_blocks.0.norm1.emb"
    o = {"x_embedder.proj.weight": d["pos_embed.proj.weight"],
         "x_embedder.proj.bias": d["pos_embed.proj.bias"],
         "y_embedder.embedding_table.weight": d[f"{e}.class_embedder.embedding_table.weight"]}
    for wb in ("weight", "bias"):
        o[f"t_embedder.mlp.0.{wb}"] = d[f"{e}.timestep_embedder.linear_1.{wb}"]
        o[f"t_embedder.mlp.2.{wb}"] = d[f"{e}.timestep_embedder.linear_2.{wb}"]
        o[f"final_layer.adaLN_modulation.1.{wb}"] = d[f"proj_out_1.{wb}"]
        o[f"final_layer.linear.{wb}"] = d[f"proj_out_2.{wb}"]
        for i in range(depth):
            s, b = f"transformer_blocks.{i}", f"blocks.{i}"
            o[f"{b}.attn.qkv.{wb}"] = torch.cat([d[f"{s}.attn1.to_{n}.{wb}"] for n in "qkv"])
            o[f"{b}.attn.proj.{wb}"] = d[f"{s}.attn1.to_out.0.{wb}"]
            o[f"{b}.mlp.fc1.{wb}"] = d[f"{s}.ff.net.0.proj.{wb}"]
            o[f"{b}.mlp.fc2.{wb}"] = d[f"{s}.ff.net.2.{wb}"]
            o[f"{b}.adaLN_modulation.1.{wb}"] = d[f"{s}.norm1.linear.{wb}"]
    return o


def test_transcription_matches_diffusers_with_its_two_quirks():
    """With diffusers' timestep shift and MLP-norm eps the official transcription is diffusers."""
    model = make_diffusers(seed=2, num_layers=2)
    off = OfficialDiT(depth=2, num_classes=NUM_CLASSES, freq_shift=1.0, mlp_norm_eps=1e-5)
    off.load_state_dict({**official_from_diffusers(model.state_dict(), 2), "pos_embed": off.pos_embed})
    x, t, labels = inputs()
    with torch.no_grad():
        assert rel_err(off(x, t, labels).numpy(),
                       model(x, timestep=t, class_labels=labels).sample.numpy()) <= 1e-5


def test_official_pt_matches_official_semantics(tmp_path):
    model = randomize(OfficialDiT(depth=3, num_classes=NUM_CLASSES), seed=3)
    torch.save(model.state_dict(), tmp_path / "DiT-tiny.pt")
    module, params = jdit.models.from_pretrained(tmp_path / "DiT-tiny.pt", num_heads=4)
    assert module.timestep_freq_shift == 0.0 and module.mlp_norm_eps == 1e-6
    assert module.input_size == 8 and module.num_classes == NUM_CLASSES
    x, t, labels = inputs()
    with torch.no_grad():
        ref = model(x, t, labels)
    assert rel_err(run_jdit(module, params, x, t, labels), nchw_to_nhwc(ref)) <= TOL


def test_training_checkpoint_prefers_ema_and_skips_foreign_objects(tmp_path):
    import argparse

    model = randomize(OfficialDiT(depth=1, num_classes=NUM_CLASSES), seed=4)
    raw = randomize(OfficialDiT(depth=1, num_classes=NUM_CLASSES), seed=5)
    torch.save({"model": raw.state_dict(), "ema": model.state_dict(),
                "args": argparse.Namespace(lr=1e-4), "opt": {"step": 3}}, tmp_path / "ckpt.pt")
    module, params = jdit.models.from_pretrained(tmp_path / "ckpt.pt", num_heads=4)
    x, t, labels = inputs()
    with torch.no_grad():
        ref = model(x, t, labels)
    assert rel_err(run_jdit(module, params, x, t, labels), nchw_to_nhwc(ref)) <= TOL
    module, params = jdit.models.from_pretrained(tmp_path / "ckpt.pt", num_heads=4,
                                                 state_dict_key="model")
    with torch.no_grad():
        ref = raw(x, t, labels)
    assert rel_err(run_jdit(module, params, x, t, labels), nchw_to_nhwc(ref)) <= TOL
