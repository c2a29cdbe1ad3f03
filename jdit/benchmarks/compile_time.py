"""``jdit bench compile``: compile time of a full-size model, with and without ``nn.scan``.

Parameters are abstract (``jax.eval_shape``), so nothing of the 600M parameters is allocated;
the forward (and optionally the parameter gradient) is lowered and compiled for this machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jdit.models import PixArt, build, init_params, preset
from jdit.nn.stack import stack_params


def _abstract_params(module: Any) -> Any:
    flat = module.clone(scan_layers=False)
    shapes = jax.eval_shape(lambda: init_params(flat, jax.random.key(0)))
    if module.scan_layers:
        shapes = jax.eval_shape(lambda p: stack_params(p, module.per_layer()), shapes)
    return shapes


def compile_seconds(name: str, scan: bool, grad: bool = False, caption_length: int | None = None
                    ) -> dict[str, float]:
    module = build(preset(name), scan_layers=scan, remat_policy="dots" if grad else "none")
    params = _abstract_params(module)
    if isinstance(module, PixArt):
        caption_length = caption_length or (300 if "sigma" in name else 120)
        inputs = module.example_inputs(batch=1, caption_length=caption_length)
    else:
        inputs = module.example_inputs(batch=1)
    inputs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), inputs)

    def forward(p: Any, kw: dict[str, Any]) -> jax.Array:
        return module.apply({"params": p}, **kw)

    fn: Callable[..., Any] = forward
    if grad:
        fn = jax.grad(lambda p, kw: jnp.mean(jnp.square(forward(p, kw))))
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(params, inputs)
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"lower_s": lowered_at - start, "compile_s": done - lowered_at, "total_s": done - start}


def run(name: str = "pixart_sigma_xl2_1024", grad: bool = True,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    log = log or (lambda s: print(s, file=sys.stderr))
    result: dict[str, Any] = {"benchmark": "compile", "preset": name, "backend": jax.default_backend()}
    for what in (["forward", "grad"] if grad else ["forward"]):
        for scan in (True, False):
            key = f"{what}_{'scan' if scan else 'unrolled'}"
            log(f"compiling {name} {what} ({'nn.scan' if scan else 'unrolled'}) ...")
            result[key] = compile_seconds(name, scan, grad=what == "grad")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="pixart_sigma_xl2_1024")
    parser.add_argument("--forward-only", action="store_true", help="skip the gradient program")


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    emit(run(args.preset, grad=not args.forward_only))
    return 0
