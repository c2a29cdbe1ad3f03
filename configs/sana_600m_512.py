"""SANA-600M at 512 px (Sana_600M_img512)."""

import ml_collections

from jdit.models.registry import architecture_config


def get_config() -> ml_collections.ConfigDict:
    return architecture_config("sana_600m_512")  # model + pipeline facts
