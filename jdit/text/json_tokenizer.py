"""Tokenizers saved as ``tokenizer.json`` (Gemma's, Llama's, Qwen2's), read with ``tokenizers``.

The file's own model, normaliser and post-processor are used as they are (Gemma's and Llama's add
their ``<bos>``, Qwen2's nothing), with right padding to ``max_length`` and truncation to it: what
transformers' fast tokenizers do with ``padding="max_length", truncation=True`` and
``padding_side="right"``, as diffusers' ``SanaPipeline`` calls Gemma's. A tokenizer without a pad
token (Llama's) pads with its end-of-sequence token, as pipelines set ``pad_token = eos_token``;
padded positions are masked out either way.

:meth:`JsonTokenizer.with_instruction` is LI-DiT's usage guidance: an instruction, tokenized
apart, before each prompt; the encoder's features at its positions are dropped afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class JsonTokenizer:
    """``tok(prompts, max_length) -> {"input_ids", "attention_mask"}`` (int32, (B, max_length));
    ``tok.encode(text)`` the ids with special tokens (transformers' ``encode``)."""

    def __init__(self, tokenizer: Any, pad_id: int, pad_token: str, source: str) -> None:
        self._tok, self.pad_id, self.pad_token, self.source = tokenizer, pad_id, pad_token, source

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> JsonTokenizer:
        """From a tokenizer folder (``tokenizer.json``, and ``tokenizer_config.json`` for the pad
        token), or a pipeline folder holding one in ``tokenizer/``."""
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("reading a tokenizer.json needs the tokenizers library: "
                              "pip install 'jdit[pipelines]'") from e
        folder = Path(folder)
        if (folder / "tokenizer").is_dir() and not (folder / "tokenizer.json").exists():
            folder = folder / "tokenizer"
        path = folder / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json (a Gemma, Llama or Qwen2 "
                                    f"tokenizer folder)")
        config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").exists():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        tok = Tokenizer.from_file(str(path))
        tok.no_truncation()
        tok.no_padding()
        pad = _token(config.get("pad_token"))
        if pad is None:  # Llama's: no pad token; pipelines pad with the end-of-sequence token
            pad = _token(config.get("eos_token"))
            if pad is None and tok.token_to_id("<pad>") is not None:
                pad = "<pad>"
        if pad is None:
            raise ValueError(f"{folder}: no pad_token or eos_token in tokenizer_config.json and "
                             f"no <pad> in the vocabulary; cannot pad prompts")
        pad_id = tok.token_to_id(pad)
        if pad_id is None:
            raise ValueError(f"{path}: pad token {pad!r} is not in the vocabulary")
        return cls(tok, pad_id, pad, str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

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

    def with_instruction(self, prompts: str | Sequence[str], instruction: str, max_length: int,
                         *, limit: int | None = None) -> tuple[dict[str, np.ndarray], int]:
        """``(tokens, n)``: the instruction's ids (with the tokenizer's leading special tokens,
        without trailing ones) followed by each prompt's ids, (B, n + max_length), right-padded,
        the prompt truncated to ``max_length`` tokens. Keep positions ``n:`` of the encoder's
        output (and of the mask) to drop the instruction. Tokenized apart, so that no token
        straddles the boundary. ``limit``: the encoder's maximum length (its position table),
        which ``n + max_length`` may not exceed."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        prefix, empty = self.encode(instruction), self.encode("")
        lead = 0  # the specials encode("") puts before the text (<bos>); the rest trail (<eos>)
        while lead < min(len(empty), len(prefix)) and prefix[lead] == empty[lead]:
            lead += 1
        if len(empty) > lead:
            prefix = prefix[:len(prefix) - (len(empty) - lead)]
        n = len(prefix)
        if limit is not None and n + max_length > limit:
            raise ValueError(f"the instruction is {n} tokens; with max_length {max_length} that "
                             f"is {n + max_length}, longer than the encoder's maximum length "
                             f"{limit}: shorten the instruction or lower max_length")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = np.full((len(texts), n + max_length), self.pad_id, np.int32)
        mask = np.zeros_like(ids)
        for row, text in enumerate(texts):
            body = self.encode(text, add_special_tokens=False)[:max_length]
            ids[row, :n + len(body)] = prefix + body
            mask[row, :n + len(body)] = 1
        return {"input_ids": ids, "attention_mask": mask}, n


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


GemmaTokenizer = JsonTokenizer  # SANA's; the name earlier releases exported
