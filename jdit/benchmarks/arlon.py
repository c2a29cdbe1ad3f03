"""``jdit bench arlon``: ARLON (arXiv 2410.20502) at toy scale, on the embedded ``moving_shapes``.

Everything is trained here (:mod:`jdit.train.arlon`): a tiny Latte on 8-frame clips (the first
frames given as known frames in part of the batch), the latent VQ-VAE, the AR prior on the
tokens of whole 32-frame videos, and ARLON's adapter + injections on the frozen DiT, with and
without uncertainty sampling. Long videos (4x the clip) of held-out captions are then made

(a) by chaining DiT segments on the last frames of the previous one (the baseline);
(b) the same, plus each segment's slice of the coarse plan decoded from the AR prior's tokens;
(b20) as (b), with 20 % of the AR tokens replaced at random;
(oracle) as (b), the plan being the VQ tokens of the true video (how much a perfect AR model
would give; a diagnostic, not part of the claim),

and read back by the exact evaluator (:mod:`jdit.eval.moving_shapes`). The claim holds at this
scale if (b)'s identity consistency is >= 0.90 and at least 0.15 above (a)'s, and its trajectory
error lower. The result is reported as it comes out; the toy is not tuned toward either answer.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# The experiment (one command, <= 25 minutes on 2 cores; BENCHMARKS.md has the figures).
EXPERIMENT: dict[str, Any] = dict(
    seed=0, size=32, clip_frames=8, eval_frames=32, context_frames=2, pair_fraction=0.3,
    eval_videos=32, text_dim=64, max_length=16,
    # a trained image model of the same shapes (a `shapes_tiny` run directory, the README's main
    # job): the video DiT starts from it, as Latte starts from PixArt-α; "" trains from scratch
    image_model="",
    dit=dict(hidden_size=96, depth=3, num_heads=4, patch_size=4, steps=1800, batch_size=16,
             lr=3e-3, ema_decay=0.995, p_context=0.5, cond_dropout=0.1, shift=3.0),
    vq=dict(codebook_size=256, code_dim=16, temporal_factor=4, spatial_factor=8, width=96,
            num_blocks=2, steps=800, batch_size=16, lr=2e-3, restart_every=50),
    ar=dict(width=128, num_layers=3, num_heads=4, steps=500, batch_size=32, lr=1e-3,
            temperature=1.0, top_k=8),
    inject=dict(adapter_width=64, adapter_blocks=2, steps=300, batch_size=16, lr=3e-3,
                ema_decay=0.99, feature_max_std=0.5),
    sample=dict(steps=12, guidance_scale=3.0, solver="dpm++2m"),
    corrupt_fraction=0.2,
)
IDENTITY_BAR, IDENTITY_MARGIN = 0.90, 0.15


class Experiment:
    """The data, text encoder and models of one configuration."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from jdit.autoencoders.vq import LatentVQVAE
        from jdit.data import moving_shapes, shapes
        from jdit.models import build
        from jdit.models.ar_prior import ARPrior
        from jdit.models.arlon import ArlonDiT, with_injection
        from jdit.text.words import WordEncoder

        self.cfg, self.data = cfg, moving_shapes
        # the shapes words first (an image model's word vectors stay its own), then the motion
        words = list(shapes.vocabulary())
        words += [w for w in moving_shapes.vocabulary() if w not in words]
        self.encoder = WordEncoder(tuple(words), dim=cfg["text_dim"], max_length=cfg["max_length"])
        self.null = self.encoder.encode([""])
        d, v, a = cfg["dit"], cfg["vq"], cfg["ar"]
        self.image_model = None
        if cfg["image_model"]:
            self.image_model = image_model(cfg["image_model"], cfg)
            m = self.image_model[0]
            d.update(hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads,
                     patch_size=m.patch_size)
        self.dit = build("latte", input_size=cfg["size"], patch_size=d["patch_size"],
                         in_channels=7, predict_channels=3, hidden_size=d["hidden_size"],
                         depth=d["depth"], num_heads=d["num_heads"],
                         caption_channels=cfg["text_dim"], learn_sigma=False,
                         video_length=cfg["clip_frames"])
        self.vq = LatentVQVAE(channels=3, codebook_size=v["codebook_size"], code_dim=v["code_dim"],
                              temporal_factor=v["temporal_factor"],
                              spatial_factor=v["spatial_factor"], width=v["width"],
                              num_blocks=v["num_blocks"])
        grid = self.vq.token_grid((cfg["eval_frames"], cfg["size"], cfg["size"], 3))
        self.grid = grid
        self.prior = ARPrior(codebook_size=v["codebook_size"], text_dim=cfg["text_dim"],
                             grid_hw=grid[1:], width=a["width"], num_layers=a["num_layers"],
                             num_heads=a["num_heads"])
        i = cfg["inject"]
        self.arlon = ArlonDiT(dit=with_injection(self.dit), adapter_width=i["adapter_width"],
                              adapter_blocks=i["adapter_blocks"], patch_size=d["patch_size"])

    def clips(self, seed: int, index: int, batch_size: int, frames: int) -> dict[str, np.ndarray]:
        b = self.data.batch(seed, index, batch_size, frames=frames, size=self.cfg["size"],
                            pair_fraction=self.cfg["pair_fraction"])
        ctx, mask = self.encoder.encode(list(b["captions"]))
        return {"videos": b["videos"], "context": ctx, "context_mask": mask}

    def apply_dit(self, params: Any, x: Any, t: Any, ctx: Any, mask: Any, coarse: Any) -> Any:
        return self.dit.apply({"params": params}, x, t, context=ctx, context_mask=mask)

    def apply_arlon(self, params: Any, x: Any, t: Any, ctx: Any, mask: Any, coarse: Any) -> Any:
        return self.arlon.apply({"params": params}, x, t, context=ctx, context_mask=mask,
                                coarse=coarse)


