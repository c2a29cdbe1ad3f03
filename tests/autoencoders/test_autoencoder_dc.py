"""AutoencoderDC (SANA's DC-AE) against diffusers on small random models."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderDC as DiffusersDC
from diffusers import AutoencoderKL as DiffusersKL
from safetensors.numpy import load_file, save_file

import jdit
from jdit.autoencoders import AutoencoderDC, AutoencoderKL
from jdit.weights.state_dict import CheckpointMismatchError
from tests.helpers import rel_err

STAGES = ("ResBlock", "ResBlock", "EfficientViTBlock")
SANA = dict(  # dc-ae-f32c32-sana-1.0's layout (its "Conv" spelling too), three stages: f = 4
    latent_channels=8, attention_head_dim=8,
    encoder_block_types=STAGES, decoder_block_types=STAGES,
    encoder_block_out_channels=(16, 32, 32), decoder_block_out_channels=(16, 32, 32),
    encoder_layers_per_block=(1, 1, 2), decoder_layers_per_block=(1, 1, 2),
    encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
    downsample_block_type="Conv", upsample_block_type="interpolate",
    decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
SHUFFLE = {  # the other switches: a stem-only first stage (dc-ae-*-in-1.0), pixel (un)shuffle,
    **SANA,  # BatchNorm in a ResBlock and in the attention, two attention scales, no in-shortcut
    "encoder_layers_per_block": (0, 1, 2), "decoder_layers_per_block": (0, 2, 1),
    "encoder_qkv_multiscales": ((), (), (3, 5)),
    "downsample_block_type": "pixel_unshuffle", "upsample_block_type": "pixel_shuffle",
    "decoder_norm_types": ("rms_norm", "batch_norm", "batch_norm"),
    "decoder_act_fns": ("silu", "gelu", "silu"), "decoder_in_shortcut": False,
    "decoder_conv_act_fn": "silu", "scaling_factor": 1.0}


def random_dc(path, config, seed=0):
    torch.manual_seed(seed)
    model = DiffusersDC(**config).eval()
    with torch.no_grad():  # nothing left at its init: no unit norm scale, zero bias, 0/1 stats
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(0.05 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.add_(0.2 * torch.rand_like(b))
    model.save_pretrained(path)
    return model


def nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


def reference_pair(model, shape):
    x = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents = model.encode(x).latent
        images = model.decode(latents).sample
    return nhwc(x), nhwc(latents), nhwc(images)


@pytest.mark.parametrize("config", [SANA, SHUFFLE], ids=["sana", "shuffle"])
def test_encode_and_decode_match_diffusers(tmp_path, config):
    reference = random_dc(tmp_path, config)
    vae, params = jdit.autoencoders.from_pretrained(tmp_path)
    assert isinstance(vae, AutoencoderDC) and vae.scale_factor == 4
    assert vae.scaling_factor == reference.config.scaling_factor
    # 32×48: the attention stage sees 8×12 tokens (linear form); 8×8: 2×2 tokens, N <= head_dim,
    # where diffusers switches to the quadratic form
    for shape in ((32, 48), (8, 8)):
        x, want_z, want = reference_pair(reference, shape)
        z = jax.jit(vae.apply, static_argnames="method")({"params": params}, jnp.asarray(x), method="encode")
        assert z.shape == (2, shape[0] // 4, shape[1] // 4, 8) and z.dtype == jnp.float32
        out = jax.jit(vae.apply, static_argnames="method")({"params": params}, jnp.asarray(want_z), method="decode")
        assert out.shape == (2, *shape, 3) and out.dtype == jnp.float32
        errors = rel_err(z, want_z), rel_err(out, want)
        print(f"{shape}: encode {errors[0]:.2e}, decode {errors[1]:.2e}")
        assert max(errors) <= 1e-4, (shape, errors)


def test_bfloat16_compute(tmp_path):
    reference = random_dc(tmp_path, SANA)
    x, want_z, want = reference_pair(reference, (32, 48))
    vae, params = jdit.autoencoders.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    z = jax.jit(vae.apply, static_argnames="method")({"params": params}, jnp.asarray(x), method="encode")
    out = jax.jit(vae.apply, static_argnames="method")({"params": params}, jnp.asarray(want_z), method="decode")
    assert z.dtype == out.dtype == jnp.float32
    assert np.isfinite(np.asarray(z)).all() and np.isfinite(np.asarray(out)).all()
    errors = rel_err(z, want_z), rel_err(out, want)
    print(f"bfloat16: encode {errors[0]:.2e}, decode {errors[1]:.2e}")
    assert max(errors) < 5e-2, errors


@pytest.mark.parametrize("key, value", [
    ("upsample_block_type", "bilinear"), ("downsample_block_type", "avg_pool"),
    ("decoder_norm_types", "layer_norm"), ("decoder_act_fns", ("silu", "relu6", "silu")),
    ("encoder_block_types", ("ResBlock", "AttnBlock", "EfficientViTBlock")),
    ("decoder_layers_per_block", (1, 0, 2)), ("encoder_qkv_multiscales", ((), (5,))),
])
def test_unsupported_options_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        AutoencoderDC.from_config({**SANA, key: value})


def test_a_missing_weight_and_an_unknown_class(tmp_path):
    random_dc(tmp_path / "dc", SANA)
    cfg = json.loads((tmp_path / "dc" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderDC"
    tensors = load_file(tmp_path / "dc" / "diffusion_pytorch_model.safetensors")
    name = "decoder.up_blocks.2.1.attn.to_qkv_multiscale.0.proj_in.weight"
    del tensors[name]
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, tmp_path / "cut" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=rf"missing \(1\): {re.escape(name)}"):
        jdit.autoencoders.from_pretrained(tmp_path / "cut")
    (tmp_path / "cut" / "config.json").write_text(json.dumps({**cfg, "_class_name": "VQModel"}))
    with pytest.raises(ValueError, match="VQModel is not an AutoencoderKL or AutoencoderDC"):
        jdit.autoencoders.from_pretrained(tmp_path / "cut")


def test_the_loader_still_reads_an_autoencoder_kl(tmp_path):
    DiffusersKL(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",),
                up_block_types=("UpDecoderBlock2D",)).save_pretrained(tmp_path)
    vae, params = jdit.autoencoders.from_pretrained(tmp_path)
    assert isinstance(vae, AutoencoderKL) and "post_quant_conv" in params
