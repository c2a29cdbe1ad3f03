"""Autoencoders: AutoencoderKL (the SD / SDXL VAEs of PixArt), with tiled decoding (blended, or
exact with whole-image GroupNorm statistics) and exact tiled encoding, and AutoencoderDC (SANA's
DC-AE; not tiled)."""

from jdit.autoencoders.dc import AutoencoderDC
from jdit.autoencoders.exact_tiling import decode_tiled_exact, encode_tiled_exact
from jdit.autoencoders.kl import AutoencoderKL
from jdit.autoencoders.loading import from_pretrained
from jdit.autoencoders.tiling import decode_tiled

__all__ = ["AutoencoderDC", "AutoencoderKL", "decode_tiled", "decode_tiled_exact",
           "encode_tiled_exact", "from_pretrained"]
