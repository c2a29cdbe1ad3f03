"""A small class-conditional DiT on scikit-learn's handwritten digits (embedded data).

    jdit train --config configs/digits_tiny.py --workdir runs/digits
    jdit eval --workdir runs/digits

Same lessons as shapes_tiny (BENCHMARKS.md): rectified flow with sigmas shifted toward noise,
a high learning rate for a short cosine run, a short EMA; fits 10 minutes on 2 CPU cores.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = dict(family="dit", input_size=32, patch_size=4, in_channels=1, hidden_size=128,
                        depth=4, num_heads=4, mlp_ratio=4.0, num_classes=10, learn_sigma=False)
    config.data = dict(name="digits", size=32)
    config.diffusion = dict(objective="flow", flow_shift=3.0, timestep_sampler="logit_normal",
                            logit_mean=0.0, logit_std=1.0)
    config.optim = dict(name="adamw", lr=3e-3, b2=0.99, warmup_steps=100, schedule="cosine",
                        end_lr_factor=0.1, weight_decay=0.0, grad_clip=1.0)
    config.train = dict(steps=1500, batch_size=64, seed=0, ema_decay=0.995, cond_dropout=0.1,
                        log_every=50, sample_every=750, checkpoint_every=500,
                        keep_checkpoints=2)
    config.sample = dict(solver="dpm++2m", steps=20, guidance_scale=3.0)
    # One device here; on more, data parallel (see docs/parallelism.md).
    config.parallel = dict(mesh=dict(data=-1, fsdp=1, tensor=1), rules="fsdp")
    return config
