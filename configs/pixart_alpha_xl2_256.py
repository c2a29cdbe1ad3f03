"""PixArt-α XL/2 at 256 px (PixArt-XL-2-256x256)."""

import ml_collections

from jdit.models.registry import architecture_config


def get_config() -> ml_collections.ConfigDict:
    return architecture_config("pixart_alpha_xl2_256")  # model + pipeline facts
