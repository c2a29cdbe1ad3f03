"""PixArt-Σ training, stage by stage ("weak-to-strong" from PixArt-α), from a feature cache.

    jdit train --config configs/recipes/pixart_sigma.py:512 --workdir runs/sigma_512 \\
        --config.data.path=/data/cache_512 --config.train.init_from=runs/sigma_256

Stages: 256, 512, 1024, 1024_kv (KV compression in blocks 14-27, from the 1024 stage), 2k.
The cache (jdit.data.cache) holds SDXL-VAE latents resized to the aspect-ratio buckets, T5
features of 300 tokens and ``null_caption.safetensors`` (the encoded empty prompt).
Hyper-parameters are the official configs': CAME, lr 2e-5 scaled by sqrt(global batch / 256),
no weight decay, constant after warm-up, gradient clipping 0.01, condition dropout 0.1, the
learned-sigma DDPM loss on linear betas. Set the batch to your pod.
"""

import ml_collections

from jdit.models.registry import PIPELINE_FACTS, preset

STAGES = {  # stage: (model preset, global batch, warm-up steps)
    "256": ("pixart_sigma_xl2_256", 2048, 1000),
    "512": ("pixart_sigma_xl2_512", 1024, 1000),
    "1024": ("pixart_sigma_xl2_1024", 512, 1000),
    "1024_kv": ("pixart_sigma_xl2_1024_kvcompress", 512, 500),
    "2k": ("pixart_sigma_xl2_2k", 256, 100),
}


def get_config(stage: str = "1024") -> ml_collections.ConfigDict:
    if stage not in STAGES:
        raise ValueError(f"pixart_sigma stage must be one of {sorted(STAGES)}, got {stage!r}")
    name, batch, warmup = STAGES[stage]
    config = ml_collections.ConfigDict()
    config.model = preset(name)
    config.model.scan_layers = True
    config.model.remat_policy = "dots"
    config.model.dtype = "bfloat16"
    config.data = dict(name="feature_cache", path="",
                       latent_scale=PIPELINE_FACTS[name]["latent_scale"], null_caption="")
    config.diffusion = dict(objective="ddpm", schedule="linear")
    config.optim = dict(name="came", lr=2e-5 * (batch / 256) ** 0.5, warmup_steps=warmup,
                        schedule="constant", weight_decay=0.0, grad_clip=0.01)
    config.train = dict(steps=100_000, batch_size=batch, seed=0, ema_decay=0.9999,
                        cond_dropout=0.1, init_from="", log_every=100, sample_every=0,
                        checkpoint_every=2000, keep_checkpoints=3)
    config.sample = dict(solver="dpm++2m", steps=20, guidance_scale=4.5)
    # FSDP over every chip; add tensor parallelism with mesh.tensor > 1 and rules 'fsdp_tp'.
    config.parallel = dict(mesh=dict(data=1, fsdp=-1, tensor=1), rules="fsdp")
    return config
