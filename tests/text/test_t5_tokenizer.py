"""jdit's T5 tokenizer against transformers' on a sentencepiece model trained on the spot.

Three folder layouts: what transformers 5 saves (tokenizer.json), what older hub folders hold
(spiece.model and a tokenizer_config.json, e.g. PixArt's), and a tokenizer.json written by
transformers 4 (no whitespace splitting in its pre-tokenizer, a whitespace-collapsing normalizer).
"""

from __future__ import annotations

import io
import json
import shutil
import sys

import numpy as np
import pytest
import sentencepiece as spm
from transformers import T5Tokenizer as ReferenceTokenizer

from jdit.text import T5Tokenizer

SENTENCES = [
    "a photo of a red cat sitting on a wooden table",
    "an astronaut riding a horse on the moon, digital art",
    "Two small dogs play in the snowy forest at night.",
    "A painting of a blue cup of coffee; oil on canvas (1889)",
    "the big yellow triangle in the top left corner of the picture",
    "café crème brûlée and naïve façades, très jolie",
]
PROMPTS = [
    "a red cat",
    "",
    " ",
    "the big yellow dog sitting on the moon with an astronaut riding a horse in a snowy forest",
    "  Two\tsmall  dogs\n play   ",
    "Café (1889); ﬁne ＡＢＣ art!",
    "zebra ☃ 日本 qqq",
    "a cat</s>dog <pad> and <extra_id_3> x",
    "<unk><extra_id_0>",
]
LEGACY_CONFIG = {  # the shape of PixArt-α's tokenizer/tokenizer_config.json
    "additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)],
    "eos_token": "</s>", "extra_ids": 100, "legacy": True, "model_max_length": 512,
    "pad_token": "<pad>", "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer",
    "unk_token": "<unk>",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``{"saved", "legacy", "v4_json"}`` folders of one tokenizer."""
    root = tmp_path_factory.mktemp("t5_tokenizer")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20), model_writer=model, vocab_size=200,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        minloglevel=2)
    (root / "legacy").mkdir()
    (root / "legacy" / "spiece.model").write_bytes(model.getvalue())
    (root / "legacy" / "tokenizer_config.json").write_text(json.dumps(LEGACY_CONFIG))
    # transformers 5.23 ignores T5Tokenizer(vocab_file=...); from_pretrained reads spiece.model
    ReferenceTokenizer.from_pretrained(str(root / "legacy")).save_pretrained(root / "saved")
    shutil.copytree(root / "saved", root / "v4_json")
    spec = json.loads((root / "saved" / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        spec["normalizer"], {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]}
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581",
                             "prepend_scheme": "always", "split": True}
    (root / "v4_json" / "tokenizer.json").write_text(json.dumps(spec))
    return {name: root / name for name in ("saved", "legacy", "v4_json")}


def test_transformers_saves_tokenizer_json(folders):
    assert sorted(p.name for p in folders["saved"].iterdir()) == ["tokenizer.json",
                                                                  "tokenizer_config.json"]


@pytest.mark.parametrize("layout", ["saved", "legacy", "v4_json"])
@pytest.mark.parametrize("max_length", [8, 32])
def test_max_length_padding_matches_transformers(folders, layout, max_length):
    want = ReferenceTokenizer.from_pretrained(str(folders[layout]))(
        PROMPTS, max_length=max_length, padding="max_length", truncation=True)
    got = T5Tokenizer.from_pretrained(folders[layout])(PROMPTS, max_length)
    assert got["input_ids"].dtype == got["attention_mask"].dtype == np.int32
    assert got["input_ids"].shape == (len(PROMPTS), max_length)
    np.testing.assert_array_equal(got["input_ids"], np.asarray(want["input_ids"]))
    np.testing.assert_array_equal(got["attention_mask"], np.asarray(want["attention_mask"]))
    assert (got["input_ids"][3, -1], got["input_ids"][1, :2].tolist()) == (1, [1, 0])


@pytest.mark.parametrize("layout", ["saved", "legacy"])
def test_longest_padding_matches_transformers(folders, layout):
    reference = ReferenceTokenizer.from_pretrained(str(folders[layout]))
    tok = T5Tokenizer.from_pretrained(folders[layout])
    for kwargs in (dict(max_length=10, truncation=True), dict(truncation=False)):
        want = reference(PROMPTS, padding="longest", **kwargs)
        got = tok(PROMPTS, padding="longest", **kwargs)
        np.testing.assert_array_equal(got["input_ids"], np.asarray(want["input_ids"]))
        np.testing.assert_array_equal(got["attention_mask"], np.asarray(want["attention_mask"]))


def test_pipeline_folder_and_errors(folders, tmp_path, monkeypatch):
    shutil.copytree(folders["legacy"], tmp_path / "pipe" / "tokenizer")
    tok = T5Tokenizer.from_pretrained(tmp_path / "pipe")
    assert tok("a red cat", 6)["input_ids"].shape == (1, 6)
    with pytest.raises(FileNotFoundError, match="tokenizer.json nor spiece.model"):
        T5Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="truncation=True"):
        tok(PROMPTS, 8, truncation=False)
    with pytest.raises(ValueError, match="padding"):
        tok(PROMPTS, 8, padding="do_not_pad")
    with pytest.raises(ValueError, match="max_length"):
        tok(PROMPTS)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    for layout in ("saved", "legacy"):
        with pytest.raises(ImportError, match=r"jdit\[pipelines\]"):
            T5Tokenizer.from_pretrained(folders[layout])
