"""Lumina-Image 2.0 (2.6B) at 1024 px (Alpha-VLLM/Lumina-Image-2.0)."""

import ml_collections

from jdit.models.registry import architecture_config


def get_config() -> ml_collections.ConfigDict:
    return architecture_config("lumina2_2b_1024")  # model + pipeline facts
