"""Text encoders: the small word-level encoder for embedded data (T5 comes later)."""

from jdit.text.words import WordEncoder, tokenize

__all__ = ["WordEncoder", "tokenize"]
