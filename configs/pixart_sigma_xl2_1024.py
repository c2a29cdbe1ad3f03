"""PixArt-Σ XL/2 at 1024 px (PixArt-Sigma-XL-2-1024-MS)."""

import ml_collections

from jdit.models.registry import architecture_config


def get_config() -> ml_collections.ConfigDict:
    return architecture_config("pixart_sigma_xl2_1024")  # model + pipeline facts
