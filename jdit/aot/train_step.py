"""``jdit aot --config``: compile a config's train step for a TPU pod, without the pod.

    jdit aot --config configs/pixart_sigma_xl2_1024.py --topology v5p:4x4x4 [--max-batch]

libtpu (the ``tpu`` extra) describes real TPU topologies on any machine; the train step that
:class:`jdit.train.loop.TrainSetup` builds (the one ``jdit train`` runs) is lowered with the run's
shardings and compiled for those devices (and optionally the sampler), and
:func:`jdit.aot.roofline.analyse` reads memory, costs and the roofline off the result.

The report compiles the blocks unrolled (``scan_layers=False``) unless told otherwise, so that
XLA's cost analysis counts every layer. The memory figures are those of the program as compiled.
Its costs are too, unless the TPU compiler turned FSDP gathers into collective matmul loops
(large batches): then they come from a recompile without them (``costs_from`` says which;
:func:`jdit.aot.roofline.loop_free_analysis`).

Video models (Latte, SANA-Video) train on their pipeline's clips (``pipeline.frames`` at
``resolution`` × ``width``; :mod:`jdit.aot.video`); with a ``context`` mesh axis their frames are
split over it, and the report says how (``frame_split``, ``examples_per_chip``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from jdit.aot.roofline import GiB, analyse, loop_free_analysis, oom_figures, topology_devices
from jdit.aot.video import frame_split, video_latents
from jdit.config import apply_overrides, complete, load_config, section

# What a config that holds only a model (e.g. configs/pixart_sigma_xl2_1024.py) is assumed to
# train with on a pod: bfloat16, full remat, the Pallas flash-attention kernel, AdamW, FSDP over
# every chip, 8 examples per chip. Applied to the file's config before command-line overrides
# (which therefore win), and reported under "assumed".
ASSUMED: dict[str, Any] = {
    "model": {"dtype": "bfloat16", "remat_policy": "full", "attention_impl": "pallas"},
    "diffusion": {"objective": "ddpm", "schedule": "linear"},
    "optim": {"name": "adamw", "lr": 2e-5, "weight_decay": 3e-2, "grad_clip": 0.01,
              "warmup_steps": 1000, "schedule": "constant"},
    "train": {"steps": 100_000, "seed": 0, "ema_decay": 0.9999, "cond_dropout": 0.1,
              "per_device_batch": 8},  # within the official recipes' per-GPU 2-12 at 1024
    "parallel": {"mesh": {"data": 1, "fsdp": -1, "tensor": 1}, "rules": "fsdp"},
}
DEFAULT_CAPTION_LENGTH = 300  # PixArt-Σ's and SANA's text length, when a config does not say


# families published as rectified-flow models: a model-only config trains with the flow objective
FLOW_FAMILIES = ("sana", "lumina2", "sana_video")


def with_defaults(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A training config from ``config`` as its file wrote it; the second value lists what was
    assumed (:data:`ASSUMED`). Flow models (SANA) are assumed to train with rectified flow at
    their pipeline's shift."""
    c = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.items()}
    if "model" not in c:
        raise ValueError("the config has no 'model' section")
    assumed: dict[str, Any] = {}
    model_only = "train" not in c
    for name, values in ASSUMED.items():
        if name == "model":
            if model_only:  # model presets say float32 / no remat: not how a pod trains
                c["model"].update(values)
                assumed["model"] = values
            continue
        if name not in c:
            c[name] = dict(values)
            if name == "diffusion" and c["model"].get("family") in FLOW_FAMILIES:
                shift = (c.get("pipeline") or {}).get("flow_shift") or 3.0
                c[name] = {"objective": "flow", "flow_shift": float(shift),
                           "timestep_sampler": "logit_normal"}
            assumed[name] = c[name]
    return c, assumed


