"""LoRA through TextToImage against diffusers' SanaPipeline: their file in jdit, jdit's file in
diffusers; the same images (max abs 1e-3 in [0, 1])."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from jdit import lora
from jdit.pipelines import TextToImage
from jdit.testing import tiny_pipelines

peft = pytest.importorskip("peft")

PROMPTS = ["A Red Circle in the top left ", "a happy cactus in the desert with a small blue cup"]
TOL = 1e-3
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point"]


def _images(pipe, latents, **kwargs):
    return pipe(PROMPTS, latents=latents, use_resolution_binning=False, clean_caption=False,
                output_type="np", num_inference_steps=6, height=32, width=32,
                guidance_scale=4.5, **kwargs).images


def _ours(pipe, latents):
    return pipe(PROMPTS, num_steps=6, latents=latents, height=32, width=32, guidance_scale=4.5,
                use_resolution_binning=False)


@pytest.mark.slow  # two pipelines, both directions
def test_sana_loras_match_diffusers_both_ways(tmp_path):
    from diffusers import SanaPipeline
    from peft.utils import get_peft_model_state_dict

    folder = tmp_path / "sana"
    reference = tiny_pipelines.sana(folder)
    gen = torch.Generator().manual_seed(0)
    nchw = torch.randn((2, 8, 8, 8), generator=gen)
    nhwc = nchw.permute(0, 2, 3, 1).numpy()
    base = _images(reference, nchw)
    # theirs: a PEFT adapter (random A and B, alpha != rank, cross-attention and 1x1 convs)
    config = peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=TARGETS)
    torch.manual_seed(7)
    reference.transformer.add_adapter(config)
    SanaPipeline.save_lora_weights(tmp_path / "theirs",
                                   transformer_lora_layers=get_peft_model_state_dict(
                                       reference.transformer),
                                   transformer_lora_adapter_metadata=config.to_dict())
    want = {1.0: _images(reference, nchw)}
    reference.transformer.set_adapters(["default"], [0.5])
    want[0.5] = _images(reference, nchw)
    assert np.abs(want[1.0] - base).max() > 0.05  # the LoRA changes the images
    assert np.abs(want[1.0] - want[0.5]).max() > 0.02  # and its scale matters
    pipe = TextToImage.from_pretrained(folder)
    name = pipe.load_lora_weights(tmp_path / "theirs")
    assert pipe.get_active_adapters() == [name]
    got = {1.0: _ours(pipe, nhwc)}
    pipe.set_adapters(name, 0.5)
    got[0.5] = _ours(pipe, nhwc)
    for scale in (1.0, 0.5):
        assert np.abs(got[scale] - want[scale]).max() <= TOL, scale
    pipe.fuse_lora()  # merged at the active weight 0.5
    assert np.abs(_ours(pipe, nhwc) - want[0.5]).max() <= TOL
    pipe.unload_lora_weights()
    assert np.abs(_ours(pipe, nhwc) - base).max() <= TOL

    # ours: random jdit adapters on every target set, written for diffusers
    adapters = lora.init(pipe.transformer_params, lora.LoraConfig(
        rank=3, alpha=5.0, targets=("attention", "cross_attention", "mlp")),
        jax.random.key(0), module=pipe.transformer)
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapters = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape)
                                         for k, x in zip(keys, leaves, strict=True)])
    written = lora.save(tmp_path / "ours", adapters, module=pipe.transformer)
    fresh = SanaPipeline.from_pretrained(folder)
    fresh.load_lora_weights(written)
    from peft.tuners.lora import LoraLayer

    # every adapter took: 2 blocks x (4 self-attention + 4 cross-attention + 2 Mix-FFN 1x1)
    assert sum(isinstance(m, LoraLayer) for m in fresh.transformer.modules()) == 20
    want = _images(fresh, nchw)
    pipe.load_lora_weights(written, adapter_name="ours")
    got = _ours(pipe, nhwc)
    assert np.abs(want - base).max() > 0.05
    assert np.abs(got - want).max() <= TOL
