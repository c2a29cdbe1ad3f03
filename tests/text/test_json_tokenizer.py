"""``tokenizer.json`` tokenizers (Gemma's is tested with the Gemma-2 encoder) against
transformers: Llama-3's (a <bos>, no pad token) and Qwen2's (no specials, its own pad), and
LI-DiT's instruction prefix."""

from __future__ import annotations

import numpy as np
import pytest

import jdit
from jdit.testing.tiny_pipelines import byte_level_tokenizer

PROMPTS = ["a red circle", "the small blue square on the left and a green triangle", ""]
INSTRUCTION = "Describe the image by detailing the color, shape and spatial relationships:"


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tokenizers(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = byte_level_tokenizer(folder, request.param)
    return reference, jdit.text.JsonTokenizer.from_pretrained(folder), request.param


def test_ids_and_masks_match_transformers(tokenizers):
    reference, ours, style = tokenizers
    for length in (4, 24):
        want = reference(PROMPTS, padding="max_length", max_length=length, truncation=True)
        got = ours(PROMPTS, max_length=length)
        np.testing.assert_array_equal(got["input_ids"], np.asarray(want["input_ids"]))
        np.testing.assert_array_equal(got["attention_mask"], np.asarray(want["attention_mask"]))
    for text in PROMPTS:
        assert ours.encode(text) == reference.encode(text)
    # Llama's has no pad token: padded with its end-of-sequence token, as pipelines do
    assert ours.pad_token == ("<|end_of_text|>" if style == "llama" else "<|endoftext|>")


def test_the_instruction_is_tokenized_apart_and_its_positions_counted(tokenizers):
    reference, ours, style = tokenizers
    tokens, n = ours.with_instruction(PROMPTS, INSTRUCTION, 8)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    prefix = reference.encode(INSTRUCTION)  # with Llama's <bos>, Qwen2 adds none
    assert n == len(prefix) and ids.shape == mask.shape == (3, n + 8)
    for row, text in enumerate(PROMPTS):
        body = reference.encode(text, add_special_tokens=False)[:8]
        assert list(ids[row, :n + len(body)]) == prefix + body
        assert mask[row].sum() == n + len(body) and not mask[row, n + len(body):].any()
        assert (ids[row, n + len(body):] == ours.pad_id).all()
    assert (ids[:, 0] == reference.bos_token_id).all() == (style == "llama")


def test_bad_input_is_refused(tokenizers, tmp_path):
    _, ours, _ = tokenizers
    n = ours.with_instruction(["x"], INSTRUCTION, 4)[1]
    with pytest.raises(ValueError, match=f"instruction is {n} tokens.*maximum length {n + 3}"):
        ours.with_instruction(["x"], INSTRUCTION, 4, limit=n + 3)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        ours(["x"], 0)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        jdit.text.JsonTokenizer.from_pretrained(tmp_path)
