"""The train state and ``train_step``: one pure function, jitted once.

A batch is a dict: ``images`` (B, H, W, C) in the model's input space (pixels in [-1, 1] or VAE
latents; video latents (B, T, H, W, C): nothing here depends on the rank), and either ``context`` (B, L, D) + ``context_mask`` (B, L) for text-conditioned models
or ``labels`` (B,) for class-conditioned ones. The ``diffusion``, ``train`` and ``distill``
config sections choose the objective and the step (keys and defaults: :mod:`jdit.config`).

Distillation (LiT, ``jdit.models.lit``): with a frozen ``teacher = (module, params)`` the loss
gains ``output_weight · ‖out_T − out_S‖²`` on the prediction (ε, or the flow velocity) and, for
learned-sigma models, ``variance_weight · ‖v_T − v_S‖²`` on the variance channels (LiT's best:
0.5 and 0.05), both means over pixels, on the same noisy input and condition.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from jdit.config import section
from jdit.diffusion import (
    FlowSchedule,
    diffusion_loss,
    flow_loss,
    learned_sigma_loss,
    make_schedule,
    sample_ddpm_timesteps,
    sample_flow_sigmas,
)
from jdit.nn.init import init_params

Array = jax.Array
Batch = dict[str, Array]


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue bit-exactly: parameters, optimizer state, the EMA
    parameters, the step and the RNG key (raw uint32 key data, so it checkpoints plainly)."""

    step: Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: Array


def init_state(module: nn.Module, tx: optax.GradientTransformation, seed: int) -> TrainState:
    init_rng, rng = jax.random.split(jax.random.PRNGKey(seed))
    params = init_params(module, init_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree.map(jnp.copy, params), rng=rng)


def _conditioning(module: nn.Module, batch: Batch, drop: Array,
                  null: tuple[Array, Array] | None) -> dict[str, Array]:
    """Model keyword arguments, with dropped examples replaced by the null condition."""
    if "labels" in batch:
        return {"labels": jnp.where(drop, module.num_classes, batch["labels"])}
    ctx, mask = batch["context"], batch["context_mask"]
    if null is not None:
        d = drop[:, None, None]
        ctx = jnp.where(d, null[0], ctx)
        mask = jnp.where(drop[:, None], null[1], mask)
    micro = {k: batch[k] for k in ("resolution", "aspect_ratio") if k in batch}
    return {"context": ctx, "context_mask": mask, **micro}


Teacher = tuple[nn.Module, Any]


def _distill_losses(out: Array, target: Array, channels: int, distill: Mapping[str, Any]
                    ) -> Array:
    """Per-example teacher terms; ``channels`` is the image's (the prediction's first part)."""
    def mse(a: Array, b: Array) -> Array:
        return jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))

    target = jax.lax.stop_gradient(target)
    losses = float(distill["output_weight"]) * mse(out[..., :channels], target[..., :channels])
    if out.shape[-1] > channels:  # learned sigma: the variance interpolation channels
        losses += float(distill["variance_weight"]) * mse(out[..., channels:],
                                                           target[..., channels:])
    return losses


def make_loss_fn(module: nn.Module, diffusion: Mapping[str, Any], cond_dropout: float,
                 null: tuple[Array, Array] | None, teacher: Teacher | None = None,
                 distill: Mapping[str, Any] | None = None
                 ) -> Callable[[Any, Batch, Array], Array]:
    diffusion, distill = section("diffusion", diffusion), section("distill", distill)
    schedule = make_schedule(diffusion)
    weighting = diffusion["weighting"]

    def taught(losses: Array, out: Array, x_t: Array, t: Array, x0: Array,
               cond: dict[str, Array]) -> Array:
        if teacher is None:
            return losses
        target = teacher[0].apply({"params": teacher[1]}, x_t, t, **cond)
        return losses + _distill_losses(out, target, x0.shape[-1], distill)

    def loss_fn(params: Any, batch: Batch, rng: Array, rngs: dict[str, Array] | None = None,
                model_kwargs: dict[str, Any] | None = None) -> Array:
        """``model_kwargs``: more inputs of the model (a control condition's cache)."""
        x0 = batch["images"].astype(jnp.float32)
        b = x0.shape[0]
        rng_t, rng_n, rng_d = jax.random.split(rng, 3)
        noise = jax.random.normal(rng_n, x0.shape)
        drop = jax.random.uniform(rng_d, (b,)) < cond_dropout
        if "keep_caption" in batch:  # rows whose caption says what their condition leaves out
            drop = drop & ~batch["keep_caption"]
        cond = {**_conditioning(module, batch, drop, null), **(model_kwargs or {})}
        if isinstance(schedule, FlowSchedule):
            sigma = sample_flow_sigmas(
                rng_t, b, diffusion["timestep_sampler"], mean=float(diffusion["logit_mean"]),
                std=float(diffusion["logit_std"]), mode_scale=float(diffusion["mode_scale"]))
            sigma = schedule.shift_sigma(sigma)
            x_t = schedule.add_noise(x0, noise, sigma)
            t = sigma * schedule.num_train_timesteps
            out = module.apply({"params": params}, x_t, t, rngs=rngs, **cond)
            losses = taught(flow_loss(out, x0, noise, sigma, weighting), out, x_t, t, x0, cond)
        else:
            t = sample_ddpm_timesteps(rng_t, b, schedule.num_train_timesteps)
            x_t = schedule.add_noise(x0, noise, t)
            out = module.apply({"params": params}, x_t, t.astype(jnp.float32), rngs=rngs,
                               **cond)
            if out.shape[-1] == 2 * x0.shape[-1]:
                losses = learned_sigma_loss(out, x0, noise, t, schedule)
            else:
                losses = diffusion_loss(out, x0, noise, t, schedule,
                                        prediction=diffusion["prediction"], weighting=weighting,
                                        snr_gamma=float(diffusion["snr_gamma"]))
            losses = taught(losses, out, x_t, t.astype(jnp.float32), x0, cond)
        if "loss_weight" in batch:  # prior preservation: per-row weights whose mean is the loss
            losses = losses * batch["loss_weight"]
        return jnp.mean(losses)

    return loss_fn


