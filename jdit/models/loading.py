"""``from_pretrained`` / ``save_pretrained``: diffusers folders, official checkpoints, jdit folders.

Accepted sources:
- a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, sharded
  ``.safetensors.index.json``, or ``.bin``), or a pipeline folder with a ``transformer/`` subfolder;
- an official PixArt ``.pth`` or DiT ``.pt`` file (read without unpickling arbitrary objects), or
  the same key layout in a ``.safetensors`` file;
- a jdit checkpoint folder written by :func:`save_pretrained` or ``jdit convert``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jdit.files import read_json_object
from jdit.models import registry
from jdit.nn.init import abstract_params
from jdit.nn.stack import stack_params, unstack_params
from jdit.weights.jdit_folder import is_jdit_checkpoint, read_checkpoint, write_checkpoint
from jdit.weights.safetensors_io import read_safetensors, read_safetensors_folder
from jdit.weights.state_dict import StateDict, Tree, check_tree
from jdit.weights.torch_pickle import extract_state_dict, load_torch_checkpoint

Converter = Callable[[StateDict, nn.Module], Tree]


def param_shapes(module: nn.Module) -> Tree:
    """Parameter shapes of the unscanned layout, without allocating anything."""
    return abstract_params(module.clone(scan_layers=False, remat_policy="none"))


def family_weights(family: str) -> ModuleType:
    """The weights module of a registered family: ``jdit/weights/<family>.py`` (its name maps,
    ``config_from_*`` readers and the facts that identify its checkpoints)."""
    return importlib.import_module(f"jdit.weights.{family}")


def _diffusers_family(cfg: dict[str, Any], folder: Path) -> str:
    cls, norm = cfg.get("_class_name"), cfg.get("norm_type")
    for family in registry.FAMILIES:
        weights = family_weights(family)
        legacy = weights.DIFFUSERS_LEGACY_NORM_TYPE
        if cls in weights.DIFFUSERS_CLASSES or (legacy is not None and norm == legacy
                                                and cls == "Transformer2DModel"):
            return family
    supported = [c for f in registry.FAMILIES for c in family_weights(f).DIFFUSERS_CLASSES]
    legacy = [f"Transformer2DModel with norm_type {family_weights(f).DIFFUSERS_LEGACY_NORM_TYPE!r}"
              for f in registry.FAMILIES if family_weights(f).DIFFUSERS_LEGACY_NORM_TYPE]
    raise ValueError(f"{folder}/config.json: unsupported diffusers class {cls!r} "
                     f"(norm_type={norm!r}); supported: {', '.join(supported + legacy)}")


def _read_diffusers_tensors(folder: Path) -> dict[str, np.ndarray]:
    stem = "diffusion_pytorch_model"
    if (folder / f"{stem}.safetensors").exists() or (folder / f"{stem}.safetensors.index.json").exists():
        return read_safetensors_folder(folder, stem)
    if (folder / f"{stem}.bin").exists():
        return extract_state_dict(load_torch_checkpoint(folder / f"{stem}.bin"))
    raise FileNotFoundError(f"{folder}: no {stem}.safetensors, sharded index or .bin weights")


def _official_family(sd: StateDict) -> str:
    """The one family whose official key markers are all present."""
    markers = {f: family_weights(f).OFFICIAL_MARKERS for f in registry.FAMILIES}
    found = [f for f, keys in markers.items() if all(k in sd for k in keys)]
    # a file holding a base and its ControlNet (SANA's official) matches both: the ControlNet
    whole = [f for f in found
             if set(found) - {f} <= set(getattr(family_weights(f), "OFFICIAL_CONTAINS", ()))]
    if len(found) > 1 and len(whole) == 1:
        found = whole
    if len(found) != 1:
        what = "unrecognised" if not found else f"ambiguous ({found} all match)"
        raise ValueError(f"{sd.source}: {what} checkpoint layout; official layouts are known by "
                         + "; ".join(f"{f}: {list(keys)}" for f, keys in markers.items()))
    return found[0]


def _converting(sd: StateDict, convert: Converter) -> Callable[[nn.Module], Tree]:
    def load(module: nn.Module) -> Tree:
        tree = convert(sd, module)
        sd.finish()
        return tree

    return load


def _resolve(path: Path, state_dict_key: str | None, overrides: dict[str, Any],
             prefix: str | None = None) -> tuple[str, dict[str, Any], Callable[[nn.Module], Tree]]:
    """``(family, fields, load)``: ``load(module)`` returns the jdit-named parameter tree."""
    if prefix is not None and path.is_dir():
        raise ValueError(f"{path}: state_dict_prefix picks part of a single checkpoint file, "
                         "not of a folder")
    if path.is_dir():
        if (path / "model_index.json").exists():
            if not (path / "transformer").is_dir():
                raise ValueError(f"{path}: pipeline folder without a transformer/ subfolder")
            path = path / "transformer"
        if is_jdit_checkpoint(path):
            arch, params = read_checkpoint(path)
            return arch.pop("family"), arch, lambda module: params
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{path}: no config.json (not a diffusers or jdit model folder)")
        cfg = read_json_object(cfg_file)
        family = _diffusers_family(cfg, path)
        weights = family_weights(family)
        try:
            fields = weights.config_from_diffusers(cfg)
        except ValueError as e:
            raise ValueError(f"{cfg_file}: {e}") from None
        sd = StateDict(_read_diffusers_tensors(path), str(path))
        if hasattr(weights, "fields_from_diffusers_weights"):  # a config without dimensions
            fields = weights.fields_from_diffusers_weights(sd, {**fields, **overrides})
        return family, fields, _converting(sd, weights.convert_diffusers)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        tensors = read_safetensors(path)
    else:
        tensors = extract_state_dict(load_torch_checkpoint(path), state_dict_key)
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from DistributedDataParallel
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    if prefix is not None:  # one model of a file that holds several (PixArt-δ's base_model.)
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not tensors:
            raise ValueError(f"{path}: no weights under the prefix {prefix!r}")
    probe = StateDict(tensors, str(path))
    family = _official_family(probe)
    weights = family_weights(family)
    sd = StateDict(tensors, str(path), ignore=weights.OFFICIAL_IGNORED)
    fields = weights.config_from_official(sd, overrides.get("num_heads"))
    missing = {k: why for k, why in weights.OFFICIAL_REQUIRED_FIELDS.items()
               if k not in fields and k not in overrides}
    if missing:
        raise ValueError(
            f"{path}: cannot infer " + "; ".join(f"{k} ({why})" for k, why in missing.items())
            + ". Pass them to from_pretrained, e.g. from_pretrained(path, "
            + ", ".join(f"{k}=..." for k in missing) + ")"
        )
    return family, fields, _converting(sd, weights.convert_official)


def from_pretrained(
    path: str | Path,
    dtype: Any = jnp.float32,
    *,
    param_dtype: Any = jnp.float32,
    state_dict_key: str | None = None,
    state_dict_prefix: str | None = None,
    **overrides: Any,
) -> tuple[nn.Module, Tree]:
    """Load a model and its parameters; returns ``(module, params)``.

    ``dtype`` is the compute dtype (softmax, norms and conditioning stay float32); parameters are
    cast to ``param_dtype``. ``overrides`` set model fields, either runtime choices
    (``scan_layers=True``, ``remat_policy="dots"``, ``attention_impl``) or architecture facts
    that a checkpoint does not record (``num_heads``, ``input_size``, ``pe_interpolation``,
    ``kv_compress`` for the parameter-free modes). ``state_dict_key`` picks the entry of a
    ``.pth`` that holds the weights (default: ``state_dict``, ``ema``, ``model``, ``module``);
    ``state_dict_prefix`` keeps the keys under a prefix, stripped (one model of a file that
    holds several: a PixArt-δ ControlNet file's base is ``"base_model."``).
    """
    path = Path(path)
    family, fields, load = _resolve(path, state_dict_key, overrides, state_dict_prefix)
    module = registry.build(family, **{**fields, **overrides, "dtype": dtype,
                                       "param_dtype": param_dtype})
    tree = load(module)
    check_tree(tree, param_shapes(module), str(path))
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype=param_dtype), tree)
    if module.scan_layers:
        params = stack_params(params, module.per_layer())
    return module, params


def save_pretrained(module: nn.Module, params: Tree, path: str | Path, *,
                    overwrite: bool = False) -> None:
    """Write a jdit checkpoint folder (atomically) that :func:`from_pretrained` reads back."""
    if module.scan_layers:
        params = unstack_params(params, module.per_layer())
    params = jax.tree.map(np.asarray, params)
    check_tree(params, param_shapes(module), "params")
    write_checkpoint(path, registry.architecture(module), params, overwrite=overwrite)
