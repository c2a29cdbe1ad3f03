"""PixArt-Σ XL/2 at 2048 px (PixArt-Sigma-XL-2-2K-MS)."""

import ml_collections

from jdit.models import preset


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = preset("pixart_sigma_xl2_2k")
    config.model.scan_layers = True  # one compiled block per segment: fast compiles at depth 28
    config.resolution = 2048  # pixels; latents are resolution // 8
    config.caption_length = 300  # T5 tokens
    config.latent_scale = 0.13025  # SDXL VAE scaling factor
    return config
