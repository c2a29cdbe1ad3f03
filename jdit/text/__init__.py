"""Text encoders: T5 (PixArt's) with its tokenizer, and the small word-level encoder the
embedded datasets use."""

from jdit.text.loading import from_pretrained
from jdit.text.t5 import T5Encoder
from jdit.text.tokenizer import T5Tokenizer
from jdit.text.words import WordEncoder, tokenize

__all__ = ["T5Encoder", "T5Tokenizer", "WordEncoder", "from_pretrained", "tokenize"]
