"""SANA-Video 2B at 480p x 81 frames (SANA-Video_2B_480p)."""

import ml_collections

from jdit.models.registry import architecture_config


def get_config() -> ml_collections.ConfigDict:
    return architecture_config("sana_video_2b_480p")  # model + pipeline facts