def lora_loss(loss_fn: Callable[..., Array], dropout: float, merged: bool = False
              ) -> Callable[..., Array]:
    """``loss_fn`` of the adapters: ``(adapters, batch, rng, base)`` with the adapters beside
    the frozen ``base`` (unmerged: no full-size delta), LoRA dropout on their inputs.
    ``merged``: ``W + s·A·B`` formed once per step instead (gradients flow through it): for
    small models, where the adapters' per-token products cost more than the merge (on a CPU
    the shapes recipe's step takes 300 ms merged, 470 ms unmerged; BENCHMARKS.md)."""
    from jdit import lora
    from jdit.nn.layers import lora_dropout

    if merged and dropout > 0.0:
        raise ValueError("lora.dropout needs the unmerged adapters (lora.merged=False)")

    def loss(adapters: Any, batch: Batch, rng: Array, base: Any) -> Array:
        if merged:
            return loss_fn(lora.merge(jax.lax.stop_gradient(base), adapters), batch, rng)
        params = lora.apply(jax.lax.stop_gradient(base), adapters)
        if dropout <= 0.0:
            return loss_fn(params, batch, rng)
        with lora_dropout(dropout):  # its own key: the other draws stay those of a plain run
            return loss_fn(params, batch, rng, rngs={"lora_dropout": jax.random.fold_in(rng, 7)})

    return loss


def control_loss(loss_fn: Callable[..., Array], module: nn.Module, scale: float,
                 merged: bool = False) -> Callable[..., Array]:
    """``loss_fn`` of a condition LoRA (EasyControl, :mod:`jdit.control`):
    ``(adapters, batch, rng, base)``; the batch's ``condition`` runs through the condition branch
    with the adapters, the image branch with the frozen ``base``, in one differentiated
    program."""
    from jdit import control

    def loss(adapters: Any, batch: Batch, rng: Array, base: Any) -> Array:
        base = jax.lax.stop_gradient(base)
        cache = control.encode(module, base, control.Condition(batch["condition"], adapters,
                                                               scale), merged=merged)
        return loss_fn(base, batch, rng, model_kwargs={"control": cache})

    return loss


def controlnet_loss(module: nn.Module, controlnet: nn.Module, diffusion: Mapping[str, Any],
                    cond_dropout: float, null: tuple[Array, Array] | None, scale: float
                    ) -> Callable[..., Array]:
    """``loss(controlnet_params, batch, rng, base)`` of a ControlNet over a frozen base: the
    batch's ``condition`` goes to the ControlNet at every noised input, its residuals into the
    base, in one differentiated program (gradients for the ControlNet only)."""
    from jdit.control.controlnet import Controlled

    loss_fn = make_loss_fn(Controlled(module, controlnet, scale), diffusion, cond_dropout, null)

    def loss(params: Any, batch: Batch, rng: Array, base: Any) -> Array:
        both = {"base": jax.lax.stop_gradient(base), "controlnet": params}
        return loss_fn(both, batch, rng, model_kwargs={"condition": batch["condition"]})

    return loss


