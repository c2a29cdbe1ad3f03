"""Autoencoders: AutoencoderKL (the SD / SDXL VAEs of PixArt), with tiled decoding."""

from jdit.autoencoders.kl import AutoencoderKL
from jdit.autoencoders.loading import from_pretrained
from jdit.autoencoders.tiling import decode_tiled

__all__ = ["AutoencoderKL", "decode_tiled", "from_pretrained"]
