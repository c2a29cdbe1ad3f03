"""The T5 encoder and tokenizer against transformers, on small random models."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from transformers import T5Config, T5EncoderModel
from transformers import T5Tokenizer as HFTokenizer

import jdit
from jdit.benchmarks.tiny_pipeline import train_tokenizer
from jdit.parallel.rules import RULE_TABLES
from jdit.weights.state_dict import CheckpointMismatchError, flatten


def random_t5(folder, feed_forward="gated-gelu", **save_kwargs):
    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(
        vocab_size=200, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        feed_forward_proj=feed_forward, relative_attention_num_buckets=32,
        relative_attention_max_distance=20)).eval()
    with torch.no_grad():  # norms and the relative bias away from their initial values
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder, **save_kwargs)
    return model


def padded_batch():
    ids = torch.randint(0, 200, (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 25:] = 0
    mask[2, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "relu"])
def test_encoder_matches_transformers(tmp_path, feed_forward):
    reference = random_t5(tmp_path, feed_forward)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    t5, params = jdit.text.from_pretrained(tmp_path)
    got = np.asarray(t5.apply({"params": params}, jnp.asarray(ids.numpy()),
                              jnp.asarray(mask.numpy())))
    # every position, padded ones included (they attend to the unmasked keys)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4
    t5_16, p16 = jdit.text.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    got16 = np.asarray(t5_16.apply({"params": p16}, jnp.asarray(ids.numpy()),
                                   jnp.asarray(mask.numpy())))
    assert np.abs(got16 - want).max() / np.abs(want).max() < 5e-2


def test_sharded_checkpoints_and_bad_folders(tmp_path):
    random_t5(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    t5, params = jdit.text.from_pretrained(tmp_path / "sharded")
    assert t5.num_layers == 2 and params["shared"].shape == (200, 64)
    with pytest.raises(FileNotFoundError, match="config.json"):
        jdit.text.from_pretrained(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "sharded", bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    with pytest.raises(CheckpointMismatchError, match="encoder.block.2"):
        jdit.text.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "feed_forward_proj": "gated-tanh"}))
    with pytest.raises(ValueError, match="feed_forward_proj"):
        jdit.text.from_pretrained(bad)


def test_parameters_carry_logical_names_that_shard_with_fsdp():
    t5 = jdit.text.T5Encoder(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                             num_heads=4)
    boxed = t5.init(jax.random.key(0), **t5.example_inputs())["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) for x in leaves)
    fsdp = dict(RULE_TABLES["fsdp"])
    names = {k: v.names for k, v in flatten(boxed).items()}
    big = [k for k in names if k.endswith("kernel") or k == "shared"]
    assert big and all(any(fsdp.get(n) == "fsdp" for n in names[k]) for k in big)


PROMPTS = ["a red circle in the top left", "A happy cactus  in the desert", "",
           "the small blue cup on a wooden table with a big yellow dog and a snowy fox"]


def test_tokenizer_matches_transformers(tmp_path):
    train_tokenizer(tmp_path / "spm")
    reference = HFTokenizer.from_pretrained(str(tmp_path / "spm"))
    reference.save_pretrained(tmp_path / "saved")  # what a pipeline folder holds today
    assert (tmp_path / "saved" / "tokenizer.json").exists()
    want = reference(PROMPTS, max_length=12, padding="max_length", truncation=True)
    for folder in (tmp_path / "saved", tmp_path / "spm"):  # tokenizer.json / spiece.model only
        tok = jdit.text.T5Tokenizer.from_pretrained(folder)
        got = tok(PROMPTS, max_length=12)
        np.testing.assert_array_equal(got["input_ids"], np.asarray(want["input_ids"]))
        np.testing.assert_array_equal(got["attention_mask"], np.asarray(want["attention_mask"]))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        jdit.text.T5Tokenizer.from_pretrained(tmp_path)
