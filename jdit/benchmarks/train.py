"""``jdit bench train``: one training step (forward, backward, AdamW) of the PixArt benchmark
model, jdit against diffusers + torch, same weights, same batch, measured in the same run.

The loss is the MSE of the ε channels against a fixed target; both sides take one AdamW step
from the same weights first and must agree on the loss before anything is timed.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jdit.benchmarks.forward import CONFIG, _times, forward_flops, matmul_gflops


def run(repeats: int = 5, threads: int = 2, config: dict[str, int] | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    log = log or (lambda s: print(s, file=sys.stderr))
    try:
        import torch
        from diffusers import PixArtTransformer2DModel
    except ImportError as e:
        raise RuntimeError("jdit bench train compares against diffusers: "
                           "pip install 'jdit[test]'") from e
    import jdit

    torch.set_num_threads(threads)
    c = dict(CONFIG, **(config or {}))
    ref = PixArtTransformer2DModel(
        num_attention_heads=c["heads"], attention_head_dim=c["width"] // c["heads"],
        in_channels=c["channels"], out_channels=2 * c["channels"], num_layers=c["depth"],
        cross_attention_dim=c["width"], sample_size=c["latent"], patch_size=c["patch"],
        caption_channels=c["caption_channels"], use_additional_conditions=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        module, params = jdit.models.from_pretrained(folder)
    ref.train()

    b, ch = c["batch"], c["channels"]
    x = torch.randn(b, ch, c["latent"], c["latent"], generator=gen)
    ctx = torch.randn(b, c["caption_tokens"], c["caption_channels"], generator=gen)
    t = torch.linspace(10.0, 999.0, b)
    target = torch.randn(b, ch, c["latent"], c["latent"], generator=gen)
    lr = 1e-4
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=0.0)

    def torch_step() -> float:
        out = ref(x, encoder_hidden_states=ctx, timestep=t).sample
        loss = torch.mean((out[:, :ch] - target) ** 2)
        loss.backward()
        torch_opt.step()
        torch_opt.zero_grad(set_to_none=True)
        return float(loss)

    tx = optax.adamw(lr, weight_decay=0.0)
    jx = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
    jt, jc = jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())
    jtarget = jnp.asarray(target.permute(0, 2, 3, 1).numpy())

    def loss_fn(p: Any) -> jax.Array:
        out = module.apply({"params": p}, jx, jt, context=jc)
        return jnp.mean((out[..., :ch] - jtarget) ** 2)

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # in place, as torch updates
    def jdit_step(p: Any, opt_state: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    log("first step of each (compiles jdit) and a loss check ...")
    opt_state = tx.init(params)
    params, opt_state, jloss = jdit_step(params, opt_state)
    tloss = torch_step()
    err = abs(float(jloss) - tloss) / abs(tloss)
    if err > 1e-4:
        raise RuntimeError(f"jdit and diffusers losses disagree: {float(jloss)} vs {tloss}")

    state = {"p": params, "o": opt_state}

    def jdit_once() -> None:
        state["p"], state["o"], loss = jdit_step(state["p"], state["o"])
        loss.block_until_ready()

    log(f"timing {repeats} alternating steps of each ...")
    tt, jt_ = [], []
    for _ in range(repeats):
        tt += _times(torch_step, 1)
        jt_ += _times(jdit_once, 1)
    flops = 3 * forward_flops(c)  # forward + backward ≈ 3 forwards
    t_torch, t_jdit = statistics.median(tt), statistics.median(jt_)
    # the machine's ceiling: one large float32 matmul in each library, same run
    jax_peak, torch_peak = matmul_gflops(torch, repeats)
    return {"benchmark": "train", "config": c, "threads": threads, "first_loss_rel_err": err,
            "diffusers_s": t_torch, "jdit_s": t_jdit, "speedup": t_torch / t_jdit,
            "diffusers_gflops": flops / t_torch / 1e9, "jdit_gflops": flops / t_jdit / 1e9,
            "jax_matmul_gflops": jax_peak, "torch_matmul_gflops": torch_peak,
            "gflops_needed_for_1_5x": 1.5 * flops / t_torch / 1e9,
            "diffusers_s_all": tt, "jdit_s_all": jt_}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    result = run(repeats=args.repeats, threads=args.threads)
    emit(result)
    print(f"diffusers {result['diffusers_s']:.2f} s, jdit {result['jdit_s']:.2f} s per training "
          f"step: jdit is {result['speedup']:.2f}x diffusers", file=sys.stderr)
    return 0
