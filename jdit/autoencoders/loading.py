"""``jdit.autoencoders.from_pretrained``: an AutoencoderKL from a diffusers folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.autoencoders.kl import AutoencoderKL
from jdit.weights.safetensors_io import read_safetensors_folder
from jdit.weights.state_dict import StateDict, check_tree


def from_pretrained(path: str | Path, dtype: Any = jnp.float32, *,
                    param_dtype: Any = jnp.float32) -> tuple[AutoencoderKL, Any]:
    """``(module, params)`` from a diffusers ``AutoencoderKL`` folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``, sharded or not); a pipeline folder's ``vae/`` or
    the pipeline folder itself. GroupNorm and the attention softmax stay float32."""
    path = Path(path)
    if (path / "vae").is_dir() and not (path / "config.json").exists():
        path = path / "vae"
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (not a diffusers AutoencoderKL folder)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"{path}: {cfg['_class_name']} is not an AutoencoderKL")
    module = AutoencoderKL.from_config(cfg, dtype=dtype, param_dtype=param_dtype)
    from jdit.weights.autoencoder_kl import convert

    tensors = read_safetensors_folder(path, "diffusion_pytorch_model")
    tree = convert(StateDict(tensors, str(path)), module)
    expected = jax.eval_shape(lambda: nn.meta.unbox(module.init(
        jax.random.key(0), **module.example_inputs()))["params"])
    check_tree(tree, expected, str(path))
    return module, jax.tree.map(lambda a: jnp.asarray(a, param_dtype), tree)
