"""The Gemma tokenizer SANA pipelines ship (``tokenizer.json``), read with ``tokenizers``.

The file's own model, normaliser and post-processor are used as they are (Gemma's adds
``<bos>``), with right padding to ``max_length`` and truncation to it: what transformers'
Gemma tokenizer does with ``padding="max_length", truncation=True`` and
``padding_side="right"``, as diffusers' ``SanaPipeline`` calls it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class GemmaTokenizer:
    """``tok(prompts, max_length) -> {"input_ids", "attention_mask"}`` (int32, (B, max_length));
    ``tok.encode(text)`` the ids with special tokens (transformers' ``encode``)."""

    def __init__(self, tokenizer: Any, pad_id: int, pad_token: str, source: str) -> None:
        self._tok, self.pad_id, self.pad_token, self.source = tokenizer, pad_id, pad_token, source

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> GemmaTokenizer:
        """From a tokenizer folder (``tokenizer.json``), or a pipeline folder holding one in
        ``tokenizer/``."""
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("reading a Gemma tokenizer needs the tokenizers library: "
                              "pip install 'jdit[pipelines]'") from e
        folder = Path(folder)
        if (folder / "tokenizer").is_dir() and not (folder / "tokenizer.json").exists():
            folder = folder / "tokenizer"
        path = folder / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json (a Gemma tokenizer folder)")
        config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").exists():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        pad = config.get("pad_token", "<pad>")
        pad = pad.get("content", "<pad>") if isinstance(pad, dict) else pad
        tok = Tokenizer.from_file(str(path))
        tok.no_truncation()
        tok.no_padding()
        pad_id = tok.token_to_id(pad)
        if pad_id is None:
            raise ValueError(f"{path}: pad token {pad!r} is not in the vocabulary")
        return cls(tok, pad_id, pad, str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def __call__(self, prompts: str | Sequence[str], max_length: int) -> dict[str, np.ndarray]:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        self._tok.enable_truncation(max_length)
        self._tok.enable_padding(direction="right", pad_id=self.pad_id, pad_token=self.pad_token,
                                 length=max_length)
        try:
            rows = self._tok.encode_batch(texts, add_special_tokens=True)
        finally:
            self._tok.no_truncation()
            self._tok.no_padding()
        return {"input_ids": np.asarray([r.ids for r in rows], np.int32),
                "attention_mask": np.asarray([r.attention_mask for r in rows], np.int32)}
