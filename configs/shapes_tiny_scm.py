"""A 1–4-step student of the main job's model: continuous-time consistency distillation (sCM).

    jdit train --config configs/shapes_tiny.py --workdir runs/shapes                # the teacher
    jdit train --config configs/shapes_tiny_scm.py:runs/shapes --workdir runs/shapes_scm
    jdit eval --workdir runs/shapes_scm           # 2 steps of the scm solver (TrigFlow), unguided

SANA-Sprint's recipe at toy size (jdit.train.consistency.make_scm_loss): the flow teacher seen
in TrigFlow time, the student's derivative along the teacher's guided ODE from one jax.jvp,
tangent normalisation and warm-up. The student starts from the teacher's EMA weights; it
samples with the scm solver as SANA-Sprint models do (any step count).
"""

from pathlib import Path

import ml_collections

from jdit.config import load_config


def get_config(teacher: str = "runs/shapes") -> ml_collections.ConfigDict:
    config = load_config(Path(__file__).with_name("shapes_tiny.py"))
    config.distill = dict(teacher=teacher, method="scm", guidance_scale=3.0, sigma_data=0.5,
                          p_mean=-0.8, p_std=1.6, tangent_warmup=100)
    config.train.init_from = teacher
    config.train.steps = 400
    config.train.ema_decay = 0.99
    config.train.ema_warmup = False
    config.train.sample_every = 0
    config.train.checkpoint_every = 200
    config.optim = dict(name="adamw", lr=1e-4, b2=0.99, warmup_steps=20, schedule="constant",
                        weight_decay=0.0, grad_clip=1.0)
    config.sample = dict(solver="scm", steps=2, guidance_scale=1.0)
    return config