def load(path: str, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """A config file as ``jdit aot`` compiles it, and what was assumed: :data:`ASSUMED` fills
    what the file leaves out, then the defaults of :mod:`jdit.config`, then the command line's
    overrides (so an override wins over an assumption, and is not reported as assumed)."""
    raw = load_config(path, fill_defaults=False)
    config, assumed = with_defaults(raw.to_dict())
    config = ml_collections.ConfigDict(complete(config))
    apply_overrides(config, overrides)
    config = complete(config)
    kept = {name: {k: v for k, v in values.items() if config[name].get(k) == v}
            for name, values in assumed.items()}
    return config, {name: values for name, values in kept.items() if values}


def example_batch(module: Any, batch: int, caption_length: int = DEFAULT_CAPTION_LENGTH,
                  pipeline: Mapping[str, Any] | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of a training batch for ``module``: images at its training size; a video model's
    (B, T, H, W, C) latents of the ``pipeline`` facts' clips (:func:`jdit.aot.video.
    video_latents`), checked against the model before anything compiles."""
    text = hasattr(module, "caption_channels")
    inputs = jax.eval_shape(lambda: module.example_inputs(
        batch, **({"caption_length": caption_length} if text else {})))
    out = {"images": inputs["x"]}
    if len(inputs["x"].shape) == 5:
        out["images"] = video_latents(module, inputs["x"], pipeline)
    for k in ("context", "context_mask", "resolution", "aspect_ratio", "labels"):
        if k in inputs:
            out[k] = inputs[k]
    if "context" not in inputs and "labels" not in inputs:
        out["labels"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return out


class CompiledStep(NamedTuple):
    """A config's train step compiled for a topology; ``compiled`` None (and ``error`` the
    compiler's message) when the compiler found it does not fit in HBM."""

    setup: Any  # jdit.train.loop.TrainSetup: config, module, partitioner
    devices: list[Any]
    batch: dict[str, jax.ShapeDtypeStruct]  # the global batch's shapes
    per_device_batch: int  # examples per batch shard (the mesh's data and fsdp axes)
    global_batch: int
    params: Any  # abstract parameters: the model's, or a LoRA step's frozen base
    lowered: Any
    compiled: Any
    error: str | None
    seconds: float
    assumed: dict[str, Any]  # what with_defaults assumed for this config


def compile_step(config: Mapping[str, Any], topology: str, per_device_batch: int | None = None,
                 *, caption_length: int | None = None, scan_layers: bool | None = False
                 ) -> CompiledStep:
    """Lower and compile the train step of ``config`` (:func:`with_defaults` fills a model-only
    one) for ``topology`` with the run's shardings; ``scan_layers`` None keeps the config's."""
    from jdit.train.loop import TrainSetup

    devices = topology_devices(topology)
    c, assumed = with_defaults(config)
    if scan_layers is not None:
        c["model"]["scan_layers"] = scan_layers
    setup = TrainSetup(c, devices)
    c, module, part = setup.config, setup.module, setup.partitioner
    if per_device_batch is None:
        per_device_batch = int(c["train"]["per_device_batch"] or max(
            1, int(c["train"].get("batch_size") or part.batch_shards) // part.batch_shards))
    global_batch = per_device_batch * part.batch_shards
    length = caption_length or (c.get("pipeline") or {}).get("caption_length")
    batch = example_batch(module, global_batch, length or DEFAULT_CAPTION_LENGTH,
                          c.get("pipeline"))
    null = None
    if "context" in batch:
        _, length, dim = batch["context"].shape
        null = (jnp.zeros((1, length, dim), jnp.float32), jnp.ones((1, length), jnp.int32))
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                              sharding=part.batch_sharding(len(v.shape)))
                      for k, v in batch.items()}
    abstract_state = setup.abstract_state()
    step = setup.jit_train_step(null, batch_shardings={k: v.sharding
                                                       for k, v in abstract_batch.items()})
    # a LoRA step also takes the frozen base (sharded like the model's parameters)
    frozen = () if setup.lora is None else (part.abstract_params(module),)
    t0 = time.perf_counter()
    lowered = compiled = error = None
    try:
        with part.activate():
            lowered = step.lower(abstract_state, abstract_batch, *frozen)
            compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        error = str(e)  # the compiler itself found that it does not fit in HBM
    return CompiledStep(setup, devices, batch, per_device_batch, global_batch,
                        frozen[0] if frozen else abstract_state.params, lowered, compiled, error,
                        time.perf_counter() - t0, assumed)


def report(config: Mapping[str, Any], topology: str, per_device_batch: int | None = None, *,
           caption_length: int | None = None, sampler: bool = False,
           scan_layers: bool | None = False, assumed: Mapping[str, Any] | None = None
           ) -> dict[str, Any]:
    """Compile the train step for ``topology`` (:func:`compile_step`) and report memory, costs
    and the roofline. ``assumed``: what :func:`load` assumed, for the report."""
    r = compile_step(config, topology, per_device_batch, caption_length=caption_length,
                     scan_layers=scan_layers)
    setup, devices, batch, lowered, compiled = r.setup, r.devices, r.batch, r.lowered, r.compiled
    c, module, part = setup.config, setup.module, setup.partitioner
    per_device_batch, global_batch, compile_seconds = r.per_device_batch, r.global_batch, r.seconds
    assumed = {**(assumed or {}), **r.assumed}
    if compiled is None:
        return {"topology": topology, "devices": len(devices), "per_device_batch": per_device_batch,
                "global_batch": global_batch, "fits": False, **oom_figures(r.error, devices[0]),
                "compile_seconds": round(compile_seconds, 1),
                "error": r.error.splitlines()[0][:500]}
    scanned = bool(c["model"].get("scan_layers"))
    if scanned:  # the scan over blocks is a loop whatever the compiler does: no recompile
        figures, loops = analyse(compiled, devices[0]), None
        costs_from = "as compiled: the scanned blocks counted once (scan_layers off counts all)"
    else:
        with part.activate():
            figures, loops, costs_from = loop_free_analysis(lowered, compiled, devices[0])
    image_tokens = _tokens(module, batch["images"].shape)
    out = {
        "topology": topology, "devices": len(devices), "device_kind": devices[0].device_kind,
        "mesh": {k: int(v) for k, v in part.mesh.shape.items()}, "rules": c["parallel"]["rules"],
        "per_device_batch": per_device_batch, "global_batch": global_batch,
        "tokens_per_example": image_tokens,
        "parameters": int(sum(math.prod(a.shape) for a in jax.tree.leaves(r.params))),
        "dtype": str(c["model"]["dtype"]), "remat_policy": c["model"]["remat_policy"],
        "scan_layers": bool(c["model"]["scan_layers"]), "optimizer": c["optim"]["name"],
        **figures, "costs_from": costs_from, "compile_seconds": round(compile_seconds, 1),
    }
    if loops is not None:
        out["while_loops"] = loops
    if len(batch["images"].shape) == 5:  # a video model: a batch shard may span chips
        out["latents_per_example"] = list(batch["images"].shape[1:])  # (T, H, W, C)
        out["examples_per_chip"] = global_batch / len(devices)
        out["frame_split"] = frame_split(batch["images"].shape[1], out["mesh"])
    if "context" in batch:
        out["caption_tokens_per_example"] = int(batch["context"].shape[1])
        if getattr(type(module), "JOINT_ATTENTION", False) and image_tokens is not None:
            # caption and image tokens attend as one sequence (Lumina2)
            out["sequence_tokens_per_example"] = image_tokens + out["caption_tokens_per_example"]
    if setup.lora is not None:  # what trains: the adapters, their moments and EMA
        out["lora"] = {**setup.lora.to_dict(), "trainable_parameters": int(sum(
            math.prod(a.shape) for a in jax.tree.leaves(setup.abstract_state().params)))}
    if assumed:
        out["assumed"] = assumed
    if sampler:
        out["sampler"] = sampler_report(module, part, c, r.params, batch)
    return out


def _tokens(module: Any, shape: Sequence[int]) -> int | None:
    """Tokens of one example of latents ``shape``: (B, H, W, C), or (B, T, H, W, C) video
    (every frame's, after temporal patching)."""
    patch = getattr(module, "patch_size", None)
    if patch is None:
        return None
    tokens = (shape[-3] // patch) * (shape[-2] // patch)
    if len(shape) == 5:
        tokens *= shape[1] // getattr(module, "temporal_patch_size", 1)
    return tokens


def sampler_report(module: Any, part: Any, c: Mapping[str, Any], abstract_params: Any,
                   batch: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, Any]:
    """Compile the CFG sampler of the ``sample`` config section for the same mesh."""
    from jdit.diffusion import make_schedule
    from jdit.sampling import ClassifierFreeGuidance, sample

    schedule = make_schedule(c["diffusion"])
    sc = section("sample", c.get("sample"))
    images = batch["images"]
    b = images.shape[0]
    text = "context" in batch

    def model_fn(x, t, params, *cond):
        if text:
            return module.apply({"params": params}, x, t, context=cond[0], context_mask=cond[1])
        return module.apply({"params": params}, x, t, labels=cond[0])

    guided = ClassifierFreeGuidance(model_fn)
    prediction = "flow" if section("diffusion", c["diffusion"])["objective"] == "flow" else "epsilon"
    steps = int(sc["steps"])

    def run(params, noise, *cond):
        cond2 = tuple(jnp.concatenate([x, x]) for x in cond)  # null half: the same shapes
        return sample(guided, noise, solver=sc["solver"], num_steps=steps, schedule=schedule,
                      prediction=prediction, args=(jnp.float32(4.5), params) + cond2)

    keys = ("context", "context_mask") if text else ("labels",)
    cond = [jax.ShapeDtypeStruct(batch[k].shape, batch[k].dtype,
                                 sharding=part.batch_sharding(len(batch[k].shape))) for k in keys]
    noise = jax.ShapeDtypeStruct(images.shape, jnp.float32,
                                 sharding=part.batch_sharding(len(images.shape)))
    t0 = time.perf_counter()
    with part.activate():
        compiled = jax.jit(run).lower(abstract_params, noise, *cond).compile()
    seconds = time.perf_counter() - t0
    out = analyse(compiled, part.mesh.devices.flat[0])
    # The solver loop is a while loop: its cost is counted once; scale to all steps.
    for k in ("flops_per_step", "bytes_per_step"):
        out[k.replace("_per_step", "_per_image_batch")] = out.pop(k) * steps
    out.update(batch=b, num_steps=steps, compile_seconds=round(seconds, 1))
    return out


def max_batch(config: Mapping[str, Any], topology: str, *, start: int = 1, limit: int = 4096,
              **kwargs: Any) -> dict[str, Any]:
    """The largest per-device batch whose train step fits in HBM.

    Memory grows linearly with the batch, so two compiles (``start`` and ``2 * start``) predict
    the answer; compiles at and next to the prediction confirm it (about four compiles where
    bisection needs eight or more, and each compile of an XL model for a pod takes minutes).
    """
    tried: list[dict[str, Any]] = []
    results: dict[int, dict[str, Any]] = {}

    def fits(b: int) -> bool:
        if b not in results:
            r = report(config, topology, b, **kwargs)
            results[b] = r
            need = r["hbm_per_device_bytes"]
            print(f"  per-device batch {b}: "
                  f"{'?' if need is None else f'{need / GiB:.2f}'} GiB "
                  f"({'fits' if r['fits'] else 'does not fit'}; compiled in "
                  f"{r.get('compile_seconds', 0):.0f} s)", file=sys.stderr, flush=True)
            tried.append({"per_device_batch": b, "fits": r["fits"],
                          "hbm": r["hbm_per_device_bytes"]})
        return bool(results[b]["fits"])

    b = max(1, min(start, limit))
    while not fits(b):
        if b == 1:
            need = results[1]["hbm_per_device_bytes"]
            raise ValueError(f"not even a per-device batch of 1 fits on {topology}"
                             + ("" if need is None else f": {need / GiB:.1f} GiB needed"))
        b //= 2
    lo, hi = b, None  # lo fits; hi (if known) does not
    if b < limit:
        b2 = min(2 * b, limit)
        if fits(b2):
            h1, h2 = results[b]["hbm_per_device_bytes"], results[b2]["hbm_per_device_bytes"]  # fit: known
            per_example = (h2 - h1) / (b2 - b)
            cap = results[b]["hbm_capacity_bytes"]
            guess = limit if per_example <= 0 else b + int((cap - h1) // per_example)
            lo, guess = b2, max(b2, min(guess, limit))
            if guess > lo and not fits(guess):
                hi, step = guess, 1  # just over: gallop downwards from the prediction
                while hi - step > lo and not fits(hi - step):
                    hi, step = hi - step, step * 2
                if hi - step > lo:
                    lo = hi - step
            else:
                lo, step = guess, 1  # it fitted: gallop upwards until something does not
                while hi is None and lo + step <= limit:
                    if fits(lo + step):
                        lo, step = lo + step, step * 2
                    else:
                        hi = lo + step
        else:
            hi = b2
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    b = lo
    return {**results[b], "max_per_device_batch": b, "search": tried}
