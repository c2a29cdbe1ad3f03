"""One library's side of ``jdit bench pipeline``, in its own process:
``python -m jdit.benchmarks.pipeline_worker {jdit|diffusers} FOLDER INPUTS.npz CALLS OUT.npz``.

``FOLDER``: the random PixArt-Σ pipeline the parent saved; ``INPUTS.npz``: the prompts, the
starting latents (NCHW), steps and guidance scale. One warm-up call (jdit compiles), then
``CALLS`` timed calls; the images go to ``OUT.npz`` (NHWC, [0, 1]) for the parent to compare.
Also each part timed alone (T5 on the 2B guidance batch, one guided transformer forward, the VAE
decode). Prints one JSON line: ``times``, ``median_s``, ``compile_s``, ``setup_s``,
``components_s``, ``peak_rss_mb``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from jdit.benchmarks.isolated import emit, peak_rss_mb


def median_time(fn: Callable[[], Any], calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


Sides = tuple[Callable[[], np.ndarray], Callable[[], dict[str, float]]]


def _jdit(folder: str, d: dict[str, Any], calls: int) -> Sides:
    import jax
    import jax.numpy as jnp

    from jdit.pipelines import TextToImage

    pipe = TextToImage.from_pretrained(folder)
    prompts, steps = [str(p) for p in d["prompts"]], int(d["steps"])
    latents = d["latents"].transpose(0, 2, 3, 1)
    size = latents.shape[1] * pipe.vae_scale_factor

    def call() -> np.ndarray:
        return np.asarray(pipe(prompts, latents=latents, num_steps=steps,
                               guidance_scale=float(d["guidance_scale"]), height=size,
                               width=size, use_resolution_binning=False))

    def parts() -> dict[str, float]:
        b, length = len(prompts), pipe.max_sequence_length
        ids = jnp.ones((2 * b, length), jnp.int32)
        x2 = jnp.concatenate([jnp.asarray(latents)] * 2)
        t2 = jnp.full((2 * b,), 500.0)
        ctx2 = jnp.zeros((2 * b, length, pipe.text_encoder.d_model), jnp.float32)
        encode = jax.jit(lambda p, i: pipe.text_encoder.apply({"params": p}, i, i))
        forward = jax.jit(lambda p, x, t, c, m: pipe.transformer.apply(
            {"params": p}, x, t, context=c, context_mask=m))
        decode = jax.jit(pipe.decode)
        z = jnp.asarray(latents)
        return {
            "t5": median_time(lambda: encode(pipe.text_encoder_params, ids).block_until_ready(),
                              calls),
            "step": median_time(lambda: forward(pipe.transformer_params, x2, t2, ctx2,
                                                ids).block_until_ready(), calls),
            "vae_decode": median_time(lambda: decode(pipe.vae_params, z).block_until_ready(),
                                      calls),
        }
    return call, parts


def _diffusers(folder: str, d: dict[str, Any], calls: int, threads: int) -> Sides:
    import torch
    from diffusers import PixArtSigmaPipeline

    torch.set_num_threads(threads)
    pipe = PixArtSigmaPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    prompts, steps = [str(p) for p in d["prompts"]], int(d["steps"])
    latents = torch.from_numpy(d["latents"])
    size = latents.shape[-1] * pipe.vae_scale_factor

    def call() -> np.ndarray:
        with torch.inference_mode():
            return pipe(prompts, latents=latents, num_inference_steps=steps,
                        guidance_scale=float(d["guidance_scale"]), height=size, width=size,
                        use_resolution_binning=False, clean_caption=False,
                        output_type="np").images

    def parts() -> dict[str, float]:
        b, length = len(prompts), int(d["max_sequence_length"])
        ids = torch.ones((2 * b, length), dtype=torch.long)
        x2 = torch.cat([latents] * 2)
        t2 = torch.full((2 * b,), 500)
        ctx2 = torch.zeros(2 * b, length, pipe.text_encoder.config.d_model)
        with torch.inference_mode():
            return {
                "t5": median_time(lambda: pipe.text_encoder(ids, attention_mask=ids), calls),
                "step": median_time(lambda: pipe.transformer(
                    x2, encoder_hidden_states=ctx2, timestep=t2,
                    encoder_attention_mask=ids.float(),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}), calls),
                "vae_decode": median_time(lambda: pipe.vae.decode(latents), calls),
            }
    return call, parts


def main(argv: list[str]) -> int:
    start = time.perf_counter()
    library, folder, inputs, calls, out = argv[0], argv[1], argv[2], int(argv[3]), argv[4]
    threads = int(argv[5]) if len(argv) > 5 else 2
    if library not in ("jdit", "diffusers"):
        raise SystemExit(f"library must be jdit or diffusers, got {library!r}")
    d = dict(np.load(inputs))
    call, parts = (_jdit(folder, d, calls) if library == "jdit"
                   else _diffusers(folder, d, calls, threads))
    setup_s = time.perf_counter() - start
    t0 = time.perf_counter()
    images = call()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    np.savez(out, images=images)
    emit({"library": library, "times": times, "median_s": statistics.median(times),
          "compile_s": compile_s, "setup_s": setup_s, "components_s": parts(),
          "peak_rss_mb": peak_rss_mb()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
