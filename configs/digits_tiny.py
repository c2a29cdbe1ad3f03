"""A small class-conditional DiT on scikit-learn's handwritten digits (embedded data).

    jdit train --config configs/digits_tiny.py --workdir runs/digits
    jdit eval --workdir runs/digits
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = dict(family="dit", input_size=32, patch_size=4, in_channels=1, hidden_size=128,
                        depth=4, num_heads=4, mlp_ratio=4.0, num_classes=10, learn_sigma=False)
    config.data = dict(name="digits", size=32)
    config.diffusion = dict(objective="ddpm", schedule="linear", prediction="epsilon")
    config.optim = dict(name="adamw", lr=1e-3, warmup_steps=200, schedule="cosine",
                        end_lr_factor=0.1, weight_decay=0.0, grad_clip=1.0)
    config.train = dict(steps=2000, batch_size=64, seed=0, ema_decay=0.999, cond_dropout=0.1,
                        log_every=50, sample_every=1000, checkpoint_every=500,
                        keep_checkpoints=2)
    config.sample = dict(solver="dpm++2m", steps=20, guidance_scale=2.0)
    return config
