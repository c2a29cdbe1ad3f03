"""Fine-tune a published PixArt-α/Σ or SANA model on your own images (full fine-tuning).

    jdit cache my_photos/ my_cache --pretrained PixArt-alpha/PixArt-Sigma-XL-2-512-MS --buckets 512
    jdit train --config configs/finetune_folder.py:pixart_sigma_xl2_512 --workdir runs/mine \\
        --config.data.path=my_cache \\
        --config.train.init_from=PixArt-alpha/PixArt-Sigma-XL-2-512-MS/transformer

The argument is a model preset (``jdit.models.registry.PRESETS``); the cache must be made with
that model's VAE and text encoder (training refuses another's: latent scale, channels, caption
width). ``jdit aot --config configs/finetune_folder.py:<preset> --topology v5e:2x4`` tells
whether it fits before you rent the chips. Settings are the official fine-tuning ones scaled to
a small dataset: PixArt's CAME at lr 2e-5 with gradient clipping 0.01 (its learned-sigma DDPM
loss), SANA's flow matching with its shift; condition dropout 0.1 to keep guidance working; an
EMA of the weights; sample grids of the cache's captions every 250 steps.
"""

import ml_collections

from jdit.models.registry import PIPELINE_FACTS, PRESETS, preset


def get_config(name: str = "pixart_sigma_xl2_512") -> ml_collections.ConfigDict:
    if name not in PIPELINE_FACTS or name.startswith("dit_"):
        raise ValueError(f"finetune_folder takes a text-to-image preset, one of "
                         f"{sorted(k for k in PRESETS if not k.startswith('dit_'))}; got {name!r}")
    facts = PIPELINE_FACTS[name]
    config = ml_collections.ConfigDict()
    config.model = preset(name)
    config.model.scan_layers = True
    config.model.remat_policy = "dots"
    config.model.dtype = "bfloat16"
    config.data = dict(name="feature_cache", path="", latent_scale=facts["latent_scale"],
                       vae_factor=facts["vae_factor"],
                       micro_condition=bool(config.model.get("micro_condition", False)))
    if name.startswith("sana"):
        config.diffusion = dict(objective="flow", flow_shift=facts["flow_shift"])
        config.optim = dict(name="adamw", lr=1e-5, warmup_steps=100, schedule="constant",
                            weight_decay=0.0, grad_clip=0.1)
    else:
        config.diffusion = dict(objective="ddpm", schedule="linear")
        config.optim = dict(name="came", lr=2e-5, warmup_steps=100, schedule="constant",
                            weight_decay=0.0, grad_clip=0.01)
    config.train = dict(steps=2000, batch_size=8, seed=0, ema_decay=0.999, cond_dropout=0.1,
                        init_from="", log_every=25, sample_every=250, checkpoint_every=250,
                        keep_checkpoints=3)
    config.sample = dict(solver="dpm++2m", steps=20, guidance_scale=4.5)
    config.parallel = dict(mesh=dict(data=1, fsdp=-1, tensor=1), rules="fsdp")
    return config
