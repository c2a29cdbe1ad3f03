"""DiT-XL/2 on ImageNet, class-conditional, from a feature cache of VAE latents.

    jdit train --config configs/recipes/dit_imagenet.py:256 --workdir runs/dit_256 \\
        --config.data.path=/data/imagenet_256_latents

The cache holds, per ImageNet training image (``tfds.data_source("imagenet2012")``, centre
crop, random flips folded in by storing both), the SD-VAE (ft-EMA) latent mean before scaling
and its ``label``. The paper's recipe: AdamW lr 1e-4, no weight decay, constant lr, no warm-up,
global batch 256, EMA 0.9999, class dropout 0.1 for guidance, learned-sigma DDPM loss on linear
betas, 400K steps for the reported ablations (7M for the final model).
"""

import ml_collections

from jdit.models.registry import PIPELINE_FACTS, preset


def get_config(resolution: str = "256") -> ml_collections.ConfigDict:
    if resolution not in ("256", "512"):
        raise ValueError(f"dit_imagenet resolution must be 256 or 512, got {resolution!r}")
    name = f"dit_xl2_{resolution}"
    config = ml_collections.ConfigDict()
    config.model = preset(name)
    config.model.scan_layers = True
    config.model.dtype = "bfloat16"
    config.data = dict(name="feature_cache", path="",
                       latent_scale=PIPELINE_FACTS[name]["latent_scale"])
    config.diffusion = dict(objective="ddpm", schedule="linear")
    config.optim = dict(name="adamw", lr=1e-4, warmup_steps=0, schedule="constant",
                        weight_decay=0.0, grad_clip=0.0)
    config.train = dict(steps=400_000, batch_size=256, seed=0, ema_decay=0.9999,
                        ema_warmup=False, cond_dropout=0.1, init_from="", log_every=100,
                        sample_every=0, checkpoint_every=5000, keep_checkpoints=3)
    config.sample = dict(solver="ddpm", steps=250, guidance_scale=1.5)
    # FSDP over every chip; add tensor parallelism with mesh.tensor > 1 and rules 'fsdp_tp'.
    config.parallel = dict(mesh=dict(data=1, fsdp=-1, tensor=1), rules="fsdp")
    return config
