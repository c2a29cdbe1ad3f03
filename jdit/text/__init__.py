"""Text encoders: T5 (PixArt's), Gemma-2 (SANA's) and Llama / Qwen2 decoders (LI-DiT's LLM
encoders) with their tokenizers, and the small word-level encoder the embedded datasets use."""

from jdit.text.gemma2 import Gemma2Encoder
from jdit.text.json_tokenizer import GemmaTokenizer, JsonTokenizer
from jdit.text.llama import LlamaEncoder
from jdit.text.loading import from_pretrained
from jdit.text.t5 import T5Encoder
from jdit.text.t5_tokenizer import T5Tokenizer
from jdit.text.words import WordEncoder, tokenize

__all__ = ["Gemma2Encoder", "GemmaTokenizer", "JsonTokenizer", "LlamaEncoder", "T5Encoder",
           "T5Tokenizer", "WordEncoder", "from_pretrained", "tokenize"]
