"""LLM prompt encoders in TextToImage (LI-DiT configs): two decoders of different widths, an
instruction dropped after encoding, packed for the transformer's text refiner. The pipeline's
compiled program must give what the training path gives (jdit.pipelines.encoders, the features
jdit cache stores and the shapes task trains on) sampled step by step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdit
from jdit.pipelines import TextToImage
from jdit.pipelines.encoders import MultiTextEncoder, PretrainedTextEncoder
from jdit.pipelines.prompts import PromptEncoder
from jdit.pipelines.text_to_image import guidance_interval
from jdit.sampling import ClassifierFreeGuidance, sample
from jdit.testing import tiny_pipelines
from jdit.testing.tiny_pipelines import byte_level_tokenizer
from jdit.weights.llama import save_pretrained

PROMPTS = ["a red circle in the top left", "the small blue cup on a wooden table"]
INSTRUCTION = "Describe the image by detailing the colors and shapes:"
LENGTH = 10


def _llm(folder, width, seed):
    byte_level_tokenizer(folder, "llama")
    module = jdit.text.LlamaEncoder(vocab_size=300, hidden_size=width, intermediate_size=48,
                                    num_hidden_layers=3, num_attention_heads=2,
                                    num_key_value_heads=1)
    params = jdit.nn.perturbed(jdit.nn.init_params(module, jax.random.key(seed)),
                               jax.random.key(seed + 1), 0.3)
    save_pretrained(folder, params, module)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm_pipeline")
    tiny_pipelines.text_to_image(root / "pipe", "sigma")
    base = TextToImage.from_pretrained(root / "pipe")
    llms = [_llm(root / "llm_a", 32, 0), _llm(root / "llm_b", 24, 2)]
    refiner = dict(encoders=[[32, LENGTH], [24, LENGTH]], width=16, depth=1, num_heads=2)
    fields = {k: v for k, v in jdit.models.architecture(base.transformer).items()
              if k != "family"}
    transformer = jdit.models.build("pixart", **{**fields, "caption_channels": 32,
                                                 "text_refiner": refiner})
    params = jdit.nn.perturbed(jdit.nn.init_params(transformer, jax.random.key(4)),
                               jax.random.key(5), 0.05)
    encoders = [PromptEncoder.from_pretrained(f, max_length=LENGTH, hidden_layer=-2,
                                              instruction=INSTRUCTION) for f in llms]
    pipe = dataclasses.replace(base, transformer=transformer, transformer_params=params,
                               text_encoders=encoders)
    return pipe, llms


def test_the_program_equals_the_training_path_sampled_step_by_step(setup):
    pipe, llms = setup
    latents = np.asarray(jax.random.normal(jax.random.key(7), (2, 8, 8, 4)))
    got = pipe(PROMPTS, num_steps=4, guidance_scale=3.0, latents=latents,
               use_resolution_binning=False, output_type="latent", height=64, width=64)
    # the training side: each encoder on the host (instruction tokenized apart and dropped),
    # packed, then the transformer with classifier-free guidance through jdit.sampling
    text = MultiTextEncoder([PretrainedTextEncoder.from_pretrained(
        f, max_length=LENGTH, hidden_layer=-2, instruction=INSTRUCTION) for f in llms])
    assert text.layout == [(32, LENGTH), (24, LENGTH)]
    ctx, mask = text.encode(PROMPTS)
    null, null_mask = text.encode(["", ""])
    assert ctx.shape == (2, 2 * LENGTH, 32) and not ctx[:, LENGTH:, 24:].any()

    def fn(x, t, p, c, m):
        return pipe.transformer.apply({"params": p}, x, t, context=c, context_mask=m)

    spec = pipe.scheduler
    want = sample(ClassifierFreeGuidance(fn), jnp.asarray(latents), solver=spec.solver,
                  num_steps=4, schedule=spec.schedule, prediction=spec.prediction,
                  variance=spec.variance,
                  args=(3.0, pipe.transformer_params, jnp.concatenate([null, ctx]),
                        jnp.concatenate([null_mask, mask])))
    assert float(np.std(got)) > 0.1
    np.testing.assert_allclose(got, np.asarray(want), atol=2e-5, rtol=2e-5)


def test_prompts_are_not_lower_cased_and_bad_input_is_refused(setup):
    pipe, llms = setup
    enc = pipe.text_encoders[0]
    ids, mask, n = enc.tokens(["A Red Circle"])
    assert list(ids[0, n:n + 3]) == enc.tokenizer.encode("A Red Circle", False)[:3]
    assert mask.shape == (1, n + LENGTH)
    with pytest.raises(ValueError, match="max_sequence_length is each PromptEncoder"):
        pipe(PROMPTS, num_steps=1, max_sequence_length=8, height=64, width=64,
             use_resolution_binning=False)
    with pytest.raises(ValueError, match="empty list"):
        dataclasses.replace(pipe, text_encoders=[])
    with pytest.raises(ValueError, match="not both"):
        dataclasses.replace(enc, template="{prompt}")
    with pytest.raises(ValueError, match="must contain"):
        dataclasses.replace(enc, instruction=None, template="no placeholder")
    assert enc.limit == 2048  # the saved folder's max_position_embeddings
    with pytest.raises(ValueError, match=f"instruction is {n} tokens.*maximum length {n + 5}"):
        dataclasses.replace(enc, limit=n + 5).tokens(["a red circle"])
    with pytest.raises(ValueError, match="cfg_trunc_ratio must lie in"):
        pipe(PROMPTS, num_steps=1, cfg_trunc_ratio=1.5, height=64, width=64,
             use_resolution_binning=False)


def test_lumina_guidance_options_follow_diffusers_formulas():
    """``cfg_normalization``: the guided prediction times ‖cond‖ / ‖guided‖ over diffusers'
    last axis (the latent width); ``cfg_trunc_ratio``: guided while (i + 1) / N <= ratio."""
    from jdit.diffusion import FlowSchedule
    from jdit.pipelines.schedulers import SamplerSpec
    from jdit.sampling.solvers import _grid

    spec = SamplerSpec("euler", FlowSchedule(shift=6.0), "flow", None)
    ts = np.asarray(_grid(spec.schedule, 10)[0])
    for ratio, guided in ((1.0, 10), (0.25, 2), (0.3, 3), (0.05, 0)):
        interval = guidance_interval(spec, "euler", 10, ratio)
        on = ts >= (interval or (-np.inf,))[0]
        assert on.sum() == guided and on[:guided].all()  # the first, high-noise steps
    with pytest.raises(ValueError, match="euler"):
        guidance_interval(spec, "dpm++", 10, 0.5)

    rng = np.random.default_rng(0)
    out = rng.normal(size=(4, 3, 5, 2)).astype(np.float32)  # [uncond; cond], NHWC

    def fn(x, t):
        return jnp.asarray(out)

    got = ClassifierFreeGuidance(fn, rescale_axis=2)(jnp.zeros((2, 3, 5, 2)), jnp.zeros(2), 4.0)
    uncond, cond = out[:2].transpose(0, 3, 1, 2), out[2:].transpose(0, 3, 1, 2)  # to NCHW
    guided = uncond + 4.0 * (cond - uncond)
    want = guided * np.linalg.norm(cond, axis=-1, keepdims=True) / np.linalg.norm(
        guided, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), rtol=1e-5)
