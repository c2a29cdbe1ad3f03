"""jdit's T5 encoder against transformers' ``T5EncoderModel`` on small random checkpoints.

Every weight is perturbed away from its initialisation (norm scales ~1 ± 0.3, a relative bias of
unit scale), so a missing norm, a transposed matrix or a wrong bucket shows up as a large error.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from transformers import (
    MT5Config,
    MT5EncoderModel,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
)

import jdit
from jdit.nn import LOGICAL_AXES, abstract_params
from jdit.parallel.rules import RULE_TABLES, rules_for, spec_for
from jdit.weights import CheckpointMismatchError, read_safetensors, write_safetensors
from jdit.weights.state_dict import flatten
from tests.helpers import rel_err

CONFIG = dict(vocab_size=200, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
              relative_attention_num_buckets=32, relative_attention_max_distance=128)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "relative_attention_bias" in name:
                p.copy_(noise)
            elif "layer_norm" in name:
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.add_(0.3 * p.std() * noise)
    return model.eval()


def random_encoder(feed_forward: str = "gated-gelu") -> T5EncoderModel:
    torch.manual_seed(0)
    return randomize(T5EncoderModel(T5Config(**CONFIG, feed_forward_proj=feed_forward)))


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 48 tokens with 48, 30 and 5 real ones (the mask is 0 at the end)."""
    ids = torch.randint(0, CONFIG["vocab_size"], (3, 48), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 48, dtype=torch.long)
    mask[1, 30:] = 0
    mask[2, 5:] = 0
    return ids, mask


def reference(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()


def run(folder, ids, mask, **kwargs) -> np.ndarray:
    t5, params = jdit.text.from_pretrained(folder, **kwargs)
    return np.asarray(jax.jit(t5.apply)({"params": params}, jnp.asarray(ids.numpy()),
                               jnp.asarray(mask.numpy())), np.float32)


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "relu", "gated-silu", "gelu"])
def test_float32_matches_transformers(tmp_path, feed_forward):
    model = random_encoder(feed_forward)
    model.save_pretrained(tmp_path, safe_serialization=True)
    ids, mask = padded_batch()
    got = run(tmp_path, ids, mask)
    want = reference(model, ids, mask)  # sdpa, transformers 5's default
    real = mask.numpy().astype(bool)
    assert rel_err(got[real], want[real]) <= 1e-4
    # padded queries still attend to the real keys, as in transformers: same values there too
    assert rel_err(got[~real], want[~real]) <= 1e-4
    model.set_attn_implementation("eager")  # adds the mask to the bias instead of masking it
    assert rel_err(got, reference(model, ids, mask)) <= 1e-4


def test_mt5_checkpoints_load(tmp_path):
    torch.manual_seed(0)
    model = randomize(MT5EncoderModel(MT5Config(**CONFIG)))  # T5 v1.1 layout, model_type "mt5"
    model.save_pretrained(tmp_path)
    ids, mask = padded_batch()
    assert rel_err(run(tmp_path, ids, mask), reference(model, ids, mask)) <= 1e-4


def test_relative_bias_and_norms_matter(tmp_path):
    random_encoder().save_pretrained(tmp_path)
    ids, mask = padded_batch()
    t5, params = jdit.text.from_pretrained(tmp_path)
    out = jax.jit(t5.apply)({"params": params}, ids.numpy(), mask.numpy())
    for key in ("relative_attention_bias", "final_norm"):
        changed = dict(params, **{key: jax.tree.map(jnp.ones_like, params[key])})
        assert rel_err(np.asarray(jax.jit(t5.apply)({"params": changed}, ids.numpy(), mask.numpy())),
                       np.asarray(out)) > 1e-2, key


def test_bfloat16_compute_stays_close(tmp_path):
    model = random_encoder()
    model.save_pretrained(tmp_path)
    ids, mask = padded_batch()
    want = reference(model, ids, mask)
    assert rel_err(run(tmp_path, ids, mask, dtype=jnp.bfloat16), want) <= 2e-2
    t5, params = jdit.text.from_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    got = jax.jit(t5.apply)({"params": params}, ids.numpy(), mask.numpy())
    assert rel_err(np.asarray(got, np.float32), want) <= 5e-2


