"""DiT-XL/2 at 256 px, class-conditional ImageNet (official DiT-XL-2-256x256.pt)."""

import ml_collections

from jdit.models.registry import architecture_config


def get_config() -> ml_collections.ConfigDict:
    return architecture_config("dit_xl2_256")  # model + pipeline facts