def make_train_step(module: nn.Module, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, cfg: Mapping[str, Any],
                    null: tuple[Array, Array] | None = None, teacher: Teacher | None = None,
                    controlnet: nn.Module | None = None
                    ) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """``cfg`` is the whole config (``diffusion``, ``train``, ``distill`` and ``lora`` sections
    are read). With ``lora.rank > 0`` the state's parameters are LoRA adapters and the step is
    ``train_step(state, batch, base)``: the frozen base gets no gradient or optimizer state.

    ``train.accumulate`` splits the batch into that many micro-batches whose gradients are
    averaged (one optimizer step); ``train.ema_decay`` with ``train.ema_warmup`` uses
    ``min(decay, (1 + step) / (10 + step))``. A step whose loss, gradient norm or new parameters
    are not finite leaves the state as it was (but for ``step`` and ``rng``) and reports
    ``finite=False`` in its metrics.
    """
    train = section("train", cfg["train"])
    distill = section("distill", cfg.get("distill"))
    consistency = distill["method"] in ("consistency", "scm")
    if distill["method"] not in ("output", "consistency", "scm"):
        raise ValueError(f"distill.method must be 'output', 'consistency' or 'scm', got "
                         f"{distill['method']!r}")
    if consistency:
        from jdit.train.consistency import make_consistency_loss, make_scm_loss

        if teacher is None:
            raise ValueError(f"distill.method={distill['method']!r} needs a teacher "
                             "(distill.teacher)")
        make = make_scm_loss if distill["method"] == "scm" else make_consistency_loss
        loss_fn = make(module, teacher, cfg["diffusion"], distill, null)
    else:
        loss_fn = make_loss_fn(module, cfg["diffusion"], float(train["cond_dropout"]), null,
                               teacher, distill)
    lora_cfg = section("lora", cfg.get("lora"))
    control_cfg = section("control", cfg.get("control"))
    if control_cfg["method"] == "easycontrol":
        if int(lora_cfg["rank"]) <= 0 or float(lora_cfg["dropout"]) > 0.0:
            raise ValueError("control.method='easycontrol' trains a condition LoRA: set "
                             "lora.rank > 0 (and lora.dropout 0)")
        loss_fn = control_loss(loss_fn, module, float(control_cfg["scale"]),
                               bool(lora_cfg["merged"]))
    elif control_cfg["method"] == "controlnet":
        if controlnet is None or int(lora_cfg["rank"]) > 0:
            raise ValueError("control.method='controlnet' trains a ControlNet (pass it) and no "
                             "LoRA (lora.rank 0)")
        loss_fn = controlnet_loss(module, controlnet, cfg["diffusion"],
                                  float(train["cond_dropout"]), null, float(control_cfg["scale"]))
    elif int(lora_cfg["rank"]) > 0:
        if consistency:
            raise ValueError("consistency distillation trains every weight (lora.rank 0)")
        loss_fn = lora_loss(loss_fn, float(lora_cfg["dropout"]), bool(lora_cfg["merged"]))
    grad_fn = jax.value_and_grad(loss_fn)
    accumulate = int(train["accumulate"])
    decay = float(train["ema_decay"])
    ema_warmup = bool(train["ema_warmup"])

    def train_step(state: TrainState, batch: Batch, *base: Any
                   ) -> tuple[TrainState, dict[str, Array]]:
        rng, step_rng = jax.random.split(state.rng)
        if consistency:  # the target network (the EMA of the student) and the step
            base = (state.ema_params, state.step)
        if accumulate == 1:
            loss, grads = grad_fn(state.params, batch, step_rng, *base)
        else:
            micro = jax.tree.map(
                lambda a: a.reshape((accumulate, a.shape[0] // accumulate) + a.shape[1:]), batch)
            keys = jax.random.split(step_rng, accumulate)

            def one(carry: tuple[Array, Any], xs: tuple[Batch, Array]) -> tuple[tuple[Array, Any], None]:
                loss, grads = grad_fn(state.params, *xs, *base)
                return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss, grads), _ = jax.lax.scan(one, (jnp.zeros(()), zeros), (micro, keys))
            loss, grads = loss / accumulate, jax.tree.map(lambda g: g / accumulate, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = jnp.minimum(decay, (1.0 + state.step) / (10.0 + state.step)) if ema_warmup else decay
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & \
            jnp.isfinite(optax.tree.norm(params))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(state.step),
                   "finite": finite}
        updated = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                ema_params=ema, rng=rng)
        # A non-finite loss, gradient or result changes nothing but the step and the key: the
        # state stays the last good one, whatever the loop then decides (stop, or skip on).
        kept = state.replace(step=state.step + 1, rng=rng)
        return jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, kept), metrics

    return train_step
