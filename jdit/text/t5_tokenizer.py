"""T5 tokenisation from a transformers tokenizer folder, without transformers.

A folder holds ``tokenizer.json`` (the fast tokenizer transformers writes; read with the
``tokenizers`` library) or only ``spiece.model`` (older hub folders such as PixArt's; read with
``sentencepiece``). Either way the result is what transformers' T5 tokenizer gives with
``padding="max_length", truncation=True``: the pieces, cut to ``max_length - 1``, then ``</s>``,
then ``<pad>`` up to ``max_length``; the mask is 1 on the pieces and ``</s>``. Special tokens
written in a prompt (``</s>``, ``<pad>``, ``<unk>``, ``<extra_id_N>``) become their ids, as in
transformers, on both paths.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_INSTALL = 'pip install "jdit[pipelines]"'

# transformers 5 rebuilds a T5 tokenizer from the file's vocabulary and charsmap with this
# pre-tokenizer (split on whitespace, "▁" before every word: sentencepiece's behaviour) and
# ignores the file's own pre-tokenizer and extra normalizers, so jdit does the same.
_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "WhitespaceSplit"},
    {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True},
]}


def _token(config: dict[str, Any], key: str, default: str) -> str:
    """A special token's text from ``tokenizer_config.json`` (a string or an AddedToken dict)."""
    value = config.get(key) or default
    return str(value["content"]) if isinstance(value, dict) else str(value)


def _charsmap_only(normalizer: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``Precompiled`` (sentencepiece charsmap) part of a tokenizer.json normalizer."""
    if normalizer is None or normalizer.get("type") == "Precompiled":
        return normalizer
    kept = [n for n in normalizer.get("normalizers", []) if n.get("type") == "Precompiled"]
    return kept[0] if kept else None


class T5Tokenizer:
    """``tok(prompts, max_length) -> {"input_ids", "attention_mask"}`` (int32, (B, max_length))."""

    def __init__(self, encode: Callable[[list[str]], list[list[int]]], pad_id: int, eos_id: int,
                 source: str) -> None:
        self._encode, self.pad_id, self.eos_id, self.source = encode, pad_id, eos_id, source

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> T5Tokenizer:
        """From a tokenizer folder, or a pipeline folder holding one in ``tokenizer/``."""
        folder = Path(folder)
        if (folder / "tokenizer").is_dir() and not (folder / "tokenizer.json").exists():
            folder = folder / "tokenizer"  # a pipeline folder
        config = {}
        if (folder / "tokenizer_config.json").exists():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        if (folder / "tokenizer.json").exists():
            return cls._fast(folder / "tokenizer.json", config)
        if (folder / "spiece.model").exists():
            return cls._sentencepiece(folder / "spiece.model", config)
        raise FileNotFoundError(f"{folder}: neither tokenizer.json nor spiece.model")

    @classmethod
    def _fast(cls, path: Path, config: dict[str, Any]) -> T5Tokenizer:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError(f"reading {path} needs the tokenizers library: {_INSTALL}") from e
        spec = json.loads(path.read_text(encoding="utf-8"))
        spec.update(normalizer=_charsmap_only(spec.get("normalizer")),
                    pre_tokenizer=_PRE_TOKENIZER, truncation=None, padding=None)
        tok = Tokenizer.from_str(json.dumps(spec))
        pad = tok.token_to_id(_token(config, "pad_token", "<pad>"))
        eos = tok.token_to_id(_token(config, "eos_token", "</s>"))
        if pad is None or eos is None:
            raise ValueError(f"{path}: no <pad> or </s> token")

        def encode(texts: list[str]) -> list[list[int]]:
            # pieces without the post-processor's </s>: truncation and </s> are added later;
            # the file's added tokens (</s>, <extra_id_N>, ...) are matched in the text
            return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

        return cls(encode, pad, eos, str(path))

    @classmethod
    def _sentencepiece(cls, path: Path, config: dict[str, Any]) -> T5Tokenizer:
        try:
            import sentencepiece as spm
        except ImportError as e:
            raise ImportError(f"reading {path} needs sentencepiece: {_INSTALL}") from e
        sp = spm.SentencePieceProcessor(model_file=str(path))
        eos = sp.eos_id() if sp.eos_id() >= 0 else sp.piece_to_id("</s>")
        pad = sp.pad_id() if sp.pad_id() >= 0 else sp.piece_to_id("<pad>")
        # transformers appends extra_ids sentinels after the pieces, <extra_id_0> last
        n, extra = sp.get_piece_size(), int(config.get("extra_ids", 100))
        special = {f"<extra_id_{i}>": n + extra - 1 - i for i in range(extra)}
        special.update({_token(config, "pad_token", "<pad>"): pad,
                        _token(config, "eos_token", "</s>"): eos,
                        _token(config, "unk_token", "<unk>"): sp.unk_id()})
        split = re.compile("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True)))
                           + ")")

        def encode(texts: list[str]) -> list[list[int]]:
            out = []
            for text in texts:  # odd parts are special tokens, even parts plain text
                parts = split.split(text)
                ids: list[int] = []
                for i, part in enumerate(parts):
                    ids.extend([special[part]] if i % 2 else sp.encode(part))
                out.append(ids)
            return out

        return cls(encode, pad, eos, str(path))

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None,
                 padding: str = "max_length", truncation: bool = True
                 ) -> dict[str, np.ndarray]:
        """transformers' ``tokenizer(prompts, max_length=..., padding=..., truncation=...)``
        with ``padding`` "max_length" or "longest" (the longest row of this batch)."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        if max_length is None and (truncation or padding == "max_length"):
            raise ValueError(f"padding={padding!r}, truncation={truncation} need max_length")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        rows = [list(p[: max_length - 1] if truncation else p) + [self.eos_id]
                for p in self._encode(texts)]
        width = max_length if padding == "max_length" else max(map(len, rows), default=0)
        for i, row in enumerate(rows):
            if len(row) > width:
                raise ValueError(f"prompt {i} has {len(row)} tokens with </s>, more than "
                                 f"max_length={max_length}; pass truncation=True")
        ids = np.full((len(texts), width), self.pad_id, np.int32)
        mask = np.zeros((len(texts), width), np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}
