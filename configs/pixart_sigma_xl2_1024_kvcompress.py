"""PixArt-Σ XL/2 at 1024 px with KV token compression in blocks 14-27
(the official kvcompress config; no checkpoint was released, so this trains or fine-tunes)."""

import ml_collections

from jdit.models import preset


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = preset("pixart_sigma_xl2_1024_kvcompress")
    config.model.scan_layers = True  # one compiled block per segment: fast compiles at depth 28
    config.resolution = 1024  # pixels; latents are resolution // 8
    config.caption_length = 300  # T5 tokens
    config.latent_scale = 0.13025  # SDXL VAE scaling factor
    return config
