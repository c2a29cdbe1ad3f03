"""Config files, their sections and every default, in one place.

A config file is a Python module with ``get_config() -> ml_collections.ConfigDict``.
``load_config("configs/shapes_tiny.py", ["train.steps=100"])`` imports it, fills in the defaults of
every section below that the file leaves out, then applies ``--config.key=value``-style
overrides (values parsed as Python literals, else strings). So a field the file does not name
can still be set on the command line, and a misspelt key fails before anything is compiled,
with the valid keys listed. As in big_vision, ``path.py:arg`` passes ``arg`` to
``get_config(arg)``: one file holds the stages of a recipe (``configs/recipes/pixart_sigma.py:1024``).

Sections of a training config (``train`` present): ``model`` (a registry family and its fields:
:func:`jdit.models.registry.field_names`; the defaults are the model classes'), ``data`` (a task:
``DATA``), ``diffusion``, ``optim``, ``train``, ``sample``, ``distill`` (``SECTIONS``) and
``parallel`` (:data:`jdit.parallel.partition.PARALLEL_DEFAULTS`). An architecture config holds
``model`` and ``pipeline``. Keys marked ``REQUIRED`` have no default and must be set.
"""

from __future__ import annotations

import ast
import importlib.util
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

REQUIRED = "<required>"  # a key without a default: the config (or the command line) must set it

