"""PixArt-Σ XL/2 at 1024 px with KV token compression in blocks 14-27
(the official kvcompress config; no checkpoint was released, so this trains or fine-tunes)."""

import ml_collections

from jdit.models.registry import architecture_config


def get_config() -> ml_collections.ConfigDict:
    return architecture_config("pixart_sigma_xl2_1024_kvcompress")  # model + pipeline facts