def image_model(path: str, cfg: dict[str, Any]) -> tuple[Any, Any]:
    """``(module, EMA params)`` of a trained ``shapes`` PixArt run, checked to fit the video."""
    from jdit.models.pixart import PixArt
    from jdit.train.loop import load_trained

    run, params, _ = load_trained(path)
    m = run.module
    if not isinstance(m, PixArt) or m.in_channels != 3 or m.learn_sigma:
        raise ValueError(f"{path}: image_model must be a pixel-space PixArt run without learned "
                         f"sigma (configs/shapes_tiny.py), got {type(m).__name__}")
    if (m.input_size, m.caption_channels) != (cfg["size"], cfg["text_dim"]):
        raise ValueError(f"{path}: the image model is {m.input_size} px with {m.caption_channels}-"
                         f"dim captions; the experiment needs {cfg['size']} px and "
                         f"{cfg['text_dim']}")
    return m, params


def from_image_model(init: Any, image_params: Any) -> Any:
    """The video DiT's parameters from an image PixArt's: every spatial block, the embeddings
    and the final layer taken over (the patch embedding's known-frame channels zero), the
    temporal blocks' output projections zero, so the video DiT starts as the image model run on
    each frame (plus Latte's frame embedding)."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(init)
    image = traverse_util.flatten_dict(image_params)
    out = {}
    for key, value in flat.items():
        if len(key) > 1 and key[1] == "spatial":
            out[key] = image[(key[0],) + key[2:]]
        elif len(key) > 1 and key[1] == "temporal":
            zero = key[2:4] in (("attn", "out"), ("mlp", "fc2"))
            out[key] = np.zeros_like(value) if zero else value
        elif key[0] == "patch_embed" and key[-1] == "kernel":
            src = np.asarray(image[key])
            w = np.zeros(value.shape, value.dtype)
            w[..., :src.shape[-2], :] = src  # (p, p, C_in, D): the noisy frame's channels
            out[key] = w
        else:
            out[key] = image[key]
        if np.shape(out[key]) != np.shape(value):
            raise ValueError(f"image model parameter {'/'.join(key)} has shape "
                             f"{np.shape(out[key])}, the video DiT needs {np.shape(value)}")
    return traverse_util.unflatten_dict(out)


def _stage(workdir: Path | None, name: str, like: Any, train: Callable[[], Any],
           log: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """Train a stage, or read it back from ``workdir`` (a re-run evaluates without training)."""
    from flax import serialization

    from jdit.files import atomic_write

    path = workdir / f"{name}.msgpack" if workdir else None
    if path is not None and path.exists():
        log(f"{name}: read from {path}")
        return serialization.from_bytes(like, path.read_bytes()), {"reused": True}
    fitted = train()
    if path is not None:
        atomic_write(path, serialization.to_bytes(fitted.params))
    info = {"seconds": round(fitted.seconds, 1), "first_loss": fitted.losses[0],
            "last_loss": fitted.losses[-1]}
    log(f"{name}: {info}")
    return fitted.params, info


def train_all(x: Experiment, workdir: Path | None, log: Callable[[str], None]
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The four stages (two injection variants); returns parameters and per-stage figures."""
    import jax
    import jax.numpy as jnp

    from jdit.autoencoders.vq import restart_dead_codes, vq_loss
    from jdit.models.ar_prior import ar_loss
    from jdit.models.arlon import arlon_params, trainable_mask
    from jdit.nn.init import init_params
    from jdit.train.arlon import fit, video_flow_loss
    from jdit.train.uncertainty import UncertaintySampling

    cfg, seed = x.cfg, int(x.cfg["seed"])
    d, v, a, i = cfg["dit"], cfg["vq"], cfg["ar"], cfg["inject"]
    params, info = {}, {}
    common = dict(shift=d["shift"], context_frames=cfg["context_frames"],
                  p_context=d["p_context"], cond_dropout=d["cond_dropout"], null=x.null)

    def clips(b: int, frames: int, stream: int) -> Callable[[int], dict[str, np.ndarray]]:
        return lambda k: x.clips(seed * 1000 + stream, k, b, frames)

    dit_init = init_params(x.dit, jax.random.key(seed))
    if x.image_model is not None:
        dit_init = from_image_model(dit_init, x.image_model[1])
    params["dit"], info["dit"] = _stage(workdir, "dit", dit_init,
                                        lambda: fit(video_flow_loss(x.apply_dit, **common),
                                                    dit_init,
                                                    clips(d["batch_size"], cfg["clip_frames"], 1),
                                                    steps=d["steps"], lr=d["lr"], seed=seed,
                                                    ema_decay=d["ema_decay"],
                                                    desc="video DiT"), log)

    vq_init = init_params(x.vq, jax.random.key(seed + 1))
    params["vq"], info["vq"] = _stage(
        workdir, "vq", vq_init,
        lambda: fit(lambda p, b, r: vq_loss(x.vq, p, b["videos"])[0], vq_init,
                    clips(v["batch_size"], cfg["clip_frames"], 2), steps=v["steps"], lr=v["lr"],
                    seed=seed, desc="VQ-VAE", revise=(v["restart_every"], lambda p, b, r:
                                                       restart_dead_codes(x.vq, p, b["videos"], r))
                    ), log)
    encode = jax.jit(lambda vids: x.vq.apply({"params": params["vq"]}, vids, method="encode"))

    def ar_batch(k: int) -> dict[str, np.ndarray]:
        b = x.clips(seed * 1000 + 3, k, a["batch_size"], cfg["eval_frames"])
        tokens = np.asarray(encode(jnp.asarray(b["videos"]))).reshape(a["batch_size"], -1)
        return {"tokens": tokens, "context": b["context"], "context_mask": b["context_mask"]}

    ar_init = init_params(x.prior, jax.random.key(seed + 2))
    params["ar"], info["ar"] = _stage(
        workdir, "ar", ar_init,
        lambda: fit(lambda p, b, r: ar_loss(x.prior, p, b["context"], b["context_mask"],
                                            b["tokens"])[0],
                    ar_init, ar_batch, steps=a["steps"], lr=a["lr"], seed=seed,
                    desc="AR prior"), log)

    def plan(uncertainty: UncertaintySampling | None) -> Callable[[Any, Any], Any]:
        def coarse(batch: Any, rng: Any) -> Any:
            recon = jax.lax.stop_gradient(batch["coarse"])
            return recon if uncertainty is None else uncertainty.features(rng, recon)
        return coarse

    # Injection clips are cut at a random frame from longer videos whose plan is decoded whole,
    # as a segment of a long video is at inference (segments start anywhere, not on the VQ's
    # 4-frame groups).
    ft = x.vq.temporal_factor
    span = -(-(cfg["clip_frames"] + ft) // ft) * ft
    decode = jax.jit(lambda vids: x.vq.apply(
        {"params": params["vq"]}, x.vq.apply({"params": params["vq"]}, vids, method="encode"),
        method="decode"))

    def inject_batch(k: int) -> dict[str, np.ndarray]:
        b = x.clips(seed * 1000 + 4, k, i["batch_size"], span)
        coarse = np.asarray(decode(jnp.asarray(b["videos"])))
        offset = np.random.default_rng([seed, k]).integers(0, span - cfg["clip_frames"] + 1,
                                                            i["batch_size"])
        take = offset[:, None] + np.arange(cfg["clip_frames"])[None]
        rows = np.arange(i["batch_size"])[:, None]
        return {**b, "videos": b["videos"][rows, take], "coarse": coarse[rows, take]}

    start = arlon_params(init_params(x.arlon, jax.random.key(seed + 3)), params["dit"])
    for name, unc in (("inject", None),
                      ("inject_uncertainty", UncertaintySampling(i["feature_max_std"]))):
        loss = video_flow_loss(x.apply_arlon, **common, coarse_fn=plan(unc))
        params[name], info[name] = _stage(
            workdir, name, start,
            lambda loss=loss, name=name: fit(loss, start, inject_batch,
                                  steps=i["steps"], lr=i["lr"], seed=seed,
                                  ema_decay=i["ema_decay"], trainable=trainable_mask(start),
                                  desc=name), log)
    return params, info


def evaluate_all(x: Experiment, params: dict[str, Any], log: Callable[[str], None]
                 ) -> dict[str, Any]:
    """Long videos of held-out captions by each method, scored by the exact evaluator."""
    import jax
    import jax.numpy as jnp

    from jdit.autoencoders.vq import check_tokens, tokens_to_grid
    from jdit.eval.moving_shapes import evaluate
    from jdit.sampling.long_video import sample_long_video
    from jdit.train.arlon import segment_denoiser
    from jdit.train.uncertainty import corrupt_tokens

    cfg, s = x.cfg, x.cfg["sample"]
    held = x.data.eval_set(cfg["eval_videos"], frames=cfg["eval_frames"], size=cfg["size"],
                           seed=int(cfg["seed"]), pair_fraction=cfg["pair_fraction"])
    ctx, cmask = (jnp.asarray(a) for a in x.encoder.encode(held["captions"]))
    null_ctx, null_mask = (jnp.asarray(a) for a in x.null)
    n, key = len(held["captions"]), jax.random.key(int(cfg["seed"]) + 7)
    scale = jnp.full((n,), float(s["guidance_scale"]))
    sampler = dict(num_steps=int(s["steps"]), shift=float(cfg["dit"]["shift"]),
                   solver=s["solver"])
    plain = segment_denoiser(x.apply_dit, **sampler)
    injected = segment_denoiser(x.apply_arlon, **sampler)
    frame = (cfg["size"], cfg["size"], 3)
    out: dict[str, Any] = {"ground_truth": evaluate(held["videos"], held["captions"])}

    def long_video(denoise: Any, p: Any, coarse: Any = None) -> np.ndarray:
        def conditions(i: int, start: int, stop: int) -> tuple[Any, ...]:
            plan = jnp.zeros((0,)) if coarse is None else coarse[:, start:stop]
            if coarse is not None and plan.shape[1] < stop - start:  # the last segment runs
                # past the video's end (its extra frames are dropped): its last plan frame held
                plan = jnp.pad(plan, ((0, 0), (0, stop - start - plan.shape[1]), (0, 0), (0, 0),
                                      (0, 0)), mode="edge")
            return (p, scale, ctx, cmask, null_ctx, null_mask, plan)
        return sample_long_video(denoise, frame, batch=n, total_frames=cfg["eval_frames"],
                                 segment_frames=cfg["clip_frames"],
                                 context_frames=cfg["context_frames"], key=key,
                                 conditions=conditions, trained_frames=cfg["clip_frames"],
                                 progress=True)

    def score(name: str, video: np.ndarray, t0: float) -> None:
        out[name] = {**evaluate(np.clip(video, -1, 1), held["captions"]),
                     "seconds": round(time.perf_counter() - t0, 1)}
        log(f"{name}: {out[name]}")

    t0 = time.perf_counter()
    score("a_chained", long_video(plain, params["dit"]), t0)

    a = cfg["ar"]
    tokens = x.prior.generate(params["ar"], ctx, cmask, int(np.prod(x.grid)),
                              jax.random.key(int(cfg["seed"]) + 11),
                              temperature=float(a["temperature"]), top_k=a["top_k"])
    corrupted = corrupt_tokens(jax.random.key(int(cfg["seed"]) + 13), tokens,
                               x.vq.codebook_size, float(cfg["corrupt_fraction"]))
    vq = {"params": params["vq"]}
    truth = x.vq.apply(vq, jnp.asarray(held["videos"]), method="encode")
    plans = {"b_arlon": tokens, "b20_arlon_corrupted": corrupted, "oracle_plan": truth}
    agree = float(jnp.mean(tokens.reshape(truth.shape) == truth))
    out["ar_tokens_equal_to_truth"] = agree
    for variant in ("inject", "inject_uncertainty"):
        for name, toks in plans.items():
            grid = tokens_to_grid(toks.reshape(n, -1), x.grid)
            check_tokens(np.asarray(grid), x.vq.codebook_size, x.grid)
            coarse = x.vq.apply(vq, grid, method="decode")
            t0 = time.perf_counter()
            score(f"{name}/{variant}", long_video(injected, params[variant], coarse), t0)
    return out


def judge(result: dict[str, Any], variant: str) -> dict[str, Any]:
    a, b = result["a_chained"], result[f"b_arlon/{variant}"]
    return {"identity_at_least_0.90": b["identity"] >= IDENTITY_BAR,
            "identity_margin_0.15": b["identity"] - a["identity"] >= IDENTITY_MARGIN,
            "trajectory_error_lower": b["trajectory_error"] < a["trajectory_error"],
            "baseline_degrades": a["identity"] < result["ground_truth"]["identity"] - 0.05}


def run(cfg: dict[str, Any] | None = None, workdir: str | Path | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    log = log or (lambda m: print(m, file=sys.stderr))
    cfg = copy.deepcopy(EXPERIMENT if cfg is None else cfg)
    root = Path(workdir) if workdir else None
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    x = Experiment(cfg)
    params, info = train_all(x, root, log)
    train_s = time.perf_counter() - start
    result = evaluate_all(x, params, log)
    claims = {v: judge(result, v) for v in ("inject", "inject_uncertainty")}
    return {"benchmark": "arlon", "config": cfg, "stages": info, "train_s": round(train_s, 1),
            "total_s": round(time.perf_counter() - start, 1), **result, "claim": claims,
            "claim_holds": any(all(c[k] for k in c if k != "baseline_degrades")
                               for c in claims.values())}


def _override(cfg: dict[str, Any], item: str) -> None:
    key, _, value = item.partition("=")
    node = cfg
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    if last not in node:
        raise ValueError(f"unknown experiment key {key!r}")
    node[last] = type(node[last])(json.loads(value)) if node[last] is not None else \
        json.loads(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an EXPERIMENT entry, e.g. --set dit.steps=600")
    parser.add_argument("--workdir", default=None,
                        help="keep each stage's parameters here; a re-run reuses them")


def main(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> int:
    cfg = copy.deepcopy(EXPERIMENT)
    for item in args.set:
        _override(cfg, item)
    result = run(cfg, args.workdir)
    emit(result)
    keys = ("identity", "identity_all", "count", "trajectory_error", "speed_ratio")
    for name, r in result.items():
        if isinstance(r, dict) and "identity" in r:
            print(f"{name:36s} " + "  ".join(f"{k} {r[k]:.3f}" for k in keys), file=sys.stderr)
    print(f"ARLON's claim {'holds' if result['claim_holds'] else 'does not hold'} at this scale: "
          f"{result['claim']}", file=sys.stderr)
    return 0