SECTIONS: dict[str, dict[str, Any]] = {
    # The noise process and the training objective (jdit.diffusion). ddpm: ``schedule``
    # (linear | scaled_linear | squaredcos_cap_v2), ``prediction`` (epsilon | v | sample),
    # ``weighting`` (None | min_snr) with ``snr_gamma``; a learned-sigma model trains with
    # PixArt's hybrid loss. flow: ``flow_shift``, ``timestep_sampler`` (uniform | logit_normal |
    # mode | cosmap) with ``logit_mean`` / ``logit_std`` / ``mode_scale``, ``weighting``
    # (None | sigma_sqrt | cosmap).
    "diffusion": dict(objective="ddpm", schedule="linear", prediction="epsilon", weighting=None,
                      snr_gamma=5.0, flow_shift=1.0, timestep_sampler="logit_normal",
                      logit_mean=0.0, logit_std=1.0, mode_scale=1.29),
    # Optimizer and learning rate (jdit.train.optim): ``name`` adamw | came; linear warm-up from
    # 0, then ``schedule`` constant | cosine (down to ``end_lr_factor`` x lr); ``grad_clip`` is a
    # global norm (0 disables). CAME keeps PixArt-Σ's betas and eps.
    "optim": dict(name="adamw", lr=REQUIRED, warmup_steps=0, schedule="constant",
                  end_lr_factor=0.0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=0.0),
    # The loop (jdit.train.loop, jdit.train.step). ``accumulate`` micro-batches per optimizer
    # step; EMA decay ``min(ema_decay, (1 + step) / (10 + step))`` with ``ema_warmup``;
    # ``init_from`` a previous stage's workdir or any checkpoint from_pretrained reads;
    # ``per_device_batch`` is what ``jdit aot`` compiles for (None: batch_size / batch shards).
    # ``nonfinite``: what a step with a NaN / inf loss, gradient or result does: "stop" the run
    # (exit non-zero, checkpoints intact) or "skip" it (counted as ``skipped_steps``).
    # ``prior_*``: DreamBooth's prior preservation (jdit.train.prior): ``prior_images`` samples
    # of the base for ``prior_prompts``, ``prior_batch`` rows of each batch (0: a quarter),
    # their mean loss weighted ``prior_weight``.
    "train": dict(steps=REQUIRED, batch_size=REQUIRED, seed=0, cond_dropout=0.1, accumulate=1,
                  ema_decay=0.9999, ema_warmup=True, init_from="", log_every=50, sample_every=0,
                  checkpoint_every=500, keep_checkpoints=3, async_checkpoints=True,
                  per_device_batch=None, nonfinite="stop", prior_prompts=[], prior_images=0,
                  prior_batch=0, prior_weight=1.0),
    # Sample grids and ``jdit sample`` / ``jdit eval`` of a trained run (jdit.train.generate).
    "sample": dict(solver="dpm++2m", steps=20, guidance_scale=4.5),
    # Distillation from a frozen teacher workdir (no teacher: none). ``method`` "output" (LiT,
    # jdit.models.lit): ``inherit`` starts the student from its weights (``load_attention`` also
    # copies the self-attention where shapes agree); the loss gains output_weight x
    # |out_T - out_S|^2 (+ variance_weight on learned-sigma channels). "consistency" (LCM,
    # jdit.train.consistency): a few-step student on a grid of grid_steps noise levels, the
    # teacher guided at guidance_scale, pseudo-Huber distance huber_c, the EMA as the target
    # (start it from the teacher with train.init_from). "scm" (sCM in TrigFlow time, as
    # SANA-Sprint; flow teachers): sigma_data, τ = arctan(σ / sigma_data) with σ log-normal
    # (p_mean, p_std), the tangent's second term warming up over tangent_warmup steps.
    "distill": dict(teacher="", method="output", inherit=False, load_attention=False,
                    output_weight=0.5, variance_weight=0.05, guidance_scale=3.0, grid_steps=50,
                    huber_c=0.001, sigma_data=0.5, p_mean=-0.8, p_std=1.6, tangent_warmup=100),
    # LoRA (jdit.lora): ``rank`` 0 trains every weight; above 0 only low-rank adapters on the
    # Dense kernels ``targets`` select (names of jdit.lora.TARGETS or path regexes) are trained,
    # over the frozen base of ``train.init_from``; ``alpha`` None means ``rank`` (scale 1).
    # ``merged``: train through W + s·A·B formed once per step (small models on a CPU) instead
    # of the unmerged per-token products. ``lr_ratio``: LoRA+, B's learning rate that many
    # times A's.
    "lora": dict(rank=0, alpha=None, targets=["attention", "cross_attention"], dropout=0.0,
                 merged=False, lr_ratio=1.0),
    # Spatial control (jdit.control). ``easycontrol``: the ``lora`` section's adapters are a
    # condition LoRA, acting only in the condition branch (targets: "attention"); the data
    # gives each image its condition (shapes: ``data.condition``); ``scale`` is its weight.
    # ``guess_mode``: sampling guidance without the condition in the unconditional half;
    # ``attend_each_other``: sampling with several conditions whose tokens see each other
    # (not EasyControl's pattern; for comparison, jdit.control.encode).
    # ``method="controlnet"``: a PixArt-δ ControlNet of ``controlnet_depth`` copied blocks
    # (0: half the base's) trained over the frozen base (jdit.models.PixArtControlNet).
    "control": dict(method="none", scale=1.0, guess_mode=False, attend_each_other=False,
                    controlnet_depth=0),
    # Facts of a published architecture's pipeline (architecture configs; jdit aot reads them).
    # ``frames``: video frames per clip of a video model (None: an image model); ``width``: the
    # image width when it is not ``resolution`` (SANA-Video: 480x832); ``vae_time_factor``: a
    # video VAE's downsampling in time (Wan: 4, the first frame alone).
    "pipeline": dict(resolution=REQUIRED, vae_factor=8, latent_scale=REQUIRED,
                     caption_length=None, flow_shift=None, frames=None, width=None,
                     vae_time_factor=None),
}
# The ``data`` section, by ``data.name`` (jdit.train.tasks).
DATA: dict[str, dict[str, Any]] = {
    # Embedded captioned shapes; a word-level text encoder of ``text_dim`` channels.
    # ``concepts="new"``: a ``new_fraction`` of the examples show a colour or shape the base
    # vocabulary lacks (purple, diamond; jdit.data.shapes), evaluated as ``adherence_new``.
    # ``condition``: "silhouette" or "outline" gives every image its control condition;
    # ``partial_condition``: the share of two-object images whose condition shows one object
    # (their captions are kept: what lets condition LoRAs trained apart compose);
    # ``condition_size``: the conditions' side (0: the image's), area-averaged from the image's.
    # ``text_encoders``: LLM prompt encoders instead of the word-level one (LI-DiT): a list of
    # dicts with ``path`` (a transformers folder with its tokenizer.json), ``max_length``,
    # ``hidden_layer``, ``instruction`` (jdit.pipelines.encoders.text_encoders).
    "shapes": dict(name="shapes", size=32, pair_fraction=0.5, text_dim=64, max_length=16,
                   concepts="base", new_fraction=0.5, condition=None,
                   partial_condition=0.0, condition_size=0, text_encoders=None),
    # Embedded handwritten digits, class-conditional.
    "digits": dict(name="digits", size=32),
    # Pre-computed VAE latents + text features (jdit.data.cache). ``latent_scale``: SD VAE
    # 0.18215, SDXL 0.13025; ``null_caption``: the encoded empty prompt (default
    # ``<path>/null_caption.safetensors``); ``micro_condition``: PixArt-α 1024's size inputs;
    # ``shuffle``: False reads each bucket in the cache's order (a cache written pre-shuffled,
    # or an export replayed exactly as a run saw it).
    "feature_cache": dict(name="feature_cache", path=REQUIRED, latent_scale=1.0, null_caption="",
                          micro_condition=False, vae_factor=8, shuffle=True),
}
TRAINING_SECTIONS = ("model", "data", "diffusion", "optim", "train", "sample", "parallel",
                     "distill", "lora", "control")


