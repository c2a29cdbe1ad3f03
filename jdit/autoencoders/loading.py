"""``jdit.autoencoders.from_pretrained``: an AutoencoderKL or AutoencoderDC from a diffusers
folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jdit.autoencoders.dc import AutoencoderDC
from jdit.autoencoders.kl import AutoencoderKL
from jdit.nn.init import abstract_params
from jdit.weights import autoencoder_dc, autoencoder_kl
from jdit.weights.safetensors_io import read_safetensors_folder
from jdit.weights.state_dict import StateDict, check_tree

# diffusers' config ``_class_name`` -> (module class, state-dict converter)
_CLASSES: dict[str, tuple[Any, Any]] = {
    "AutoencoderKL": (AutoencoderKL, autoencoder_kl.convert),
    "AutoencoderDC": (AutoencoderDC, autoencoder_dc.convert),
}


def from_pretrained(path: str | Path, dtype: Any = jnp.float32, *,
                    param_dtype: Any = jnp.float32) -> tuple[Any, Any]:
    """``(module, params)`` from a diffusers ``AutoencoderKL`` or ``AutoencoderDC`` folder
    (``config.json`` + ``diffusion_pytorch_model.safetensors``, sharded or not), by the config's
    ``_class_name``; a pipeline folder's ``vae/`` or the pipeline folder itself. Norms and the
    attention normalisation stay float32."""
    path = Path(path)
    if (path / "vae").is_dir() and not (path / "config.json").exists():
        path = path / "vae"
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (not a diffusers autoencoder folder)")
    cfg = json.loads(cfg_file.read_text())
    kind = cfg.get("_class_name", "AutoencoderKL")
    if kind not in _CLASSES:
        raise ValueError(f"{path}: {kind} is not an AutoencoderKL or AutoencoderDC")
    cls, convert = _CLASSES[kind]
    module = cls.from_config(cfg, dtype=dtype, param_dtype=param_dtype)
    tensors = read_safetensors_folder(path, "diffusion_pytorch_model")
    tree = convert(StateDict(tensors, str(path)), module)
    check_tree(tree, abstract_params(module), str(path))
    return module, jax.tree.map(lambda a: jnp.asarray(a, param_dtype), tree)
