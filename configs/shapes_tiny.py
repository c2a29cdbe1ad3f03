"""The main job: a small text-to-image PixArt learning the embedded `shapes` data on a CPU.

    jdit train --config configs/shapes_tiny.py --workdir runs/shapes
    jdit eval --workdir runs/shapes

The same model from files (the path a user's own images take, docs/data.md):

    jdit export shapes shapes_png -n 20000 --pair-fraction 0.6
    jdit cache shapes_png shapes_cache --vae identity --text-encoder words:shapes --size 32
    jdit train --config configs/shapes_tiny.py:cache --workdir runs/shapes_cache \
        --config.data.path=shapes_cache

Tuned to fit 10 minutes on 2 CPU cores, start-up and compile included (BENCHMARKS.md has the
runs, three seeds each): patch 4 (64 tokens) with rectified flow whose sigmas are shifted toward
noise (shift 3: the layout is decided at high noise), a high learning rate for a short cosine
run, a short EMA, and guidance 2.5 when sampling.
"""

import ml_collections

TEXT_DIM = 64


def get_config(data: str = "embedded") -> ml_collections.ConfigDict:
    if data not in ("embedded", "cache"):
        raise ValueError(f"shapes_tiny takes 'embedded' (rendered in memory) or 'cache' (a "
                         f"feature cache written by jdit cache), got {data!r}")
    config = ml_collections.ConfigDict()
    config.model = dict(family="pixart", input_size=32, patch_size=4, in_channels=3,
                        hidden_size=128, depth=4, num_heads=4, mlp_ratio=4.0,
                        caption_channels=TEXT_DIM, learn_sigma=False, pe_interpolation=1.0)
    config.data = dict(name="shapes", size=32, pair_fraction=0.6, text_dim=TEXT_DIM, max_length=16)
    if data == "cache":  # pixels in [-1, 1] and word features, as jdit cache wrote them
        config.data = dict(name="feature_cache", path="", latent_scale=1.0, vae_factor=1)
    config.diffusion = dict(objective="flow", flow_shift=3.0, timestep_sampler="logit_normal",
                            logit_mean=0.0, logit_std=1.0)
    config.optim = dict(name="adamw", lr=3e-3, b2=0.99, warmup_steps=100, schedule="cosine",
                        end_lr_factor=0.1, weight_decay=0.0, grad_clip=1.0)
    config.train = dict(steps=2400, batch_size=64, seed=0, ema_decay=0.995, cond_dropout=0.1,
                        log_every=50, sample_every=1200, checkpoint_every=500,
                        keep_checkpoints=2)
    # guidance 2.5: the best mean and worst seed of 1.5-4 (BENCHMARKS.md, issue 24)
    config.sample = dict(solver="dpm++2m", steps=20, guidance_scale=2.5)
    # One device here; on more, data parallel (see docs/parallelism.md).
    config.parallel = dict(mesh=dict(data=-1, fsdp=1, tensor=1), rules="fsdp")
    return config
