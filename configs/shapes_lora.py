"""LoRA on the main job's model: teach it a colour and a shape it never saw (purple, diamond).

    jdit train --config configs/shapes_tiny.py --workdir runs/shapes          # the base
    jdit train --config configs/shapes_lora.py --workdir runs/shapes_lora \
        --config.train.init_from=runs/shapes
    jdit eval --workdir runs/shapes_lora     # adherence_new, and the base's own figures
    jdit convert --lora runs/shapes_lora shapes_lora.safetensors

Three quarters of each batch show purple or diamonds (``data.concepts="new"``: prompts of the
extended vocabulary, a quarter of the single-object ones held out for ``adherence_new``), the
rest the base data, so the adapters learn the new words without forgetting the old ones.
Low-rank adapters on the attention, cross-attention and MLP kernels of the four blocks; the
base stays frozen. Runs and the rank / target ablation: BENCHMARKS.md.
"""

from pathlib import Path

import ml_collections

from jdit.config import load_config


def get_config() -> ml_collections.ConfigDict:
    config = load_config(Path(__file__).with_name("shapes_tiny.py"))  # model, data, objective
    # sampled as this recipe was measured (shapes_tiny itself now samples at guidance 2.5)
    config.sample = dict(solver="dpm++2m", steps=20, guidance_scale=3.0)
    config.data.concepts = "new"
    config.data.new_fraction = 0.75
    # merged: W + A·B once per step, faster than per-token adapter products for this small
    # model on a CPU (300 vs 470 ms a step)
    config.lora = dict(rank=4, alpha=4.0, targets=["attention", "cross_attention", "mlp"],
                       dropout=0.0, merged=True)
    config.optim.lr = 1e-2
    config.optim.warmup_steps = 50
    config.train.steps = 900
    config.train.sample_every = 900
    config.train.checkpoint_every = 300
    config.train.init_from = ""  # the base run: --config.train.init_from=runs/shapes
    return config
