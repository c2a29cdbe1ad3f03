"""``jdit bench pipeline``: text-to-image generation time, jdit vs diffusers, in the same run.

A small random PixArt-Σ pipeline (:mod:`jdit.benchmarks.tiny_pipeline`: T5 encoder, PixArt
transformer, 8× VAE; 256 px images) generates the same prompts from the same latents with
20 DPM-Solver++ steps and classifier-free guidance on both sides: diffusers + torch (eager, as
a user runs it) and jdit's ``TextToImage`` (one compiled program; the compile is reported apart
and excluded from the timing). Medians of ``repeats`` calls; the images must agree.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS = ["a small cactus with a happy face in the desert", "a red fox in a snowy forest"]


def run(repeats: int = 5, num_steps: int = 20, width: int = 64, batch: int = 2,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    import torch

    from jdit.benchmarks import tiny_pipeline
    from jdit.pipelines import TextToImage

    log = log or (lambda s: print(s, file=sys.stderr))
    prompts = (PROMPTS * batch)[:batch]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pipe"
        log("building a random PixArt-Σ pipeline ...")
        reference = tiny_pipeline.text_to_image(folder, "sigma", width=width)
        reference.set_progress_bar_config(disable=True)
        pipe = TextToImage.from_pretrained(folder)
        size = int(pipe.transformer.input_size) * pipe.vae_scale_factor
        latent = size // pipe.vae_scale_factor
        nchw = torch.randn((batch, 4, latent, latent), generator=torch.Generator().manual_seed(0))
        nhwc = nchw.permute(0, 2, 3, 1).numpy()
        common = dict(num_steps=num_steps, guidance_scale=4.5, height=size, width=size)

        def ours() -> np.ndarray:
            return pipe(prompts, latents=nhwc, use_resolution_binning=False, **common)

        def theirs() -> np.ndarray:
            with torch.inference_mode():
                return reference(prompts, latents=nchw, num_inference_steps=num_steps,
                                 guidance_scale=4.5, height=size, width=size,
                                 use_resolution_binning=False, clean_caption=False,
                                 output_type="np").images

        log("compiling jdit's pipeline ...")
        start = time.perf_counter()
        first = ours()
        compile_s = time.perf_counter() - start
        theirs()  # warm-up
        t_ours, t_theirs = [], []
        for r in range(repeats):
            log(f"repeat {r + 1}/{repeats}")
            start = time.perf_counter()
            ours()
            t_ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            want = theirs()
            t_theirs.append(time.perf_counter() - start)
    jdit_s, diffusers_s = statistics.median(t_ours), statistics.median(t_theirs)
    return {
        "benchmark": "pipeline",
        "pipeline": f"random PixArt-Σ (width {width}, 2 layers; T5 d_model 32; 8x VAE)",
        "image_size": size, "batch": batch, "num_steps": num_steps, "guidance_scale": 4.5,
        "jdit_s": jdit_s, "diffusers_s": diffusers_s,
        "speedup": diffusers_s / jdit_s,
        "jdit_compile_s": compile_s,
        "max_abs_image_difference": float(np.abs(first - want).max()),
        "repeats": repeats,
        "jdit_all_s": t_ours, "diffusers_all_s": t_theirs,
    }
