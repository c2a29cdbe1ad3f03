"""``PromptEncoder``: one text encoder of a pipeline, its tokenizer, and how prompts reach it.

PixArt's T5 and SANA's Gemma-2 are built into :class:`jdit.pipelines.TextToImage` as diffusers
runs them. LLM prompt encoders (LI-DiT's, Lumina-Image 2.0's) go through this class instead, one
or several per pipeline (several are packed for a model's ``text_refiner``):

    enc = PromptEncoder.from_pretrained("my_llm/", hidden_layer=-3, max_length=120,
                                        instruction="Describe the image by detailing ...:")
    pipe = TextToImage(transformer, params, None, None, None, vae, vae_params, scheduler,
                       text_encoders=[enc])

Two ways of putting text before the prompt:
- ``instruction`` (LI-DiT's usage guidance): tokenized apart and put before every prompt, the
  negative prompt included (it is how training encoded the empty caption); its positions are
  dropped from the features, which keep ``max_length`` prompt tokens;
- ``template`` (Lumina-Image 2.0's system prompt): a format string with ``{prompt}``, applied to
  positive prompts only (as diffusers' ``Lumina2Pipeline``); the whole sequence, template
  included, is the features, ``max_length`` tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array


@dataclasses.dataclass(eq=False)
class PromptEncoder:
    """A decoder LLM (or T5) and its tokenizer, as one prompt encoder of a pipeline."""

    module: nn.Module
    params: Any
    tokenizer: Any
    max_length: int
    instruction: str | None = None
    template: str | None = None
    rms_norm: bool = False  # each token's features over their RMS (as the training data had)
    limit: int | None = None  # the encoder's maximum length (config's max_position_embeddings)

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if self.instruction is not None and self.template is not None:
            raise ValueError("a prompt encoder takes an instruction (dropped after encoding) or "
                             "a template (kept), not both")
        if self.template is not None and "{prompt}" not in self.template:
            raise ValueError(f"template must contain '{{prompt}}', got {self.template!r}")
        if self.instruction is not None and not hasattr(self.tokenizer, "with_instruction"):
            raise ValueError("an instruction needs a tokenizer.json tokenizer "
                             "(jdit.text.JsonTokenizer)")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, max_length: int = 300,
                        hidden_layer: int | None = None, instruction: str | None = None,
                        template: str | None = None, rms_norm: bool = False,
                        dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
                        ) -> PromptEncoder:
        """A transformers folder (Gemma-2, Llama, Qwen2 or T5; a pipeline's ``text_encoder/``
        works) with its tokenizer beside it or in ``../tokenizer``."""
        from jdit import text

        folder = Path(path)
        module, params = text.from_pretrained(folder, dtype, param_dtype=param_dtype,
                                              hidden_layer=hidden_layer)
        if (folder / "text_encoder").is_dir() and not (folder / "config.json").exists():
            folder = folder / "text_encoder"
        tok_dir = folder.parent / "tokenizer" if (folder.parent / "tokenizer").is_dir() and \
            not (folder / "tokenizer.json").exists() else folder
        is_t5 = type(module).__name__.startswith("T5")
        tokenizer = (text.T5Tokenizer if is_t5 else text.JsonTokenizer).from_pretrained(tok_dir)
        return cls(module, params, tokenizer, max_length, instruction, template, rms_norm,
                   max_positions(folder))

    @property
    def width(self) -> int:
        """The features' width (hidden size)."""
        return int(getattr(self.module, "hidden_size", None) or self.module.d_model)

    def tokens(self, texts: Sequence[str], negative: bool = False
               ) -> tuple[np.ndarray, np.ndarray, int]:
        """``(ids, mask, n)`` on the host: what :meth:`features` encodes, ``n`` leading
        positions (the instruction's) to drop."""
        texts = list(texts)
        if self.instruction is not None:
            tokens, n = self.tokenizer.with_instruction(texts, self.instruction, self.max_length,
                                                        limit=self.limit)
        else:
            if self.template is not None and not negative:
                texts = [self.template.replace("{prompt}", t) for t in texts]
            tokens, n = self.tokenizer(texts, max_length=self.max_length), 0
        return (np.asarray(tokens["input_ids"], np.int32),
                np.asarray(tokens["attention_mask"], np.int32), n)

    def features(self, params: Any, ids: Array, mask: Array, n: int) -> tuple[Array, Array]:
        """Inside the program: ``(features (B, L, width) float32, mask (B, L))`` with the
        instruction's ``n`` positions dropped."""
        out = self.module.apply({"params": params}, ids, mask).astype(jnp.float32)
        if self.rms_norm:
            out = token_rms_norm(out)
        return out[:, n:], mask[:, n:]


def token_rms_norm(x: Array, eps: float = 1e-6) -> Array:
    """Each token's features over their root mean square (float32, no parameters)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def max_positions(folder: Path) -> int | None:
    """A transformers folder's ``max_position_embeddings`` (None when it records none)."""
    import json

    for cfg in (folder / "config.json", folder / "text_encoder" / "config.json"):
        if cfg.is_file():
            value = json.loads(cfg.read_text()).get("max_position_embeddings")
            return int(value) if isinstance(value, int) else None
    return None


def pack(parts: Sequence[tuple[Array, Array]]) -> tuple[Array, Array]:
    """One encoder's ``(features, mask)`` as they are; several packed along the sequence with
    zero-padded widths (:func:`jdit.nn.pack_contexts`, what a ``text_refiner`` splits)."""
    if len(parts) == 1:
        return parts[0]
    from jdit.nn import pack_contexts

    return pack_contexts([f for f, _ in parts], [m for _, m in parts])
