"""The diffusers side of ``jdit bench fast``, run in its own process (torch's threads and jax's
share two cores badly in one): ``python -m jdit.benchmarks.fast_torch IN.npz OUT.npz FOLDER
REPEATS``.

``FOLDER``: the teacher exported with ``jdit convert --to diffusers`` (a
``PixArtTransformer2DModel``); ``IN.npz``: the prompts' and the null prompt's features and
masks, the starting noise (NCHW), the flow shift, steps and guidance scale. Runs diffusers'
``PixArtSigmaPipeline`` (no text encoder, no VAE: the shapes model works in pixels) with its
flow DPM-Solver++ and writes the images (NHWC, clipped to [-1, 1]) and the median seconds of
``REPEATS`` timed calls after one warm-up.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np


def main(argv: list[str]) -> int:
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    src, dst, folder, repeats = argv[0], argv[1], argv[2], int(argv[3])
    d = np.load(src)
    transformer = PixArtTransformer2DModel.from_pretrained(folder).eval()
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction",
                                            use_flow_sigmas=True,
                                            flow_shift=float(d["flow_shift"]))
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None,
                               transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    side = int(d["latents"].shape[-1]) * 8  # no VAE: the pipeline's factor 8 maps back to pixels

    def call() -> np.ndarray:
        with torch.no_grad():
            out = pipe(prompt_embeds=torch.from_numpy(d["context"]),
                       prompt_attention_mask=torch.from_numpy(d["context_mask"]),
                       negative_prompt=None,
                       negative_prompt_embeds=torch.from_numpy(d["null_context"]),
                       negative_prompt_attention_mask=torch.from_numpy(d["null_mask"]),
                       latents=torch.from_numpy(d["latents"]), height=side, width=side,
                       num_inference_steps=int(d["steps"]),
                       guidance_scale=float(d["guidance_scale"]),
                       use_resolution_binning=False, output_type="latent").images
        return np.clip(out.permute(0, 2, 3, 1).numpy(), -1.0, 1.0)

    images = call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    np.savez(dst, images=images)
    print(json.dumps({"seconds": statistics.median(times), "times": times,
                      "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
