"""DiT-XL/2 at 512 px, class-conditional ImageNet (official DiT-XL-2-512x512.pt)."""

import ml_collections

from jdit.models.registry import architecture_config


def get_config() -> ml_collections.ConfigDict:
    return architecture_config("dit_xl2_512")  # model + pipeline facts
