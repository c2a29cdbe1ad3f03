"""``jdit bench pipeline``: text-to-image generation time, jdit vs diffusers, in the same run.

A small random PixArt-Σ pipeline (:mod:`jdit.testing.tiny_pipelines`: T5 encoder, PixArt
transformer, 8× VAE; 256 px images) generates the same prompts from the same latents with
20 DPM-Solver++ steps and classifier-free guidance on both sides: diffusers + torch (eager, as
a user runs it) and jdit's ``TextToImage`` (one compiled program; the compile is reported apart
and excluded from the timing). Medians of ``repeats`` calls; the images must agree.
"""

from __future__ import annotations

import argparse
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

    from jdit.pipelines import TextToImage
    from jdit.testing import tiny_pipelines

    log = log or (lambda s: print(s, file=sys.stderr))
    prompts = (PROMPTS * batch)[:batch]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pipe"
        log("building a random PixArt-Σ pipeline ...")
        reference = tiny_pipelines.text_to_image(folder, "sigma", width=width)
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

        parts = _components(pipe, reference, prompts, nhwc, repeats)
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
        "components_s": parts,
        "jdit_all_s": t_ours, "diffusers_all_s": t_theirs,
    }


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _components(pipe: Any, reference: Any, prompts: list[str], latents: np.ndarray,
                repeats: int) -> dict[str, dict[str, float]]:
    """Where the time goes: T5 on the 2B CFG batch, one guided transformer forward (2B), the
    VAE decode (B), each side timed alone."""
    import jax
    import jax.numpy as jnp
    import torch

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
    ours = {
        "t5": _median_time(lambda: encode(pipe.text_encoder_params, ids).block_until_ready(),
                           repeats),
        "step": _median_time(lambda: forward(pipe.transformer_params, x2, t2, ctx2,
                                             ids).block_until_ready(), repeats),
        "vae_decode": _median_time(lambda: decode(pipe.vae_params, z).block_until_ready(),
                                   repeats),
    }
    ids_t = torch.ones((2 * b, length), dtype=torch.long)
    x2_t = torch.from_numpy(np.asarray(x2)).permute(0, 3, 1, 2).contiguous()
    t2_t, ctx2_t = torch.full((2 * b,), 500), torch.zeros(2 * b, length, ctx2.shape[-1])
    z_t = torch.from_numpy(np.asarray(latents)).permute(0, 3, 1, 2).contiguous()
    with torch.inference_mode():
        theirs = {
            "t5": _median_time(lambda: reference.text_encoder(ids_t, attention_mask=ids_t),
                               repeats),
            "step": _median_time(lambda: reference.transformer(
                x2_t, encoder_hidden_states=ctx2_t, timestep=t2_t,
                encoder_attention_mask=ids_t.float(),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}), repeats),
            "vae_decode": _median_time(lambda: reference.vae.decode(z_t), repeats),
        }
    return {"jdit": ours, "diffusers": theirs}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=64, help="the random transformer's width")


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    result = run(repeats=args.repeats, num_steps=args.steps, width=args.width)
    emit(result)
    print(f"{result['image_size']} px x {result['batch']}, {args.steps} steps + CFG: diffusers "
          f"{result['diffusers_s']:.3f} s, jdit {result['jdit_s']:.3f} s: jdit is "
          f"{result['speedup']:.2f}x diffusers (compile {result['jdit_compile_s']:.1f} s; images "
          f"differ by {result['max_abs_image_difference']:.1e})", file=sys.stderr)
    for part in ("t5", "step", "vae_decode"):
        ours, theirs = (result["components_s"][k][part] for k in ("jdit", "diffusers"))
        print(f"  {part:>10}: diffusers {theirs * 1e3:7.1f} ms, jdit {ours * 1e3:7.1f} ms",
              file=sys.stderr)
    return 0