def _model_defaults(values: Mapping[str, Any]) -> dict[str, Any] | None:
    from jdit.models import registry

    family = values.get("family")
    if family is None:
        return None  # build() says what is missing
    return {"family": family, **registry.field_defaults(family)}


def _data_defaults(values: Mapping[str, Any]) -> dict[str, Any] | None:
    name = values.get("name")
    if name is None:
        return None
    if name not in DATA:
        raise ValueError(f"data.name must be one of {sorted(DATA)}, got {name!r}")
    return DATA[name]


def _parallel_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
    from jdit.parallel.partition import PARALLEL_DEFAULTS

    return PARALLEL_DEFAULTS


def defaults(section: str, values: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Every key of ``section`` with its default (``REQUIRED`` where there is none); None when
    the section's keys depend on a value it lacks (``model.family``, ``data.name``)."""
    values = values or {}
    if section == "model":
        return _model_defaults(values)
    if section == "data":
        return _data_defaults(values)
    if section == "parallel":
        return _parallel_defaults(values)
    if section not in SECTIONS:
        raise ValueError(f"unknown config section {section!r}; sections: "
                         f"{sorted(set(SECTIONS) | {'model', 'data', 'parallel'})}")
    return SECTIONS[section]


def section(name: str, values: Mapping[str, Any] | None) -> dict[str, Any]:
    """``values`` with the section's defaults filled in; unknown keys are refused, naming the
    valid ones. ``REQUIRED`` keys stay absent unless given."""
    values = dict(values or {})
    table = defaults(name, values)
    if table is None:
        return values
    unknown = sorted(set(values) - set(table))
    if unknown:
        raise ValueError(f"unknown config keys {[f'{name}.{k}' for k in unknown]}; valid keys of "
                         f"'{name}': {sorted(table)}")
    return {**{k: v for k, v in table.items() if v != REQUIRED}, **values}


def complete(config: Mapping[str, Any]) -> dict[str, Any]:
    """Every section of ``config`` with its defaults; a training config (one with ``train``)
    also gains the sections it leaves out. Idempotent."""
    plain = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    unknown = sorted(set(plain) - set(TRAINING_SECTIONS) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; expected some of "
                         f"{sorted(set(TRAINING_SECTIONS) | set(SECTIONS))}")
    names = list(plain)
    if "train" in plain:
        names += [s for s in TRAINING_SECTIONS if s not in plain and s not in ("model", "data")]
    return {name: section(name, plain.get(name)) for name in names}


def required(config: Mapping[str, Any], keys: Sequence[str] | None = None) -> None:
    """Refuse a config whose ``REQUIRED`` keys (or those of ``keys``, e.g. ``["train.steps"]``)
    are unset, naming them all."""
    missing = [f"{name}.{k}" for name, values in config.items() if isinstance(values, Mapping)
               for k, v in (defaults(name, values) or {}).items()
               if v == REQUIRED and values.get(k) in (None, "")]
    if keys is not None:
        missing = [k for k in missing if k in keys]
    if missing:
        raise ValueError(f"config keys {missing} must be set (in the config file or as "
                         "--config.KEY=VALUE)")


# What a value must be, checked before anything is built: the bound is inclusive ("> 0" keys
# must be at least 1 when integers). A key a config does not have is not checked.
_POSITIVE_INT = ("train.steps", "train.batch_size", "train.log_every", "train.accumulate",
                 "train.keep_checkpoints", "sample.steps", "model.hidden_size", "model.depth",
                 "model.num_heads", "model.patch_size", "model.input_size", "data.size",
                 "data.text_dim", "data.max_length", "pipeline.resolution", "pipeline.vae_factor")
_NON_NEGATIVE_INT = ("lora.rank", "train.prior_images", "train.prior_batch", "train.sample_every", "train.checkpoint_every", "train.seed",
                     "optim.warmup_steps")
_POSITIVE = ("optim.lr", "model.mlp_ratio", "lora.lr_ratio")
_NON_NEGATIVE = ("train.prior_weight", "optim.weight_decay", "optim.grad_clip", "sample.guidance_scale",
                 "diffusion.flow_shift", "train.ema_decay")
_CHOICES = {"train.nonfinite": ("stop", "skip"), "data.concepts": ("base", "new"),
            "control.method": ("none", "easycontrol", "controlnet")}
_UINT64 = 2 ** 64


def check_values(config: Mapping[str, Any]) -> None:
    """Refuse counts, sizes and rates that cannot work (a zero batch, a negative step count, a
    seed beyond 64 bits, a non-finite rate), naming the key and what was expected, before
    anything is compiled or written. Unset (required) keys are :func:`required`'s to report."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    problems = []
    for keys, integer, low, strict in ((_POSITIVE_INT, True, 0, True),
                                       (_NON_NEGATIVE_INT, True, 0, False),
                                       (_POSITIVE, False, 0, True), (_NON_NEGATIVE, False, 0, False)):
        for key in keys:
            name, _, field = key.partition(".")
            values = config.get(name)
            if not isinstance(values, Mapping) or values.get(field) in (None, REQUIRED, ""):
                continue
            value = values[field]
            kind = "an integer" if integer else "a number"
            bound = "> 0" if strict else ">= 0"
            ok = isinstance(value, int | float) and not isinstance(value, bool) and \
                math.isfinite(value) and (value > low if strict else value >= low) and \
                (not integer or float(value).is_integer())
            if not ok:
                problems.append(f"{key} must be {kind} {bound}, got {value!r}")
    for key, choices in _CHOICES.items():
        name, _, field = key.partition(".")
        value = (config.get(name) or {}).get(field)
        if value is not None and value not in choices:
            problems.append(f"{key} must be one of {list(choices)}, got {value!r}")
    seed = (config.get("train") or {}).get("seed")
    if isinstance(seed, int) and seed >= _UINT64:
        problems.append(f"train.seed must fit in 64 bits (< 2**64), got {seed}")
    if problems:
        raise ValueError("; ".join(problems))


def parse_value(value: str) -> Any:
    """A Python literal (``3``, ``1e-4``, ``(2, 2)``, ``None``), ``nan`` / ``inf`` as floats, or
    else the string itself."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        if value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            return float(value)
        return value


# Mappings whose keys are free but known (not sections with defaults).
_OPEN_KEYS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("parallel", "mesh"): ("data", "fsdp", "tensor", "context"),
}


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Apply ``key.subkey=value`` overrides in place; unknown keys are refused."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key.subkey=value")
        *parents, leaf = key.strip().split(".")
        node = config
        for i, part in enumerate(parents):
            if part not in node:
                raise ValueError(f"unknown config key {'.'.join(parents[: i + 1])!r}; keys here: "
                                 f"{sorted(node.keys())}")
            node = node[part]
        if leaf not in node and leaf not in _OPEN_KEYS.get(tuple(parents), ()):
            raise ValueError(f"unknown config key {key!r}; keys here: {sorted(node.keys())}")
        value = parse_value(raw)
        current = node.get(leaf)
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            node[leaf] = value
        except TypeError:  # ml_collections keeps a field's type: say which key and what it wanted
            raise ValueError(f"config key {key.strip()!r} must be of type {type(current).__name__} "
                             f"(like {current!r}), got {value!r}") from None


def load_config(path: str | Path, overrides: Sequence[str] = (), *,
                fill_defaults: bool = True) -> ml_collections.ConfigDict:
    """The config of a file (``path.py`` or ``path.py:arg``), defaults filled, overrides applied.

    ``fill_defaults=False`` returns the file's config as written (overrides still apply)."""
    arg = None
    text = str(path)
    if not Path(text).is_file() and ".py:" in text:  # the argument may be a path itself
        text, _, arg = text.partition(".py:")
        text += ".py"
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"jdit_config_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config()")
    if arg is None:
        config = module.get_config()
    else:
        try:
            config = module.get_config(arg)
        except TypeError as e:
            if "positional argument" not in str(e):
                raise
            raise ValueError(f"{path}: get_config() takes no argument, but {arg!r} was given "
                             f"after ':'") from None
    if fill_defaults:
        config = ml_collections.ConfigDict(complete(config))
    apply_overrides(config, overrides)
    if fill_defaults:
        complete(config)  # an override may name a section's key it does not have (e.g. family)
    check_values(config)
    return config
