"""Spatial control for a published PixArt-α/Σ or SANA model, trained on your own images: an
EasyControl condition LoRA (default) or a ControlNet, over the frozen model, from a feature cache
that holds each image's condition (Canny edges, or a folder of depth maps, masks, poses...).

    jdit cache my_photos/ my_cache --pretrained PixArt-alpha/PixArt-Sigma-XL-2-512-MS \\
        --buckets 512 --condition canny                   # or --condition my_depth_maps/
    jdit train --config configs/control_folder.py:pixart_sigma_xl2_512 --workdir runs/canny \\
        --config.data.path=my_cache \\
        --config.train.init_from=PixArt-alpha/PixArt-Sigma-XL-2-512-MS/transformer
    jdit train --config configs/control_folder.py:pixart_sigma_xl2_512,controlnet ...

The argument is a model preset (as ``configs/finetune_folder.py``), then optionally
``,controlnet`` (PixArt-δ's ControlNet on PixArt, SANA's on SANA: copies of the first half of
the blocks, zero-initialised projections). EasyControl follows the paper: rank 128 on the
condition branch's attention, lr 1e-4; half of the captions dropped so that the condition alone
can decide the layout. Sample with ``jdit sample --pretrained ... --control IMAGE
--control-weights runs/canny`` (docs/control.md).
"""

from pathlib import Path

import ml_collections

from jdit.config import load_config


def get_config(arg: str = "pixart_sigma_xl2_512") -> ml_collections.ConfigDict:
    name, _, method = arg.partition(",")
    method = method or "easycontrol"
    if method not in ("easycontrol", "controlnet"):
        raise ValueError(f"control_folder takes PRESET or PRESET,controlnet; got {arg!r}")
    config = load_config(f"{Path(__file__).with_name('finetune_folder.py')}:{name}")
    config.control = dict(method=method, scale=1.0, guess_mode=False, controlnet_depth=0)
    if method == "controlnet":  # the copies start as the base's blocks, one by one
        config.model.scan_layers = False
    if method == "easycontrol":
        config.lora = dict(rank=128, alpha=128.0, targets=["attention"], dropout=0.0,
                           merged=False)
    config.optim.lr = 1e-4
    config.optim.name = "adamw"
    config.optim.grad_clip = 1.0
    config.train.cond_dropout = 0.5
    config.train.ema_decay = 0.0
    return config
