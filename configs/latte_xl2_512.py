"""Latte XL/2 at 512 px, 16 frames (Latte-1, text-to-video on T5-XXL captions)."""

import ml_collections

from jdit.models.registry import architecture_config


def get_config() -> ml_collections.ConfigDict:
    return architecture_config("latte_xl2_512")  # model + pipeline facts
