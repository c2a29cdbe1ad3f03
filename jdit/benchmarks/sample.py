"""``jdit bench sample``: a 20-step dpm++2m sampling call with classifier-free guidance against
20 batched (2B) forwards of the same model, measured in the same run.

The sampling call is the whole loop compiled as one program; the reference is the jitted 2B
forward called 20 times from Python. A second sampling call with new noise must not compile
again (counted with a trace counter on the model function).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jdit.benchmarks.forward import CONFIG
from jdit.diffusion import DDPMSchedule
from jdit.models import build, init_params
from jdit.sampling import ClassifierFreeGuidance, sample


def run(repeats: int = 3, num_steps: int = 20, config: dict[str, int] | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    log = log or (lambda s: print(s, file=sys.stderr))
    c = dict(CONFIG, **(config or {}))
    module = build("pixart", input_size=c["latent"], patch_size=c["patch"],
                   in_channels=c["channels"], hidden_size=c["width"], depth=c["depth"],
                   num_heads=c["heads"], caption_channels=c["caption_channels"])
    params = init_params(module, jax.random.key(0))
    b, keys = c["batch"], jax.random.split(jax.random.key(1), 4)
    ctx2 = jax.random.normal(keys[0], (2 * b, c["caption_tokens"], c["caption_channels"]))
    traces = [0]

    def model_fn(x2: jax.Array, t2: jax.Array, p: Any, context: jax.Array) -> jax.Array:
        traces[0] += 1
        return module.apply({"params": p}, x2, t2, context=context)

    guided = ClassifierFreeGuidance(model_fn)
    schedule = DDPMSchedule.linear()
    shape = (b, c["latent"], c["latent"], c["channels"])
    scale = jnp.full((b,), 4.5)

    def sampling(key: jax.Array) -> jax.Array:
        noise = jax.random.normal(key, shape)
        return sample(guided, noise, solver="dpm++2m", num_steps=num_steps, schedule=schedule,
                      args=(scale, params, ctx2)).block_until_ready()

    forward = jax.jit(model_fn)
    x2 = jax.random.normal(keys[1], (2 * b,) + shape[1:])
    t2 = jnp.full((2 * b,), 500.0)

    log("compiling the forward and the sampler ...")
    forward(x2, t2, params, ctx2).block_until_ready()
    start = time.perf_counter()
    sampling(keys[2])
    compile_s = time.perf_counter() - start
    traced = traces[0]  # every later trace would be a recompilation

    sample_times, forward_times = [], []
    for r in range(repeats):
        log(f"repeat {r + 1}/{repeats}: sampling call, then {num_steps} forwards ...")
        start = time.perf_counter()
        sampling(jax.random.fold_in(keys[3], r))
        sample_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(num_steps):
            forward(x2, t2, params, ctx2).block_until_ready()
        forward_times.append(time.perf_counter() - start)
    t_sample, t_forwards = statistics.median(sample_times), statistics.median(forward_times)
    return {
        "benchmark": "sample",
        "config": c,
        "solver": "dpm++2m",
        "num_steps": num_steps,
        "guidance": "cfg, 2B batch",
        "sample_s": t_sample,
        "forwards_s": t_forwards,
        "ratio": t_sample / t_forwards,
        "first_call_s": compile_s,
        "recompiled_on_new_noise": traces[0] != traced,
        "sample_s_all": sample_times,
        "forwards_s_all": forward_times,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    result = run(repeats=args.repeats, num_steps=args.steps)
    emit(result)
    print(f"sampling {result['sample_s']:.2f} s vs {args.steps} forwards "
          f"{result['forwards_s']:.2f} s: ratio {result['ratio']:.3f}; recompiled on new noise: "
          f"{result['recompiled_on_new_noise']}", file=sys.stderr)
    return 0
