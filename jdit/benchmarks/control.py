"""``jdit bench control``: a guided sampling step of a PixArt with one EasyControl condition,
with the condition's cache against without it, measured in the same run.

* **cached**: the step as jdit samples: the condition branch ran once before the loop; the
  image tokens of both guidance halves attend to its cached keys and values.
* **uncached**: the step as EasyControl runs without its cache: the condition's tokens go
  through every block in every forward (both halves of the guidance).
* **uncached, once per step**: the cheapest way without a cache: the branch once per step for
  the batch, shared by both halves.
* **no condition** (reference): the base model's guided step, what the cache's overhead is
  measured against.

All three compute the same output (checked); the figures are medians of per-step times.
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
import numpy as np

from jdit import control
from jdit.benchmarks.forward import CONFIG
from jdit.models import build, init_params
from jdit.nn import perturbed


def run(repeats: int = 5, calls: int = 5, config: dict[str, int] | None = None,
        condition_latent: int | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``condition_latent``: the condition's latent side (default: the image's)."""
    log = log or (lambda s: print(s, file=sys.stderr))
    c = dict(CONFIG, **(config or {}))
    module = build("pixart", input_size=c["latent"], patch_size=c["patch"],
                   in_channels=c["channels"], hidden_size=c["width"], depth=c["depth"],
                   num_heads=c["heads"], caption_channels=c["caption_channels"],
                   learn_sigma=False)
    keys = jax.random.split(jax.random.key(0), 6)
    params = perturbed(init_params(module, keys[0]), keys[1], 0.02)
    adapters = perturbed(control.init(params, 16, keys[2], module=module), keys[3], 0.02)
    b, s, cs = c["batch"], c["latent"], condition_latent or c["latent"]
    x2 = jax.random.normal(keys[4], (2 * b, s, s, c["channels"]))
    t2 = jnp.full((2 * b,), 500.0)
    ctx2 = jax.random.normal(keys[5], (2 * b, c["caption_tokens"], c["caption_channels"]))
    latents = jax.random.normal(keys[4], (b, cs, cs, c["channels"]))

    def branch(z: jax.Array) -> Any:
        return control.encode(module, params, control.Condition(z, adapters, 1.0))

    def image(cache: Any) -> jax.Array:
        return module.apply({"params": params}, x2, t2, context=ctx2, control=cache)

    cache2 = jax.jit(lambda z: control.repeat(branch(z), 2))(latents)
    steps = {
        "cached": jax.jit(lambda cache: image(cache)),
        "uncached": jax.jit(lambda z: image(branch(jnp.concatenate([z, z])))),
        "uncached_once_per_step": jax.jit(lambda z: image(control.repeat(branch(z), 2))),
        "no_condition": jax.jit(lambda _: image(None)),
    }
    inputs = {"cached": cache2, "uncached": latents, "uncached_once_per_step": latents,
              "no_condition": latents}
    log("compiling the four steps ...")
    outs = {k: np.asarray(f(inputs[k])) for k, f in steps.items()}
    err = max(float(np.abs(outs[k] - outs["cached"]).max()) for k in outs if k != "no_condition")
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(repeats):  # interleaved, so that machine noise hits all three alike
        log(f"repeat {r + 1}/{repeats} ...")
        for k, f in steps.items():
            start = time.perf_counter()
            for _ in range(calls):
                f(inputs[k]).block_until_ready()
            times[k].append((time.perf_counter() - start) / calls)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "benchmark": "control",
        "config": c,
        "condition_latent": cs,
        "max_abs_diff": err,
        **{f"{k}_step_s": v for k, v in med.items()},
        "cached_vs_uncached": med["cached"] / med["uncached"],
        "cached_vs_once_per_step": med["cached"] / med["uncached_once_per_step"],
        "cached_vs_no_condition": med["cached"] / med["no_condition"],
        "step_s_all": times,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5, help="steps timed per repeat")
    parser.add_argument("--condition-latent", type=int, default=None,
                        help="the condition's latent side (default: the image's)")


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    result = run(repeats=args.repeats, calls=args.calls, condition_latent=args.condition_latent)
    emit(result)
    print(f"step with the cache {result['cached_step_s'] * 1e3:.0f} ms; without: "
          f"{result['uncached_step_s'] * 1e3:.0f} ms (ratio {result['cached_vs_uncached']:.3f}),"
          f" branch once per step {result['uncached_once_per_step_step_s'] * 1e3:.0f} ms "
          f"(ratio {result['cached_vs_once_per_step']:.3f}); no condition "
          f"{result['no_condition_step_s'] * 1e3:.0f} ms (the cache's overhead "
          f"{result['cached_vs_no_condition']:.3f}x); outputs agree to "
          f"{result['max_abs_diff']:.1e}", file=sys.stderr)
    return 0
