"""T5 tokenisation from a transformers tokenizer folder, without transformers.

A folder holds ``tokenizer.json`` (the fast tokenizer transformers writes; read with the
``tokenizers`` library) or only ``spiece.model`` (older hub folders such as PixArt's; read with
``sentencepiece``). Either way the result is what transformers' T5 tokenizer gives with
``padding="max_length", truncation=True``: the pieces, cut to ``max_length - 1``, then ``</s>``,
then ``<pad>`` up to ``max_length``; the mask is 1 on the pieces and ``</s>``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_INSTALL = 'pip install "jdit[pipelines]"'


class T5Tokenizer:
    """``tok(prompts, max_length) -> {"input_ids", "attention_mask"}`` (int32, (B, max_length))."""

    def __init__(self, encode: Any, pad_id: int, eos_id: int, source: str) -> None:
        self._encode, self.pad_id, self.eos_id, self.source = encode, pad_id, eos_id, source

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> T5Tokenizer:
        folder = Path(folder)
        if (folder / "tokenizer").is_dir() and not (folder / "tokenizer.json").exists():
            folder = folder / "tokenizer"  # a pipeline folder
        config = {}
        if (folder / "tokenizer_config.json").exists():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        if (folder / "tokenizer.json").exists():
            return cls._fast(folder / "tokenizer.json", config)
        if (folder / "spiece.model").exists():
            return cls._sentencepiece(folder / "spiece.model")
        raise FileNotFoundError(f"{folder}: neither tokenizer.json nor spiece.model")

    @classmethod
    def _fast(cls, path: Path, config: dict[str, Any]) -> T5Tokenizer:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError(f"reading {path} needs the tokenizers library: {_INSTALL}") from e
        tok = Tokenizer.from_file(str(path))
        tok.no_padding()
        tok.no_truncation()
        pad = tok.token_to_id(config.get("pad_token") or "<pad>")
        eos = tok.token_to_id(config.get("eos_token") or "</s>")
        if pad is None or eos is None:
            raise ValueError(f"{path}: no <pad> or </s> token")

        def encode(texts: list[str]) -> list[list[int]]:
            # pieces without the post-processor's </s>: truncation and </s> are added below
            return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

        return cls(encode, pad, eos, str(path))

    @classmethod
    def _sentencepiece(cls, path: Path) -> T5Tokenizer:
        try:
            import sentencepiece as spm
        except ImportError as e:
            raise ImportError(f"reading {path} needs sentencepiece: {_INSTALL}") from e
        sp = spm.SentencePieceProcessor(model_file=str(path))
        eos = sp.eos_id() if sp.eos_id() >= 0 else sp.piece_to_id("</s>")
        pad = sp.pad_id() if sp.pad_id() >= 0 else sp.piece_to_id("<pad>")
        return cls(lambda texts: sp.encode(texts), pad, eos, str(path))

    def __call__(self, prompts: str | Sequence[str], max_length: int) -> dict[str, np.ndarray]:
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        ids = np.full((len(texts), max_length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), max_length), np.int32)
        for row, pieces in enumerate(self._encode(texts)):
            kept = list(pieces[: max_length - 1]) + [self.eos_id]
            ids[row, : len(kept)] = kept
            mask[row, : len(kept)] = 1
        return {"input_ids": ids, "attention_mask": mask}
