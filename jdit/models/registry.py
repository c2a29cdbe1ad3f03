"""Model families and the published architectures, by name.

``build("pixart", depth=12, ...)`` constructs a family with validated fields;
``build(preset("pixart_sigma_xl2_1024"))`` a published size. Configs in ``configs/`` start from a
preset and override what a recipe changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from jdit.models.dit import DiT
from jdit.models.pixart import PixArt
from jdit.models.sana import Sana

FAMILIES: dict[str, type[nn.Module]] = {"dit": DiT, "pixart": PixArt, "sana": Sana}

# Fields that choose how a model runs, not what it computes: not stored in checkpoints.
RUNTIME_FIELDS = ("scan_layers", "remat_policy", "attention_impl", "dtype", "param_dtype", "precision")

_XL2 = dict(patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
            learn_sigma=True)
_PIXART_XL2 = dict(_XL2, caption_channels=4096)
_SANA = dict(patch_size=1, in_channels=32, out_channels=32, mlp_ratio=2.5, caption_channels=2304)
_SANA_600M = dict(hidden_size=1152, depth=28, num_heads=36, cross_num_heads=16, **_SANA)
_SANA_1600M = dict(hidden_size=2240, depth=20, num_heads=70, cross_num_heads=20, **_SANA)
_KV = dict(kv_compress="conv", kv_compress_ratio=2, kv_compress_layers=tuple(range(14, 28)))

PRESETS: dict[str, dict[str, Any]] = {
    "dit_xl2_256": dict(family="dit", input_size=32, num_classes=1000, **_XL2),
    "dit_xl2_512": dict(family="dit", input_size=64, num_classes=1000, **_XL2),
    "pixart_alpha_xl2_256": dict(family="pixart", input_size=32, pe_interpolation=1.0, **_PIXART_XL2),
    "pixart_alpha_xl2_512": dict(family="pixart", input_size=64, pe_interpolation=1.0, **_PIXART_XL2),
    "pixart_alpha_xl2_1024": dict(family="pixart", input_size=128, pe_interpolation=2.0,
                                  micro_condition=True, **_PIXART_XL2),
    "pixart_sigma_xl2_256": dict(family="pixart", input_size=32, pe_interpolation=0.5, **_PIXART_XL2),
    "pixart_sigma_xl2_512": dict(family="pixart", input_size=64, pe_interpolation=1.0, **_PIXART_XL2),
    "pixart_sigma_xl2_1024": dict(family="pixart", input_size=128, pe_interpolation=2.0,
                                  **_PIXART_XL2),
    "pixart_sigma_xl2_2k": dict(family="pixart", input_size=256, pe_interpolation=4.0, **_PIXART_XL2),
    "pixart_sigma_xl2_1024_kvcompress": dict(family="pixart", input_size=128, pe_interpolation=2.0,
                                             **_PIXART_XL2, **_KV),
    # SANA on the 32x DC-AE (32 latent channels, patch 1): NoPE up to 1024 px, sin-cos above.
    "sana_600m_512": dict(family="sana", input_size=16, **_SANA_600M),
    "sana_600m_1024": dict(family="sana", input_size=32, **_SANA_600M),
    "sana_1600m_512": dict(family="sana", input_size=16, **_SANA_1600M),
    "sana_1600m_1024": dict(family="sana", input_size=32, **_SANA_1600M),
    "sana_1600m_2k": dict(family="sana", input_size=64, pos_embed=True, pe_interpolation=1.0,
                          **_SANA_1600M),
    "sana_1600m_4k": dict(family="sana", input_size=128, pos_embed=True, pe_interpolation=2.0,
                          **_SANA_1600M),
}


def field_names(family: str) -> list[str]:
    return [f.name for f in dataclasses.fields(_family(family)) if f.name not in ("parent", "name")]


def _family(family: str) -> type[nn.Module]:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; available: {sorted(FAMILIES)}") from None


def preset(name: str) -> ml_collections.ConfigDict:
    """A published architecture as a ConfigDict: ``family`` plus every model field.

    Fields the preset does not set carry the family's defaults, so a config can override any
    of them; dtypes are given by name.
    """
    try:
        fields = dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}") from None
    family = fields.pop("family")
    full: dict[str, Any] = {"family": family}
    for f in dataclasses.fields(_family(family)):
        if f.name in ("parent", "name", "precision"):
            continue
        value = fields.pop(f.name, f.default)
        if f.name in ("dtype", "param_dtype"):
            value = jnp.dtype(value).name
        full[f.name] = value
    assert not fields, f"preset {name} sets unknown fields {sorted(fields)}"
    return ml_collections.ConfigDict(full)


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build(spec: str | Mapping[str, Any], **overrides: Any) -> nn.Module:
    """Construct a model from a family name plus fields, or from a mapping with ``family``.

    Unknown fields raise a ``ValueError`` naming the valid ones; dtype fields may be strings.
    """
    if isinstance(spec, str):
        fields: dict[str, Any] = dict(overrides)
        family = spec
    else:
        spec = spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else dict(spec)
        family = spec.pop("family", None)
        if family is None:
            raise ValueError("model config needs a 'family' entry, one of " + str(sorted(FAMILIES)))
        fields = {**spec, **overrides}
    cls = _family(family)
    valid = field_names(family)
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise ValueError(f"unknown {family} config keys {unknown}; valid keys: {valid}")
    for key in ("dtype", "param_dtype"):
        if isinstance(fields.get(key), str):
            if fields[key] not in _DTYPES:
                raise ValueError(f"{key} must be one of {sorted(_DTYPES)}, got {fields[key]!r}")
            fields[key] = _DTYPES[fields[key]]
    for key in ("kv_compress_layers",):
        if key in fields:
            fields[key] = tuple(fields[key])
    module = cls(**fields)
    module.check_config()
    return module


def family_of(module: nn.Module) -> str:
    for name, cls in FAMILIES.items():
        if type(module) is cls:
            return name
    raise ValueError(f"{type(module).__name__} is not a registered jdit model")


def architecture(module: nn.Module) -> dict[str, Any]:
    """``family`` plus the fields that define the computation (JSON-serialisable)."""
    family = family_of(module)
    out: dict[str, Any] = {"family": family}
    for name in field_names(family):
        if name not in RUNTIME_FIELDS:
            value = getattr(module, name)
            out[name] = list(value) if isinstance(value, tuple) else value
    return out
