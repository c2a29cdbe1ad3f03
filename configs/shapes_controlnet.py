"""A PixArt-δ ControlNet on the main job's model, for comparison with the condition LoRA of
``configs/shapes_control.py`` (same data, same frozen base):

    jdit train --config configs/shapes_controlnet.py --workdir runs/shapes_controlnet \\
        --config.train.init_from=runs/shapes
    jdit eval --workdir runs/shapes_controlnet

Copies of the base's first two blocks (of four) read the base's block-0 output plus the
condition's patch embedding; zero-initialised projections add their outputs to the base's
blocks (docs/control.md). Only the ControlNet trains.
"""

from pathlib import Path

import ml_collections

from jdit.config import load_config


def get_config(condition: str = "silhouette") -> ml_collections.ConfigDict:
    config = load_config(f"{Path(__file__).with_name('shapes_control.py')}:{condition}")
    config.control = dict(method="controlnet", scale=1.0, guess_mode=True, controlnet_depth=2)
    config.lora.rank = 0
    config.optim.lr = 1e-3
    return config
