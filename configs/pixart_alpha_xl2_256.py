"""PixArt-α XL/2 at 256 px (PixArt-XL-2-256x256)."""

import ml_collections

from jdit.models import preset


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = preset("pixart_alpha_xl2_256")
    config.model.scan_layers = True  # one compiled block per segment: fast compiles at depth 28
    config.resolution = 256  # pixels; latents are resolution // 8
    config.caption_length = 120  # T5 tokens
    config.latent_scale = 0.18215  # SD VAE (sd-vae-ft-ema) scaling factor
    return config
