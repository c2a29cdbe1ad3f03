"""``jdit.text.from_pretrained``: a T5, Gemma-2, Llama or Qwen2 encoder and its weights from a
transformers folder (by the config's ``model_type``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jdit.files import read_json_object
from jdit.nn.init import abstract_params
from jdit.text.t5 import T5Encoder
from jdit.weights.safetensors_io import read_safetensors_folder
from jdit.weights.state_dict import StateDict, check_tree


def from_pretrained(path: str | Path, dtype: Any = jnp.float32, *,
                    param_dtype: Any = jnp.float32, hidden_layer: int | None = None
                    ) -> tuple[Any, Any]:
    """``(module, params)`` from a folder with ``config.json`` and ``model.safetensors`` (or
    sharded ``model-0000i-of-0000n.safetensors`` with their index); a pipeline folder's
    ``text_encoder/`` works, and so does the pipeline folder itself. ``dtype`` is the compute
    dtype (norms and softmax stay float32); weights are cast to ``param_dtype``.
    ``hidden_layer`` (decoders: Gemma-2, Llama, Qwen2): which hidden state the encoder returns, as
    transformers' ``hidden_states[hidden_layer]`` (default -1, the final norm's output; LI-DiT
    takes -3); the layers past it are not loaded."""
    path = Path(path)
    if (path / "text_encoder").is_dir() and not (path / "config.json").exists():
        path = path / "text_encoder"
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (not a transformers T5 folder)")
    cfg = read_json_object(cfg_file)
    if cfg.get("model_type") == "gemma2":
        return _gemma2(path, cfg, dtype, param_dtype, -1 if hidden_layer is None else hidden_layer)
    if cfg.get("model_type") in ("llama", "qwen2"):
        return _llama(path, cfg, dtype, param_dtype, -1 if hidden_layer is None else hidden_layer)
    if hidden_layer is not None:
        raise ValueError(f"{path}: hidden_layer is for decoder encoders (Gemma-2, Llama, Qwen2)")
    if cfg.get("model_type") == "umt5":  # one relative bias per layer, not T5's shared one
        raise ValueError(f"{path}: UMT5 is not supported (expected model_type 't5' or 'mt5')")
    if cfg.get("model_type") not in (None, "t5", "mt5"):
        raise ValueError(f"{path}: model_type {cfg.get('model_type')!r} is not T5, Gemma-2, "
                         f"Llama or Qwen2 (expected 't5', 'mt5', 'gemma2', 'llama' or 'qwen2')")
    module = T5Encoder.from_config(cfg, dtype=dtype, param_dtype=param_dtype)
    if any(path.glob("*.bin")) and not any(path.glob("*.safetensors")):
        raise ValueError(f"{path}: only PyTorch .bin weights; jdit reads .safetensors (convert "
                         f"with transformers: model.save_pretrained(dir, safe_serialization=True))")
    from jdit.weights.t5 import convert, encoder_tensors

    return _checked(path, module, convert(StateDict(
        encoder_tensors(read_safetensors_folder(path, "model")), str(path)), module), param_dtype)


def _checked(path: Path, module: Any, tree: Any, param_dtype: Any) -> tuple[Any, Any]:
    """``(module, params)`` once the converted tree has exactly the module's shapes."""
    check_tree(tree, abstract_params(module), str(path))
    return module, jax.tree.map(lambda a: jnp.asarray(a, param_dtype), tree)


def _gemma2(path: Path, cfg: dict[str, Any], dtype: Any, param_dtype: Any,
            hidden_layer: int = -1) -> tuple[Any, Any]:
    from jdit.text.gemma2 import Gemma2Encoder
    from jdit.weights.gemma2 import convert, decoder_tensors

    module = Gemma2Encoder.from_config(cfg, dtype=dtype, param_dtype=param_dtype,
                                       hidden_layer=hidden_layer)
    return _checked(path, module, convert(StateDict(
        decoder_tensors(read_safetensors_folder(path, "model")), str(path)), module), param_dtype)


def _llama(path: Path, cfg: dict[str, Any], dtype: Any, param_dtype: Any,
           hidden_layer: int) -> tuple[Any, Any]:
    from jdit.text.llama import LlamaEncoder
    from jdit.weights.gemma2 import decoder_tensors
    from jdit.weights.llama import convert

    module = LlamaEncoder.from_config(cfg, dtype=dtype, param_dtype=param_dtype,
                                      hidden_layer=hidden_layer)
    return _checked(path, module, convert(StateDict(
        decoder_tensors(read_safetensors_folder(path, "model")), str(path)), module), param_dtype)
