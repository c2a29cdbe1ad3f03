"""``jdit bench forward``: one PixArt forward pass, jdit against diffusers, same weights, one run.

The model (12 blocks, width 768, 12 heads, patch 2, 32x32x4 latents, batch 4, 120 caption tokens
of 4096 channels) is built in diffusers with random weights, saved, and loaded into jdit with
``from_pretrained``; the outputs must agree before anything is timed. Timings alternate between
the two libraries and report medians. The float32 matmul throughput of both libraries is
measured in the same run, so the ratio can be read against what this machine can do at all.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CONFIG = dict(depth=12, width=768, heads=12, patch=2, latent=32, channels=4, batch=4,
              caption_tokens=120, caption_channels=4096)


def forward_flops(c: dict[str, int] = CONFIG) -> int:
    """Multiply-add FLOPs (2 per MAC) of one forward; elementwise work is not counted."""
    b, d, p = c["batch"], c["width"], c["patch"]
    n = (c["latent"] // p) ** 2
    m, l_cap = b * n, c["caption_tokens"]
    block = (2 * m * d * 3 * d + 2 * m * d * d  # self-attention projections
             + 2 * 2 * b * n * n * d  # QK^T and PV
             + 2 * m * d * d * 2 + 2 * b * l_cap * d * 2 * d  # cross q, out; caption k, v
             + 2 * 2 * b * n * l_cap * d  # cross QK^T and PV
             + 2 * 2 * m * d * 4 * d)  # MLP
    top = (2 * m * p * p * c["channels"] * d + 2 * b * l_cap * (c["caption_channels"] * d + d * d)
           + 2 * m * d * p * p * 2 * c["channels"])
    return c["depth"] * block + top


def _times(fn: Callable[[], Any], repeats: int, pause: float = 0.2) -> list[float]:
    """Wall times of ``fn``; the pause lets the other library's spinning threads go idle."""
    times = []
    for _ in range(repeats):
        time.sleep(pause)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def matmul_gflops(torch: Any, repeats: int) -> tuple[float, float]:
    """float32 (1024x768)@(768x3072) throughput of jax and of torch, interleaved."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 768), np.float32)
    b = rng.standard_normal((768, 3072), np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    mm(ja, jb).block_until_ready()
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    jt, tt = [], []
    for _ in range(repeats):
        jt += _times(lambda: mm(ja, jb).block_until_ready(), 1)
        tt += _times(lambda: ta @ tb, 1)
    flops = 2 * 1024 * 768 * 3072
    return flops / statistics.median(jt) / 1e9, flops / statistics.median(tt) / 1e9


def run(repeats: int = 7, threads: int = 2, config: dict[str, int] | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    log = log or (lambda s: print(s, file=sys.stderr))
    try:
        import torch
        from diffusers import PixArtTransformer2DModel
    except ImportError as e:
        raise RuntimeError("jdit bench forward compares against diffusers: "
                           "pip install 'jdit[test]'") from e
    import jdit

    torch.set_num_threads(threads)
    c = dict(CONFIG, **(config or {}))
    log("building the diffusers model with random weights ...")
    ref_model = PixArtTransformer2DModel(
        num_attention_heads=c["heads"], attention_head_dim=c["width"] // c["heads"],
        in_channels=c["channels"], out_channels=2 * c["channels"], num_layers=c["depth"],
        cross_attention_dim=c["width"], sample_size=c["latent"], patch_size=c["patch"],
        caption_channels=c["caption_channels"], use_additional_conditions=False,
    ).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prm in ref_model.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen) * 0.02)
    with tempfile.TemporaryDirectory() as folder:
        ref_model.save_pretrained(folder)
        module, params = jdit.models.from_pretrained(folder)

    x = torch.randn(c["batch"], c["channels"], c["latent"], c["latent"], generator=gen)
    ctx = torch.randn(c["batch"], c["caption_tokens"], c["caption_channels"], generator=gen)
    t = torch.linspace(10.0, 999.0, c["batch"])
    jx = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
    jt, jc = jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())
    forward = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, context=c))

    log("compiling jdit and checking both give the same output ...")
    start = time.perf_counter()
    out = np.asarray(forward(params, jx, jt, jc))
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        ref = ref_model(x, encoder_hidden_states=ctx, timestep=t).sample.permute(0, 2, 3, 1).numpy()
    err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
    if err > 1e-4:
        raise RuntimeError(f"jdit and diffusers disagree (max relative error {err:.2e})")

    log(f"timing {repeats} alternating forwards of each ...")
    torch_times, jdit_times = [], []
    with torch.no_grad():
        for _ in range(repeats):
            torch_times += _times(lambda: ref_model(x, encoder_hidden_states=ctx, timestep=t), 1)
            jdit_times += _times(lambda: forward(params, jx, jt, jc).block_until_ready(), 1)
    jax_peak, torch_peak = matmul_gflops(torch, repeats)
    flops = forward_flops(c)
    t_torch, t_jdit = statistics.median(torch_times), statistics.median(jdit_times)
    return {
        "benchmark": "forward",
        "config": c,
        "threads": threads,
        "max_rel_err": err,
        "diffusers_s": t_torch,
        "jdit_s": t_jdit,
        "speedup": t_torch / t_jdit,
        "jdit_compile_s": compile_s,
        "gflop_per_forward": flops / 1e9,
        "diffusers_gflops": flops / t_torch / 1e9,
        "jdit_gflops": flops / t_jdit / 1e9,
        "jax_matmul_gflops": jax_peak,
        "torch_matmul_gflops": torch_peak,
        "diffusers_s_all": torch_times,
        "jdit_s_all": jdit_times,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    result = run(repeats=args.repeats, threads=args.threads)
    emit(result)
    print(f"diffusers {result['diffusers_s']:.3f} s, jdit {result['jdit_s']:.3f} s: jdit is "
          f"{result['speedup']:.2f}x diffusers (matmul peak jax {result['jax_matmul_gflops']:.0f} "
          f"/ torch {result['torch_matmul_gflops']:.0f} GFLOP/s)", file=sys.stderr)
    return 0
