"""A small deterministic word-level text encoder for the embedded datasets.

Same interface as the T5 encoder (``encode(prompts) -> (features, mask)``), no parameters to
train: each vocabulary word maps to a fixed random unit vector (seeded), plus a sinusoidal
position code, so the model's caption projection learns everything. Like T5 it appends an
end-of-sequence token, so the empty prompt (the null caption for classifier-free guidance) is one
valid token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence

import numpy as np

SPECIAL = ("<pad>", "<eos>", "<unk>")


def tokenize(text: str) -> list[str]:
    """Lower-case words; punctuation is dropped."""
    return re.findall(r"[a-z0-9]+", text.lower())


@dataclasses.dataclass(frozen=True)
class WordEncoder:
    """``encode(prompts) -> (features (B, max_length, dim) float32, mask (B, max_length) int32)``."""

    vocabulary: tuple[str, ...]
    dim: int = 64
    max_length: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim % 2:
            raise ValueError(f"WordEncoder dim must be even, got {self.dim}")
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise ValueError("WordEncoder vocabulary has duplicate words")

    @classmethod
    def from_texts(cls, texts: Sequence[str], dim: int = 64, max_length: int = 16,
                   seed: int = 0) -> WordEncoder:
        words = sorted({w for t in texts for w in tokenize(t)})
        return cls(tuple(words), dim, max_length, seed)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(SPECIAL + self.vocabulary)}

    @functools.cached_property
    def _table(self) -> np.ndarray:
        """Word vectors: fixed random unit vectors in the first half of the channels."""
        rng = np.random.default_rng(self.seed)
        half = self.dim // 2
        table = rng.standard_normal((len(SPECIAL) + len(self.vocabulary), half))
        table /= np.linalg.norm(table, axis=1, keepdims=True)
        table[0] = 0.0  # <pad>
        return table.astype(np.float32)

    @functools.cached_property
    def _positions(self) -> np.ndarray:
        """Sinusoidal position code in the second half of the channels."""
        half = self.dim // 2
        pos = np.arange(self.max_length)[:, None]
        freq = np.exp(-math.log(100.0) * np.arange(half // 2) / max(half // 2, 1))
        code = np.concatenate([np.sin(pos * freq), np.cos(pos * freq)], axis=1)
        return np.pad(code, ((0, 0), (0, half - code.shape[1]))).astype(np.float32)

    def token_ids(self, prompt: str) -> list[int]:
        words = tokenize(prompt)
        if len(words) + 1 > self.max_length:
            raise ValueError(f"prompt has {len(words)} words; max_length {self.max_length} "
                             f"allows {self.max_length - 1}: {prompt!r}")
        unknown = sorted({w for w in words if w not in self._index})
        if unknown:
            # an unknown word would become <unk>: a prompt quietly different from the one asked
            shown = ", ".join(self.vocabulary[:40]) + (" ..." if len(self.vocabulary) > 40 else "")
            raise ValueError(f"{prompt!r}: {', '.join(map(repr, unknown))} not in this model's "
                             f"vocabulary of {len(self.vocabulary)} words ({shown})")
        return [self._index[w] for w in words] + [self._index["<eos>"]]

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(prompts, str):
            raise TypeError("encode takes a sequence of prompts, not a single string")
        b, half = len(prompts), self.dim // 2
        features = np.zeros((b, self.max_length, self.dim), np.float32)
        mask = np.zeros((b, self.max_length), np.int32)
        for i, prompt in enumerate(prompts):
            ids = self.token_ids(prompt)
            features[i, : len(ids), :half] = self._table[ids]
            features[i, : len(ids), half:] = self._positions[: len(ids)]
            mask[i, : len(ids)] = 1
        return features, mask