def test_sharded_full_model_and_pipeline_folders(tmp_path):
    model = random_encoder()
    ids, mask = padded_batch()
    want = reference(model, ids, mask)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert rel_err(run(tmp_path / "sharded", ids, mask), want) <= 1e-4
    # a pipeline folder, by its root or its text_encoder/
    shutil.copytree(tmp_path / "sharded", tmp_path / "pipe" / "text_encoder")
    for folder in (tmp_path / "pipe", tmp_path / "pipe" / "text_encoder"):
        assert rel_err(run(folder, ids, mask), want) <= 1e-4
    # T5ForConditionalGeneration: decoder.* (and lm_head) are skipped
    torch.manual_seed(0)
    full = randomize(T5ForConditionalGeneration(T5Config(
        **CONFIG, num_decoder_layers=1, feed_forward_proj="gated-gelu", tie_word_embeddings=False)))
    full.save_pretrained(tmp_path / "full")
    assert any(k.startswith("decoder.") for k in read_safetensors(tmp_path / "full" /
                                                                    "model.safetensors"))
    assert rel_err(run(tmp_path / "full", ids, mask), reference(full.encoder, ids, mask)) <= 1e-4


def test_token_table_under_either_name(tmp_path):
    model = random_encoder()
    model.save_pretrained(tmp_path)
    ids, mask = padded_batch()
    want = reference(model, ids, mask)
    file = tmp_path / "model.safetensors"
    tensors = {k: np.array(v) for k, v in read_safetensors(file).items()}
    table = tensors.pop("shared.weight")
    write_safetensors(file, {**tensors, "encoder.embed_tokens.weight": table})
    assert rel_err(run(tmp_path, ids, mask), want) <= 1e-4
    write_safetensors(file, {**tensors, "encoder.embed_tokens.weight": table,
                             "shared.weight": table})
    assert rel_err(run(tmp_path, ids, mask), want) <= 1e-4


def test_clear_errors(tmp_path):
    model = random_encoder()
    model.save_pretrained(tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="config.json"):
        jdit.text.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "no_weights").mkdir()
    shutil.copy(tmp_path / "ok" / "config.json", tmp_path / "no_weights")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        jdit.text.from_pretrained(tmp_path / "no_weights")
    (tmp_path / "no_weights" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.bin"):
        jdit.text.from_pretrained(tmp_path / "no_weights")

    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "ok", bad)
    tensors = {k: np.array(v) for k, v in read_safetensors(bad / "model.safetensors").items()}
    del tensors["encoder.block.1.layer.0.SelfAttention.k.weight"]
    tensors["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.zeros(3, np.float32)
    write_safetensors(bad / "model.safetensors", tensors)
    with pytest.raises(CheckpointMismatchError) as info:
        jdit.text.from_pretrained(bad)
    assert info.value.missing == ["encoder.block.1.layer.0.SelfAttention.k.weight"]
    assert info.value.unexpected == ["encoder.block.0.layer.0.SelfAttention.extra.weight"]
    for change, error, match in (
        ({"d_ff": 96}, CheckpointMismatchError, "wrong shape"),
        ({"feed_forward_proj": "relu", "is_gated_act": False}, CheckpointMismatchError,
         "DenseReluDense.wi.weight"),
        ({"feed_forward_proj": "relu"}, ValueError, "is_gated_act"),  # saved True contradicts
        ({"feed_forward_proj": "gated-tanh"}, ValueError, "feed_forward_proj"),
        ({"model_type": "umt5"}, ValueError, "UMT5"),
        ({"model_type": "bert"}, ValueError, "not T5"),
    ):
        (tmp_path / "ok" / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(error, match=match):
            jdit.text.from_pretrained(tmp_path / "ok")


def test_from_config_ignores_decoder_fields_and_names_missing_ones():
    t5 = jdit.text.T5Encoder.from_config({**CONFIG, "num_decoder_layers": 7, "is_decoder": False,
                                          "feed_forward_proj": "gated-gelu", "use_cache": True})
    assert (t5.num_layers, t5.d_ff, t5.feed_forward_proj) == (2, 128, "gated-gelu")
    with pytest.raises(ValueError, match="d_kv"):
        jdit.text.T5Encoder.from_config({k: v for k, v in CONFIG.items() if k != "d_kv"})


def test_logical_axes_shard_big_matrices_with_fsdp():
    t5 = jdit.text.T5Encoder.from_config({**CONFIG, "feed_forward_proj": "gated-gelu"})
    boxed = abstract_params(t5, boxed=True)
    leaves = flatten(boxed)
    # table, relative bias, final norm; per block q k v o, two norms, wi_0 wi_1 wo
    assert len(leaves) == 3 + 2 * 9
    mesh = jax.sharding.AbstractMesh((2,), ("fsdp",))
    rules = rules_for("fsdp", mesh)
    assert dict(RULE_TABLES["fsdp"])["embed"] == "fsdp"
    for path, leaf in leaves.items():
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == len(leaf.value.shape), path
        assert set(leaf.names) - {None} <= set(LOGICAL_AXES), (path, leaf.names)
        if path.endswith("kernel") or path == "shared":
            spec = spec_for(leaf.names, leaf.value.shape, rules, mesh)
            assert "fsdp" in tuple(spec), (path, leaf.names, spec)
