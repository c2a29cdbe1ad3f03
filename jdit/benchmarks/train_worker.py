"""One library's side of ``jdit bench train``, in its own process:
``python -m jdit.benchmarks.train_worker {jdit|diffusers} FOLDER INPUTS.npz STEPS THREADS``.

``FOLDER``: the random ``PixArtTransformer2DModel`` the parent saved; ``INPUTS.npz``: the batch
(NCHW latents ``x``, caption features ``context``, timesteps ``t``, the ε ``target``). One AdamW
step (lr 1e-4) on the MSE of the ε channels; the first step's loss is reported for the parent's
check, then ``STEPS`` steps are timed, then one large float32 matmul (this library's ceiling).
Prints one JSON line: ``first_loss``, ``times``, ``setup_s`` (imports and loading),
``compile_s`` (the first step), ``matmul_gflops``, ``peak_rss_mb``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from jdit.benchmarks.isolated import emit, peak_rss_mb

LR = 1e-4
MATMUL = (1024, 768, 3072)
# (one training step returning its loss, a matmul thunk maker, numpy -> the library's array)
Library = tuple[Callable[[], float], Callable[[Any, Any], Callable[[], Any]],
                Callable[[np.ndarray], Any]]


def _timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _diffusers(folder: str, d: Any, threads: int) -> Library:
    import torch
    from diffusers import PixArtTransformer2DModel

    torch.set_num_threads(threads)
    model = PixArtTransformer2DModel.from_pretrained(folder).train()
    x, ctx, t, target = (torch.from_numpy(d[k]) for k in ("x", "context", "t", "target"))
    ch = x.shape[1]
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)

    def step() -> float:
        out = model(x, encoder_hidden_states=ctx, timestep=t).sample
        loss = torch.mean((out[:, :ch] - target) ** 2)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step, (lambda a, b: (lambda: a @ b)), torch.from_numpy


def _jdit(folder: str, d: Any) -> Library:
    import functools

    import jax
    import jax.numpy as jnp
    import optax

    import jdit

    module, params = jdit.models.from_pretrained(folder)
    x = jnp.asarray(d["x"].transpose(0, 2, 3, 1))
    target = jnp.asarray(d["target"].transpose(0, 2, 3, 1))
    ctx, t = jnp.asarray(d["context"]), jnp.asarray(d["t"])
    ch = x.shape[-1]
    tx = optax.adamw(LR, weight_decay=0.0)

    def loss_fn(p: Any) -> jax.Array:
        out = module.apply({"params": p}, x, t, context=ctx)
        return jnp.mean((out[..., :ch] - target) ** 2)

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # in place, as torch updates
    def train_step(p: Any, opt_state: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    state = {"p": params, "o": tx.init(params)}

    def step() -> float:
        state["p"], state["o"], loss = train_step(state["p"], state["o"])
        return float(loss)

    mm = jax.jit(jnp.matmul)
    return step, (lambda a, b: (lambda: mm(a, b).block_until_ready())), jnp.asarray


def _measure(step: Callable[[], float], matmul: Callable[[Any, Any], Callable[[], Any]],
             array: Callable[[np.ndarray], Any], steps: int) -> dict[str, Any]:
    start = time.perf_counter()
    first_loss = step()
    compile_s = time.perf_counter() - start
    times = _timed(step, steps)
    m, k, n = MATMUL
    rng = np.random.default_rng(0)
    fn = matmul(array(rng.standard_normal((m, k), np.float32)),
                array(rng.standard_normal((k, n), np.float32)))
    fn()
    gflops = 2 * m * k * n / statistics.median(_timed(fn, 7)) / 1e9
    return {"first_loss": first_loss, "compile_s": compile_s, "times": times,
            "median_s": statistics.median(times), "matmul_gflops": gflops}


def main(argv: list[str]) -> int:
    start = time.perf_counter()
    library, folder, inputs, steps, threads = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4])
    if library not in ("jdit", "diffusers"):
        raise SystemExit(f"library must be jdit or diffusers, got {library!r}")
    d = dict(np.load(inputs))
    lib = _jdit(folder, d) if library == "jdit" else _diffusers(folder, d, threads)
    setup_s = time.perf_counter() - start
    emit({"library": library, **_measure(*lib, steps), "setup_s": setup_s,
          "peak_rss_mb": peak_rss_mb()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
