"""SANA-1.6B at 4096 px (Sana_1600M_4Kpx), sin-cos positions."""

import ml_collections

from jdit.models import preset


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = preset("sana_1600m_4k")
    config.model.scan_layers = True  # one compiled block for the whole stack: fast compiles
    config.resolution = 4096  # pixels; latents are resolution // 32 (DC-AE f32c32)
    config.latent_factor = 32
    config.caption_length = 300  # Gemma-2 tokens
    config.latent_scale = 0.41407  # DC-AE scaling factor
    config.flow_shift = 6.0  # sampling shift of the published scheduler configs (training: 3, 4 for 600M-1024)
    return config
