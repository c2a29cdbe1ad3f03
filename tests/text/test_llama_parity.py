"""Llama and Qwen2 decoders (LI-DiT's LLM prompt encoders) against transformers on small random
ones: the last hidden state and an intermediate one, with padded prompts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, Qwen2Config, Qwen2Model

import jdit
from jdit.weights.state_dict import CheckpointMismatchError
from tests.helpers import rel_err
from tests.text.test_gemma2_parity import batch, random_model

SMALL = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, rope_theta=500.0,
             rms_norm_eps=1e-5)


CASES = [(LlamaModel, LlamaConfig(**SMALL)),
         (LlamaModel, LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True, head_dim=16)),
         (Qwen2Model, Qwen2Config(**SMALL))]


@pytest.mark.parametrize("cls, cfg", CASES, ids=["llama", "llama_biases_head16", "qwen2"])
@pytest.mark.parametrize("hidden_layer", [-1, -3, 0])
def test_hidden_states_match_transformers(tmp_path, cls, cfg, hidden_layer):
    reference = random_model(cls, cfg)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    ids, mask = batch(cfg.vocab_size)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True
                         ).hidden_states[hidden_layer].numpy()
    module, params = jdit.text.from_pretrained(tmp_path, hidden_layer=hidden_layer)
    assert isinstance(module, jdit.text.LlamaEncoder)
    got = jax.jit(module.apply)({"params": params}, jnp.asarray(ids.numpy()),
                                jnp.asarray(mask.numpy()))
    # right padding: every position sees only itself and earlier tokens, so all of them agree
    assert got.shape == want.shape and rel_err(got, want) <= 1e-4
    # the layers past the one asked for are not loaded
    kept = {k.split("/")[0] for k in params}
    assert ("final_norm" in kept) == (hidden_layer == -1)
    assert sum(k.startswith("layer_") for k in kept) == hidden_layer % 5


def test_a_causal_lm_folder_loads_and_bad_input_is_refused(tmp_path):
    cfg = LlamaConfig(**SMALL)
    random_model(LlamaForCausalLM, cfg).save_pretrained(tmp_path, safe_serialization=True)
    module, _ = jdit.text.from_pretrained(tmp_path, hidden_layer=-3)  # the LM head is not read
    assert module.hidden_layer == -3
    for bad in (5, -6):
        with pytest.raises(ValueError, match="outside a model of 4 layers"):
            jdit.text.from_pretrained(tmp_path, hidden_layer=bad)
    # a tensor of another shape is named, not silently dropped
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(40, 32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match="layers.0.mlp.up_proj.weight"):
        jdit.text.from_pretrained(tmp_path)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_jdit_decoder_saves_a_folder_transformers_reads(tmp_path, model_type):
    """``jdit.weights.llama.save_pretrained``: a decoder trained in jdit (the toy LM prompt
    encoders of ``jdit bench llm``) is a causal-LM folder transformers runs to the same hidden
    states and, through the tied embeddings, the same logits."""
    from transformers import AutoModelForCausalLM

    from jdit.text.llama import lm_logits
    from jdit.weights.llama import save_pretrained

    fields = {k: v for k, v in SMALL.items() if k != "pad_token_id"}
    module = jdit.text.LlamaEncoder(model_type=model_type, **fields)
    params = jdit.nn.perturbed(jdit.nn.init_params(module, jax.random.key(0)),
                               jax.random.key(1), 0.3)
    save_pretrained(tmp_path, params, module)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = batch(SMALL["vocab_size"])
    with torch.no_grad():
        out = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hidden = jax.jit(module.apply)({"params": params}, jnp.asarray(ids.numpy()),
                                   jnp.asarray(mask.numpy()))
    assert rel_err(hidden, out.hidden_states[-1].numpy()) <= 1e-4
    assert rel_err(lm_logits(params, hidden), out.logits.numpy()) <= 1e-4
    loaded, again = jdit.text.from_pretrained(tmp_path)
    assert loaded == module
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params), strict=True):
        assert bool(jnp.all(a == b))
    short = jdit.text.LlamaEncoder(model_type=model_type, hidden_layer=-2, **fields)
    with pytest.raises(ValueError, match="export needs every layer"):
        save_pretrained(tmp_path / "short", params, short)
