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
from jdit.models.latte import Latte
from jdit.models.lumina2 import Lumina2
from jdit.models.pixart import PixArt
from jdit.models.pixart_controlnet import PixArtControlNet
from jdit.models.sana import Sana
from jdit.models.sana_controlnet import SanaControlNet
from jdit.models.sana_video import SanaVideo

FAMILIES: dict[str, type[nn.Module]] = {"dit": DiT, "pixart": PixArt, "sana": Sana,
                                        "sana_controlnet": SanaControlNet,
                                        "pixart_controlnet": PixArtControlNet,
                                        "sana_video": SanaVideo,
                                        "lumina2": Lumina2, "latte": Latte}

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
    # Lumina-Image 2.0 (2.6B): FLUX VAE latents (16 channels), Gemma-2-2B captions
    "lumina2_2b_1024": dict(family="lumina2", input_size=128, patch_size=2, in_channels=16,
                            out_channels=16, hidden_size=2304, depth=26, refiner_depth=2,
                            num_heads=24, num_kv_heads=8, multiple_of=256, norm_eps=1e-5,
                            axes_dim_rope=(32, 32, 32), axes_lens=(300, 512, 512),
                            caption_channels=2304),
    # SANA-Video 2B at 480p (SanaMSVideo_2000M_P2_D20): Wan 2.1 VAE latents (16 channels),
    # patches 1x2x2, linear heads 20x112, Gemma-2 captions; 81 frames = 21 latent frames
    "sana_video_2b_480p": dict(family="sana_video", input_size=60, input_width=104,
                               input_frames=21, patch_size=2, temporal_patch_size=1,
                               in_channels=16, out_channels=16, hidden_size=2240, depth=20,
                               num_heads=20, cross_num_heads=20, cross_head_dim=112,
                               mlp_ratio=3.0, caption_channels=2304, qk_norm=True),
    # Latte-1 (maxin-cn/Latte-1): PixArt-α XL/2 blocks in spatial + temporal pairs, 16 frames
    "latte_xl2_512": dict(family="latte", input_size=64, video_length=16, caption_channels=4096,
                          norm_eps=1e-6, **_XL2),
}

# What a published architecture's pipeline feeds it: image size, the VAE's downsampling factor
# and latent scale, the text encoder's caption length, the sampling shift of flow models. The one
# source for configs/<preset>.py and the recipes in configs/recipes/.
_SD_VAE = dict(vae_factor=8, latent_scale=0.18215)  # sd-vae-ft-ema (DiT, PixArt-α)
_SDXL_VAE = dict(vae_factor=8, latent_scale=0.13025)  # PixArt-Σ
_DC_AE = dict(vae_factor=32, latent_scale=0.41407, caption_length=300)  # SANA: DC-AE f32c32, Gemma-2
PIPELINE_FACTS: dict[str, dict[str, Any]] = {
    "dit_xl2_256": dict(resolution=256, **_SD_VAE),
    "dit_xl2_512": dict(resolution=512, **_SD_VAE),
    "pixart_alpha_xl2_256": dict(resolution=256, caption_length=120, **_SD_VAE),
    "pixart_alpha_xl2_512": dict(resolution=512, caption_length=120, **_SD_VAE),
    "pixart_alpha_xl2_1024": dict(resolution=1024, caption_length=120, **_SD_VAE),
    "pixart_sigma_xl2_256": dict(resolution=256, caption_length=300, **_SDXL_VAE),
    "pixart_sigma_xl2_512": dict(resolution=512, caption_length=300, **_SDXL_VAE),
    "pixart_sigma_xl2_1024": dict(resolution=1024, caption_length=300, **_SDXL_VAE),
    "pixart_sigma_xl2_2k": dict(resolution=2048, caption_length=300, **_SDXL_VAE),
    "pixart_sigma_xl2_1024_kvcompress": dict(resolution=1024, caption_length=300, **_SDXL_VAE),
    # flow_shift: the published scheduler configs' sampling shift (training used 3; 4 for 600M-1024)
    "sana_600m_512": dict(resolution=512, flow_shift=3.0, **_DC_AE),
    "sana_600m_1024": dict(resolution=1024, flow_shift=3.0, **_DC_AE),
    "sana_1600m_512": dict(resolution=512, flow_shift=3.0, **_DC_AE),
    "sana_1600m_1024": dict(resolution=1024, flow_shift=3.0, **_DC_AE),
    "sana_1600m_2k": dict(resolution=2048, flow_shift=3.0, **_DC_AE),
    "sana_1600m_4k": dict(resolution=4096, flow_shift=6.0, **_DC_AE),
    # FLUX VAE: latents are (z - 0.1159) * 0.3611; the pipeline section has no shift key, so
    # the 0.1159 shift_factor lives with the autoencoder (its config.json), not here.
    "lumina2_2b_1024": dict(resolution=1024, vae_factor=8, latent_scale=0.3611,
                            caption_length=256, flow_shift=6.0),
    # 480x832 px, 81 frames. Wan 2.1 VAE: 8x in space, 4x in time (81 frames -> 21 latent
    # frames); its per-channel latent mean and std live with the autoencoder. flow_shift:
    # diffusers' conversion script (the training config says 7.0, the official scripts pass 8).
    "sana_video_2b_480p": dict(resolution=480, width=832, frames=81, vae_factor=8,
                               vae_time_factor=4, caption_length=300, flow_shift=8.0),
    "latte_xl2_512": dict(resolution=512, caption_length=120, frames=16, **_SD_VAE),
}


