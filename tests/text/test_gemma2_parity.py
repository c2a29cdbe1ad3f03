"""Gemma-2 (SANA's text encoder) and its tokenizer against transformers on small random ones."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma2Model

import jdit
from jdit.testing.tiny_pipelines import gemma_tokenizer
from jdit.weights.state_dict import CheckpointMismatchError
from tests.helpers import rel_err

PROMPTS = ["a red circle in the top left", "", "big happy cat " * 30, "a dog on the moon"]


def config(**overrides):
    # 3 layers: sliding, full, sliding; a window of 5 that a 12-token prompt exceeds
    base = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=5,
                query_pre_attn_scalar=16, attn_logit_softcapping=2.0, pad_token_id=0)
    return Gemma2Config(**(base | overrides))


def random_model(cls, cfg, seed=0):
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms off their zero init, sharper attention
            p.add_(0.3 * torch.randn_like(p))
    return model


def batch(vocab, seed=1):
    ids = torch.randint(1, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding, as SANA tokenizes
    ids[1, 7:] = 0
    return ids, mask


@pytest.mark.parametrize("overrides", [{}, {"attn_logit_softcapping": None, "sliding_window": 64,
                                            "num_key_value_heads": 4}])
def test_last_hidden_state_matches_transformers(tmp_path, overrides):
    cfg = config(**overrides)
    reference = random_model(Gemma2Model, cfg)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    ids, mask = batch(cfg.vocab_size)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    module, params = jdit.text.from_pretrained(tmp_path)
    assert isinstance(module, jdit.text.Gemma2Encoder)
    got = jax.jit(module.apply)({"params": params}, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))
    # right padding: every position sees only itself and earlier tokens, so all of them agree
    assert got.shape == want.shape and rel_err(got, want) <= 1e-4
    # bfloat16 compute: same numbers within bfloat16 precision
    m16, p16 = jdit.text.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    got16 = jax.jit(m16.apply)({"params": p16}, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))
    assert got16.dtype == jnp.float32 and rel_err(got16, want) < 0.1


def test_causal_lm_folder_and_bad_folders(tmp_path):
    cfg = config()
    reference = random_model(Gemma2ForCausalLM, cfg, seed=2)
    reference.save_pretrained(tmp_path / "lm", safe_serialization=True)
    ids, mask = batch(cfg.vocab_size, seed=3)
    with torch.no_grad():
        want = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    module, params = jdit.text.from_pretrained(tmp_path / "lm")
    got = jax.jit(module.apply)({"params": params}, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))
    assert rel_err(got, want) <= 1e-4
    (tmp_path / "odd").mkdir()
    cfg_json = json.loads((tmp_path / "lm" / "config.json").read_text())
    (tmp_path / "odd" / "config.json").write_text(json.dumps(
        {**cfg_json, "hidden_activation": "relu"}))
    with pytest.raises(ValueError, match="hidden_activation"):
        jdit.text.from_pretrained(tmp_path / "odd")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "config.json").write_text(json.dumps(
        {**cfg_json, "num_hidden_layers": 4, "layer_types": None}))
    (tmp_path / "deep" / "model.safetensors").write_bytes(
        (tmp_path / "lm" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointMismatchError, match="missing"):
        jdit.text.from_pretrained(tmp_path / "deep")


def test_gemma_tokenizer_matches_transformers(tmp_path):
    reference = gemma_tokenizer(tmp_path / "spm")
    reference.save_pretrained(tmp_path / "tok")
    ours = jdit.text.GemmaTokenizer.from_pretrained(tmp_path / "tok")
    for length in (6, 40):
        want = reference(PROMPTS, padding="max_length", max_length=length, truncation=True,
                         add_special_tokens=True)
        got = ours(PROMPTS, max_length=length)
        np.testing.assert_array_equal(got["input_ids"], np.asarray(want["input_ids"]))
        np.testing.assert_array_equal(got["attention_mask"], np.asarray(want["attention_mask"]))
    assert got["input_ids"][0, 0] == reference.bos_token_id  # <bos> first
    for text in PROMPTS:
        assert ours.encode(text) == reference.encode(text)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        jdit.text.GemmaTokenizer.from_pretrained(tmp_path / "spm")


@pytest.mark.parametrize("hidden_layer", [-3, 2])
def test_an_intermediate_hidden_state_matches_transformers(tmp_path, hidden_layer):
    """LI-DiT's features: ``hidden_states[hidden_layer]`` (embeddings, each layer's output, the
    final norm's); the layers past it are neither loaded nor run."""
    cfg = config()
    reference = random_model(Gemma2Model, cfg)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    ids, mask = batch(cfg.vocab_size)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True
                         ).hidden_states[hidden_layer].numpy()
    module, params = jdit.text.from_pretrained(tmp_path, hidden_layer=hidden_layer)
    got = jax.jit(module.apply)({"params": params}, jnp.asarray(ids.numpy()),
                                jnp.asarray(mask.numpy()))
    assert rel_err(got, want) <= 1e-4
    assert "final_norm" not in params and f"layer_{hidden_layer % 4}" not in params
