"""SANA-600M at 1024 px (Sana_600M_img1024)."""

import ml_collections

from jdit.models.registry import architecture_config


def get_config() -> ml_collections.ConfigDict:
    return architecture_config("sana_600m_1024")  # model + pipeline facts