def field_names(family: str) -> list[str]:
    return [f.name for f in dataclasses.fields(_family(family)) if f.name not in ("parent", "name")]


def field_defaults(family: str) -> dict[str, Any]:
    """Every field of a family with its default (dtypes by name): the ``model`` section's
    defaults in a config."""
    out = {}
    for f in dataclasses.fields(_family(family)):
        if f.name in ("parent", "name"):
            continue
        value = f.default
        if f.name in ("dtype", "param_dtype"):
            value = jnp.dtype(value).name
        out[f.name] = value
    return out


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
    full = field_defaults(family)
    unknown = sorted(set(fields) - set(full))
    assert not unknown, f"preset {name} sets unknown fields {unknown}"
    return ml_collections.ConfigDict({"family": family, **full, **fields})


def architecture_config(name: str) -> ml_collections.ConfigDict:
    """The config of a published architecture: ``model`` (the preset, blocks scanned for fast
    compiles) and ``pipeline`` (its :data:`PIPELINE_FACTS`). ``configs/<name>.py`` returns it."""
    config = ml_collections.ConfigDict()
    config.model = preset(name)
    config.model.scan_layers = True  # one compiled block per segment: fast compiles at depth 28
    config.pipeline = dict(PIPELINE_FACTS[name])
    return config


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _check_types(family: str, fields: dict[str, Any]) -> None:
    """A field whose default is an int, float or bool takes that kind of value: an integral
    float becomes an int (JSON writes 72.0), anything else is refused naming the field (a
    ``72.5`` head dimension would otherwise be truncated somewhere deep in the model)."""
    defaults = field_defaults(family)
    for key, value in fields.items():
        default = defaults.get(key)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int | float) and not isinstance(value, bool) \
                and float(value).is_integer()
            if ok:
                fields[key] = int(value)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            continue
        if not ok:
            kind = {bool: "true or false", int: "an integer", float: "a number"}[type(default)]
            raise ValueError(f"{family} config key {key!r} must be {kind}, got {value!r}")


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
    for key in ("kv_compress_layers", "axes_dim_rope", "axes_lens", "pag_layers"):
        if key in fields:
            fields[key] = tuple(fields[key])
    if fields.get("text_refiner") is not None:
        from jdit.nn.text_refiner import TextRefinerConfig

        fields["text_refiner"] = TextRefinerConfig.from_dict(fields["text_refiner"])
    _check_types(family, fields)
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
            if hasattr(value, "to_dict"):  # a config section (text_refiner)
                value = value.to_dict()
            out[name] = list(value) if isinstance(value, tuple) else value
    return out
