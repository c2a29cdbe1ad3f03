"""PixArt-Σ XL/2 at 2048 px (PixArt-Sigma-XL-2-2K-MS)."""

import ml_collections

from jdit.models.registry import architecture_config


def get_config() -> ml_collections.ConfigDict:
    return architecture_config("pixart_sigma_xl2_2k")  # model + pipeline facts
