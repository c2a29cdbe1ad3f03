"""``from_pretrained`` / ``save_pretrained``: diffusers folders, official checkpoints, jdit folders.

Accepted sources:
- a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, sharded
  ``.safetensors.index.json``, or ``.bin``), or a pipeline folder with a ``transformer/`` subfolder;
- an official PixArt ``.pth`` or DiT ``.pt`` file (read without unpickling arbitrary objects), or
  the same key layout in a ``.safetensors`` file;
- a jdit checkpoint folder written by :func:`save_pretrained` or ``jdit convert``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jdit.models import registry
from jdit.nn.stack import stack_params, unstack_params
from jdit.weights import dit as dit_weights
from jdit.weights import pixart as pixart_weights
from jdit.weights import sana as sana_weights
from jdit.weights.checkpoint import is_jdit_checkpoint, read_checkpoint, write_checkpoint
from jdit.weights.safetensors_io import read_safetensors, read_safetensors_folder
from jdit.weights.state_dict import StateDict, Tree, check_tree
from jdit.weights.torch_pickle import extract_state_dict, load_torch_checkpoint

Converter = Callable[[StateDict, nn.Module], Tree]


def param_shapes(module: nn.Module) -> Tree:
    """Parameter shapes of the unscanned layout, without allocating anything."""
    flat_module = module.clone(scan_layers=False, remat_policy="none")
    variables = jax.eval_shape(
        lambda: flat_module.init(jax.random.key(0), **flat_module.example_inputs())
    )
    return nn.meta.unbox(variables)["params"]


def init_params(module: nn.Module, rng: jax.Array) -> Tree:
    """Freshly initialised parameters (the originals' initialisation), unboxed."""
    return nn.meta.unbox(module.init(rng, **module.example_inputs()))["params"]


def _diffusers_family(cfg: dict[str, Any], folder: Path) -> str:
    cls = cfg.get("_class_name")
    norm = cfg.get("norm_type")
    if cls == "PixArtTransformer2DModel" or (cls == "Transformer2DModel" and norm == "ada_norm_single"):
        return "pixart"
    if cls == "DiTTransformer2DModel" or (cls == "Transformer2DModel" and norm == "ada_norm_zero"):
        return "dit"
    if cls in sana_weights.DIFFUSERS_CLASSES:
        return "sana"
    raise ValueError(
        f"{folder}/config.json: unsupported diffusers class {cls!r} (norm_type={norm!r}); supported: "
        "PixArtTransformer2DModel, DiTTransformer2DModel, SanaTransformer2DModel, "
        "Transformer2DModel with ada_norm_single or ada_norm_zero"
    )


WEIGHTS = {"dit": dit_weights, "pixart": pixart_weights, "sana": sana_weights}


def _read_diffusers_tensors(folder: Path) -> dict[str, np.ndarray]:
    stem = "diffusion_pytorch_model"
    if (folder / f"{stem}.safetensors").exists() or (folder / f"{stem}.safetensors.index.json").exists():
        return read_safetensors_folder(folder, stem)
    if (folder / f"{stem}.bin").exists():
        return extract_state_dict(load_torch_checkpoint(folder / f"{stem}.bin"))
    raise FileNotFoundError(f"{folder}: no {stem}.safetensors, sharded index or .bin weights")


def _official_family(sd: StateDict) -> str:
    if "attention_y_norm.weight" in sd or "blocks.0.mlp.inverted_conv.conv.weight" in sd:
        return "sana"
    if "y_embedder.y_proj.fc1.weight" in sd:
        return "pixart"
    if "y_embedder.embedding_table.weight" in sd:
        return "dit"
    raise ValueError(
        f"{sd.source}: unrecognised checkpoint layout (neither official PixArt keys "
        "'y_embedder.y_proj.*' nor official DiT keys 'y_embedder.embedding_table.*')"
    )


_REQUIRED_OFFICIAL = {
    "pixart": {
        "input_size": "the training latent size (no pos_embed buffer in the file)",
        "pe_interpolation": "the position-embedding scale (α: 1, or 2 at 1024 px; Σ: px / 512)",
        "num_heads": "the number of attention heads (not stored in the weights)",
    },
    "dit": {
        "input_size": "the training latent size (no pos_embed in the file)",
        "num_heads": "the number of attention heads (not stored in the weights)",
    },
    "sana": {
        "input_size": "the training latent size (32 at 1024 px)",
        "cross_num_heads": "the cross-attention heads (16 for SANA-600M, 20 for 1.6B)",
    },
}


def _converting(sd: StateDict, convert: Converter) -> Callable[[nn.Module], Tree]:
    def load(module: nn.Module) -> Tree:
        tree = convert(sd, module)
        sd.finish()
        return tree

    return load


def _resolve(path: Path, state_dict_key: str | None, overrides: dict[str, Any]
             ) -> tuple[str, dict[str, Any], Callable[[nn.Module], Tree]]:
    """``(family, fields, load)``: ``load(module)`` returns the jdit-named parameter tree."""
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
        cfg = json.loads(cfg_file.read_text())
        family = _diffusers_family(cfg, path)
        weights = WEIGHTS[family]
        sd = StateDict(_read_diffusers_tensors(path), str(path))
        return family, weights.config_from_diffusers(cfg), _converting(sd, weights.convert_diffusers)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        tensors = read_safetensors(path)
    else:
        tensors = extract_state_dict(load_torch_checkpoint(path), state_dict_key)
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from DistributedDataParallel
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    probe = StateDict(tensors, str(path))
    family = _official_family(probe)
    weights = WEIGHTS[family]
    sd = StateDict(tensors, str(path), ignore=weights.OFFICIAL_IGNORED)
    fields = weights.config_from_official(sd, overrides.get("num_heads"))
    missing = {k: why for k, why in _REQUIRED_OFFICIAL[family].items()
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
    **overrides: Any,
) -> tuple[nn.Module, Tree]:
    """Load a model and its parameters; returns ``(module, params)``.

    ``dtype`` is the compute dtype (softmax, norms and conditioning stay float32); parameters are
    cast to ``param_dtype``. ``overrides`` set model fields, either runtime choices
    (``scan_layers=True``, ``remat_policy="dots"``, ``attention_impl``) or architecture facts
    that a checkpoint does not record (``num_heads``, ``input_size``, ``pe_interpolation``,
    ``kv_compress`` for the parameter-free modes). ``state_dict_key`` picks the entry of a
    ``.pth`` that holds the weights (default: ``state_dict``, ``ema``, ``model``, ``module``).
    """
    path = Path(path)
    family, fields, load = _resolve(path, state_dict_key, overrides)
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
