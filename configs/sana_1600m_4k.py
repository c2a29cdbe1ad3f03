"""SANA-1.6B at 4096 px (Sana_1600M_4Kpx), sin-cos positions."""

import ml_collections

from jdit.models.registry import architecture_config


def get_config() -> ml_collections.ConfigDict:
    return architecture_config("sana_1600m_4k")  # model + pipeline facts
