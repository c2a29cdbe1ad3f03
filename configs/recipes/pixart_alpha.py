"""PixArt-α training stages from a feature cache: text-image alignment at 256 px, then 512 and
multi-aspect 1024 (with the resolution / aspect-ratio micro-conditions).

    jdit train --config configs/recipes/pixart_alpha.py:256 --workdir runs/alpha_256 \\
        --config.data.path=/data/sam_llava_256

The paper's first stage (pixel dependencies) starts from the ImageNet class-conditional DiT;
that checkpoint's blocks use per-block adaLN-Zero, so ``init_from`` takes a PixArt checkpoint
(a previous stage). Cache: SD-VAE latents (scale 0.18215), T5 features of 120 tokens, and
``null_caption.safetensors``. Hyper-parameters from the official configs: AdamW lr 2e-5 scaled
by sqrt(global batch / 256), weight decay 3e-2, eps 1e-10, constant after warm-up, gradient
clipping 0.01, EMA 0.9999, condition dropout 0.1, learned-sigma DDPM loss on linear betas.
"""

import ml_collections

from jdit.models.registry import PIPELINE_FACTS, preset

STAGES = {  # stage: (model preset, global batch, warm-up steps)
    "256": ("pixart_alpha_xl2_256", 2048, 1000),
    "512": ("pixart_alpha_xl2_512", 1024, 1000),
    "1024": ("pixart_alpha_xl2_1024", 512, 1000),
}


def get_config(stage: str = "256") -> ml_collections.ConfigDict:
    if stage not in STAGES:
        raise ValueError(f"pixart_alpha stage must be one of {sorted(STAGES)}, got {stage!r}")
    name, batch, warmup = STAGES[stage]
    config = ml_collections.ConfigDict()
    config.model = preset(name)
    config.model.scan_layers = True
    config.model.remat_policy = "dots"
    config.model.dtype = "bfloat16"
    config.data = dict(name="feature_cache", path="",
                       latent_scale=PIPELINE_FACTS[name]["latent_scale"], null_caption="",
                       micro_condition=config.model.micro_condition)
    config.diffusion = dict(objective="ddpm", schedule="linear")
    config.optim = dict(name="adamw", lr=2e-5 * (batch / 256) ** 0.5, warmup_steps=warmup,
                        schedule="constant", weight_decay=3e-2, eps=1e-10, grad_clip=0.01)
    config.train = dict(steps=100_000, batch_size=batch, seed=0, ema_decay=0.9999,
                        cond_dropout=0.1, init_from="", log_every=100, sample_every=0,
                        checkpoint_every=2000, keep_checkpoints=3)
    config.sample = dict(solver="dpm++2m", steps=20, guidance_scale=4.5)
    # FSDP over every chip; add tensor parallelism with mesh.tensor > 1 and rules 'fsdp_tp'.
    config.parallel = dict(mesh=dict(data=1, fsdp=-1, tensor=1), rules="fsdp")
    return config
