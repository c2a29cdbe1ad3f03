"""A 4-step student of the main job's model: latent consistency distillation (LCM).

    jdit train --config configs/shapes_tiny.py --workdir runs/shapes                # the teacher
    jdit train --config configs/shapes_tiny_lcm.py:runs/shapes --workdir runs/shapes_lcm
    jdit eval --workdir runs/shapes_lcm                    # 4 steps of the lcm solver, unguided

The student starts from the teacher's EMA weights and learns its guided (CFG 3, the teacher's
sampling scale) probability-flow ODE as a consistency function on a 50-level grid
(jdit.train.consistency); the EMA of the student is the target network (LCM's μ = 0.95) and
the model that samples. Same data, batch and shapes as the teacher.
"""

from pathlib import Path

import ml_collections

from jdit.config import load_config


def get_config(teacher: str = "runs/shapes") -> ml_collections.ConfigDict:
    config = load_config(Path(__file__).with_name("shapes_tiny.py"))
    config.distill = dict(teacher=teacher, method="consistency", guidance_scale=3.0,
                          grid_steps=50, huber_c=0.001)
    config.train.init_from = teacher
    config.train.steps = 600
    config.train.ema_decay = 0.95
    config.train.ema_warmup = False
    config.train.sample_every = 0
    config.train.checkpoint_every = 300
    config.optim = dict(name="adamw", lr=2e-4, b2=0.99, warmup_steps=50, schedule="constant",
                        weight_decay=0.0, grad_clip=1.0)
    config.sample = dict(solver="lcm", steps=4, guidance_scale=1.0)
    return config
