"""The main job with linear attention: a small SANA-style DiT learning the embedded `shapes` data.

    jdit train --config configs/shapes_tiny_linear.py --workdir runs/shapes_linear
    jdit eval --workdir runs/shapes_linear

The PixArt tiny recipe (configs/shapes_tiny.py) with the SANA block: ReLU linear self-attention
(heads of 32), Mix-FFN, RMSNorm on the caption, rectified flow with shifted sigmas. The Mix-FFN
ratio is 1.0, not SANA's 2.5: on a CPU its depthwise 3x3 dominates the step (2.5 takes 0.61 s a
step, 1.0 takes 0.37 s), and at 1.0 the recipe clears both bars in 12 minutes (BENCHMARKS.md).
The published SANA models use no position embedding at 1024 px; on an 8×8 token grid four
3×3 depthwise convolutions do not reach across the image, so this recipe adds sin-cos positions
(as SANA's 2K/4K models do) for prompts that name a position.
"""

from pathlib import Path

import ml_collections

from jdit.config import load_config


def get_config() -> ml_collections.ConfigDict:
    config = load_config(Path(__file__).with_name("shapes_tiny.py"))  # data, objective, optimiser
    # sampled as this recipe was measured (shapes_tiny itself now samples at guidance 2.5)
    config.sample = dict(solver="dpm++2m", steps=20, guidance_scale=3.0)
    config.model = dict(family="sana", input_size=32, patch_size=4, in_channels=3, out_channels=3,
                        hidden_size=128, depth=4, num_heads=4, cross_num_heads=4, mlp_ratio=1.0,
                        caption_channels=config.data.text_dim, pos_embed=True,
                        pe_interpolation=1.0)
    return config
