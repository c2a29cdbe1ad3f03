"""diffusers / PEFT LoRA files <-> jdit adapters.

Read: a ``.safetensors`` (or ``.bin``) file or a folder holding ``pytorch_lora_weights.safetensors``
(diffusers' ``save_lora_weights``) or ``adapter_model.safetensors`` + ``adapter_config.json``
(PEFT's ``save_pretrained``). Keys ``[transformer.|base_model.model.]<module>.lora_A[.<name>].weight``
and ``lora_B``; ``alpha`` from the file's ``lora_adapter_metadata``, PEFT's
``adapter_config.json`` (``lora_alpha``, ``alpha_pattern``, ``rank_pattern``, ``use_rslora``),
``<module>.alpha`` tensors, or else the rank (diffusers' convention: scale 1).

Which diffusers module is which jdit kernel comes from the family's own weight converter
(:mod:`jdit.weights`), run on a recording state dict: one name table for loading models and
LoRAs. diffusers splits fused kernels (``to_q``, ``to_k``, ``to_v`` for jdit's ``qkv``): their
adapters are concatenated along the rank (each projection's block of ``B`` zero elsewhere),
exactly; written back, each projection keeps only its own rank columns.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import linen as nn

from jdit.lora.core import Adapter, LoraConfig, adapter_items, from_items
from jdit.weights.state_dict import StateDict, flatten

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry
PREFIXES = ("transformer.", "base_model.model.")
_KEY = re.compile(r"(?P<module>.+)\.(?P<which>lora_A|lora_B)(\.(?P<name>[^.]+))?\.weight")


class LoraMismatchError(ValueError):
    """A LoRA file does not fit the model: lists every key that matches nothing and every
    mis-shaped tensor."""


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one diffusers linear lives in jdit: ``path`` (a Dense module), ``index`` on the
    kernel's first output axis for fused kernels (None: the whole kernel)."""

    path: str
    index: int | None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    conv1x1: bool


@dataclasses.dataclass(frozen=True)
class _Linear:
    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    conv1x1: bool


class _Recorder(StateDict):
    """A state dict that answers every request with where the tensor would go."""

    def __init__(self) -> None:
        super().__init__({}, "recorder")

    def take(self, key: str, shape: tuple[int, ...]) -> None:
        return None

    def linear(self, prefix: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
               bias: bool = True, conv1x1: bool = False) -> dict[str, Any]:
        return {"kernel": _Linear(prefix, tuple(in_shape), tuple(out_shape), conv1x1)}

    def stacked_linears(self, prefixes: list[str], in_dim: int, out_shape: tuple[int, ...],
                        bias: bool = True) -> dict[str, Any]:
        return {"kernel": tuple(_Linear(p, (in_dim,), tuple(out_shape), False) for p in prefixes)}

    def layer_norm(self, prefix: str, dim: int) -> None:
        return None

    def patch_conv(self, *args: Any) -> None:
        return None

    def depthwise_conv(self, *args: Any) -> None:
        return None

    def rms_norm(self, prefix: str, dim: int) -> None:
        return None


def module_map(module: nn.Module) -> dict[str, Slot]:
    """diffusers module name (``transformer_blocks.0.attn1.to_q``) -> its :class:`Slot`, for
    the unscanned layout of ``module``."""
    from jdit.models import registry
    from jdit.models.loading import family_weights

    weights = family_weights(registry.family_of(module))
    tree = weights.convert_diffusers(_Recorder(), module.clone(scan_layers=False))
    out: dict[str, Slot] = {}
    for key, value in flatten(tree).items():
        if not key.endswith("/kernel"):
            continue
        path = key[: -len("/kernel")]
        if isinstance(value, _Linear):
            out[value.name] = Slot(path, None, value.in_shape, value.out_shape, value.conv1x1)
        else:
            for i, lin in enumerate(value):
                out[lin.name] = Slot(path, i, lin.in_shape, lin.out_shape, False)
    return out


# -- reading ------------------------------------------------------------------------------------

def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    """Tensors, the adapter config found beside or inside them, and the file's name."""
    if path.is_dir():
        for name in (DIFFUSERS_FILE, PEFT_FILE, "pytorch_lora_weights.bin", "adapter_model.bin"):
            if (path / name).is_file():
                tensors, config, _ = _read(path / name)
                if (path / PEFT_CONFIG).is_file():
                    config = {**json.loads((path / PEFT_CONFIG).read_text()), **config}
                return tensors, config, str(path / name)
        raise FileNotFoundError(f"{path}: no {DIFFUSERS_FILE} or {PEFT_FILE} in this folder")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file or folder")
    config: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from jdit.weights.safetensors_io import SafetensorsFile

        f = SafetensorsFile(path)
        tensors = {k: np.asarray(f[k]) for k in f.names()}
        if METADATA_KEY in f.metadata:
            packed = json.loads(f.metadata[METADATA_KEY])
            # diffusers packs the transformer's LoraConfig as "transformer.<field>"
            config = {k.split(".", 1)[1]: v for k, v in packed.items()
                      if k.startswith("transformer.")}
    else:
        from jdit.weights.torch_pickle import extract_state_dict, load_torch_checkpoint

        tensors = extract_state_dict(load_torch_checkpoint(path))
    return tensors, config, str(path)


def _peft_pattern(patterns: Mapping[str, Any], name: str) -> Any:
    """PEFT's rule: a key matches a module whose name ends with it (after a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


@dataclasses.dataclass
class _Module:
    a: np.ndarray | None = None  # torch layout (r, in)
    b: np.ndarray | None = None  # (out, r)
    alpha: float | None = None


def _parse(tensors: Mapping[str, np.ndarray], source: str, adapter_name: str | None
           ) -> tuple[dict[str, _Module], list[str]]:
    modules: dict[str, _Module] = collections.defaultdict(_Module)
    unexpected: list[str] = []
    names = set()
    for key, value in tensors.items():
        bare = next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)
        if bare.endswith(".alpha") and np.size(value) == 1:
            modules[bare[: -len(".alpha")]].alpha = float(np.asarray(value).reshape(()))
            continue
        if "lora_magnitude_vector" in bare:
            raise ValueError(f"{source}: a DoRA adapter ({key}); only plain LoRA is supported")
        m = _KEY.fullmatch(bare)
        if m is None:
            unexpected.append(key)
            continue
        if m["name"] is not None:
            names.add(m["name"])
            if adapter_name is not None and m["name"] != adapter_name:
                continue
        w = np.asarray(value)
        if w.ndim == 4 and w.shape[2:] == (1, 1):
            w = w[:, :, 0, 0]
        if w.ndim != 2:
            unexpected.append(f"{key} (shape {tuple(value.shape)}: not a linear or 1x1 conv)")
            continue
        setattr(modules[m["module"]], "a" if m["which"] == "lora_A" else "b", w)
    if adapter_name is None and len(names) > 1:
        raise ValueError(f"{source} holds adapters {sorted(names)}: pass adapter_name")
    return dict(modules), unexpected


def _alpha(name: str, rank: int, found: float | None, config: Mapping[str, Any]) -> float:
    """The module's alpha as a scale numerator for ``alpha / rank``."""
    alpha = found
    if alpha is None and config:
        alpha = _peft_pattern(config.get("alpha_pattern") or {}, name)
        if alpha is None:
            alpha = config.get("lora_alpha")
    alpha = float(rank if alpha is None else alpha)
    if config.get("use_rslora"):  # scale alpha / sqrt(r), as alpha' / r
        alpha = alpha * math.sqrt(rank)
    return alpha


def read(path: str | Path, module: nn.Module, *, adapter_name: str | None = None
         ) -> tuple[dict[str, Any], LoraConfig]:
    """A diffusers / PEFT LoRA as jdit adapters for ``module`` (its layout: scanned or not),
    and a :class:`LoraConfig` describing it. Keys that fit nothing, mis-shaped tensors and
    ranks of A and B that differ are refused together in one :class:`LoraMismatchError`."""
    tensors, config, source = _read(Path(path))
    if config.get("use_dora"):
        raise ValueError(f"{source}: a DoRA adapter (use_dora); only plain LoRA is supported")
    if config.get("lora_bias"):
        raise ValueError(f"{source}: an adapter with a trained bias (lora_bias); not supported")
    modules, unexpected = _parse(tensors, source, adapter_name)
    slots = module_map(module)
    problems: list[str] = []
    per_kernel: dict[str, list[tuple[Slot, np.ndarray, np.ndarray, float]]] = {}
    for name, mod in sorted(modules.items()):
        slot = slots.get(name)
        if slot is None:
            unexpected.append(f"{name}.lora_A/lora_B")
            continue
        if mod.a is None or mod.b is None:
            problems.append(f"{name}: only lora_{'B' if mod.a is None else 'A'}")
            continue
        fan_in, fan_out = math.prod(slot.in_shape), math.prod(slot.out_shape)
        if mod.a.shape[0] != mod.b.shape[1]:
            problems.append(f"{name}: rank of lora_A ({mod.a.shape[0]}) differs from rank of "
                            f"lora_B ({mod.b.shape[1]})")
            continue
        if mod.a.shape[1] != fan_in or mod.b.shape[0] != fan_out:
            problems.append(f"{name}: lora_A {tuple(mod.a.shape)} / lora_B {tuple(mod.b.shape)}"
                            f" do not fit a ({fan_out}, {fan_in}) weight")
            continue
        rank = mod.a.shape[0]
        alpha = _alpha(name, rank, mod.alpha, config)
        per_kernel.setdefault(slot.path, []).append((slot, mod.a, mod.b, alpha))
    if unexpected or problems:
        lines = [f"LoRA {source} does not fit the {type(module).__name__} model:"]
        if unexpected:
            lines.append(f"  keys that match no module ({len(unexpected)}): " + ", ".join(unexpected))
        if problems:
            lines.append(f"  wrong shape ({len(problems)}): " + "; ".join(problems))
        raise LoraMismatchError("\n".join(lines))
    if not per_kernel:
        raise LoraMismatchError(f"LoRA {source}: no lora_A / lora_B tensors")
    items = {path: _to_adapter(parts, len(slots_of(slots, path))) for path, parts
             in per_kernel.items()}
    adapters = from_items(items)
    if module.scan_layers:
        adapters = _stack(adapters, module)
    ranks = collections.Counter(ad.rank for ad in items.values())
    alphas = collections.Counter(ad.alpha for ad in items.values())
    cfg = LoraConfig(rank=ranks.most_common(1)[0][0], alpha=alphas.most_common(1)[0][0],
                     targets=tuple(re.escape(p) + "/kernel" for p in sorted(items)))
    return adapters, cfg


def slots_of(slots: Mapping[str, Slot], path: str) -> list[tuple[str, Slot]]:
    """The diffusers names of one jdit kernel, in fused order."""
    found = [(n, s) for n, s in slots.items() if s.path == path]
    return sorted(found, key=lambda item: -1 if item[1].index is None else item[1].index)


def _to_adapter(parts: list[tuple[Slot, np.ndarray, np.ndarray, float]], n_slots: int
                ) -> Adapter:
    slot = parts[0][0]
    n_in = len(slot.in_shape)
    if slot.index is None:  # a whole kernel: kept as it is, alpha included
        _, a, b, alpha = parts[0]
        r = a.shape[0]
        return Adapter(a.T.reshape(slot.in_shape + (r,)).astype(np.float32),
                       b.T.reshape((r,) + slot.out_shape).astype(np.float32), alpha, n_in)
    # fused: ranks concatenated; each projection's block of B holds its rows, zero elsewhere.
    # One scale for all: theirs when they share one, else each folded into its block.
    ratios = {alpha / a.shape[0] for _, a, _, alpha in parts}
    shared = ratios.pop() if len(ratios) == 1 else None
    first = parts[0][1]
    if shared is not None and all(np.array_equal(a, first) for _, a, _, _ in parts):
        # one A for every projection (as jdit writes a fused kernel's adapter): kept as one
        r = first.shape[0]
        b_one = np.zeros((r, n_slots) + slot.out_shape, np.float32)
        for s, _, b, _ in parts:
            b_one[:, s.index] = b.T.reshape((r,) + s.out_shape)
        return Adapter(first.T.reshape(slot.in_shape + (r,)).astype(np.float32), b_one,
                       float(shared * r), n_in)
    total = sum(a.shape[0] for _, a, _, _ in parts)
    a_cat = np.concatenate([a for _, a, _, _ in parts], axis=0).T.reshape(slot.in_shape + (total,))
    b_cat = np.zeros((total, n_slots) + slot.out_shape, np.float32)
    start = 0
    for s, a, b, alpha in parts:
        r = a.shape[0]
        fold = 1.0 if shared is not None else alpha / r
        b_cat[start:start + r, s.index] = (b.T * fold).reshape((r,) + s.out_shape)
        start += r
    alpha = float(total if shared is None else shared * total)
    return Adapter(a_cat.astype(np.float32), b_cat, alpha, n_in)


def _stack(adapters: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """Unscanned adapters -> ``module``'s scanned layout; blocks of a segment without an
    adapter get a zero one, lower ranks are padded with zeros (both exact)."""
    from jdit.lora.core import stack
    from jdit.nn.stack import segments

    per_layer = module.per_layer()
    keys = [tuple(sorted(kw.items())) for kw in per_layer]
    items = adapter_items(adapters)
    out = {p: ad for p, ad in items.items() if not p.startswith("block_")}
    for first, last in segments(keys):
        subpaths = sorted({p.split("/", 1)[1] for p in items
                           for i in range(first, last + 1) if p.startswith(f"block_{i}/")})
        for sub in subpaths:
            layers = [items.get(f"block_{i}/{sub}") for i in range(first, last + 1)]
            present = [ad for ad in layers if ad is not None]
            if len(present) < len(layers) or len({(ad.rank, ad.alpha) for ad in present}) > 1:
                rank = max(ad.rank for ad in present)
                layers = [_normalized(ad, present[0], rank) for ad in layers]
            for i, ad in zip(range(first, last + 1), layers, strict=True):
                out[f"block_{i}/{sub}"] = ad
    return stack(from_items(out), per_layer)


def _normalized(ad: Adapter | None, template: Adapter, rank: int) -> Adapter:
    """``ad`` (None: a zero adapter) at ``rank`` with scale 1 (alpha = rank), zero-padded."""
    a = np.zeros(tuple(template.a.shape[:-1]) + (rank,), np.float32)
    b = np.zeros((rank,) + tuple(template.b.shape[1:]), np.float32)
    if ad is not None:
        a[..., :ad.rank] = np.asarray(ad.a)
        b[:ad.rank] = np.asarray(ad.b) * ad.scale
    return Adapter(a, b, float(rank), template.n_in)


# -- writing ------------------------------------------------------------------------------------

def to_state_dict(adapters: Mapping[str, Any], module: nn.Module, prefix: str = "transformer."
                  ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, int]]:
    """diffusers-named tensors (``<prefix><module>.lora_A.weight`` (r, in) and ``lora_B``
    (out, r)), with each module's alpha and rank."""
    from jdit.lora.core import unstack

    if module.scan_layers:
        adapters = unstack(adapters, module.per_layer())
    slots = module_map(module)
    tensors: dict[str, np.ndarray] = {}
    alphas: dict[str, float] = {}
    ranks: dict[str, int] = {}
    unknown = []
    for path, ad in adapter_items(adapters).items():
        names = slots_of(slots, path)
        if not names:
            unknown.append(path)
            continue
        a = np.asarray(ad.a, np.float32)
        b = np.asarray(ad.b, np.float32)
        for name, slot in names:
            a_t = a.reshape(-1, ad.rank).T  # (r, in)
            b_t = (b if slot.index is None else b[:, slot.index]).reshape(ad.rank, -1).T
            if slot.index is not None:  # keep the rank columns this projection uses
                used = np.flatnonzero(np.any(b_t != 0, axis=0))
                if len(used) == 0:
                    continue
                a_t, b_t = a_t[used], b_t[:, used]
            if slot.conv1x1:
                a_t, b_t = a_t[:, :, None, None], b_t[:, :, None, None]
            tensors[f"{prefix}{name}.lora_A.weight"] = np.ascontiguousarray(a_t)
            tensors[f"{prefix}{name}.lora_B.weight"] = np.ascontiguousarray(b_t)
            # the module's own scale is alpha/r of the jdit adapter; keep it for its rank
            ranks[name] = int(a_t.shape[0])
            alphas[name] = ad.scale * ranks[name]
    if unknown:
        raise ValueError(f"adapters for modules diffusers has no name for: {unknown}")
    return tensors, alphas, ranks


def peft_config(alphas: Mapping[str, float], ranks: Mapping[str, int]) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields: the commonest rank / alpha, patterns for the rest."""
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {"r": int(r), "lora_alpha": float(alpha),
            "rank_pattern": {n: int(v) for n, v in ranks.items() if v != r},
            "alpha_pattern": {n: float(v) for n, v in alphas.items() if v != alpha},
            "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none",
            "use_dora": False, "use_rslora": False, "init_lora_weights": True}


def write(path: str | Path, adapters: Mapping[str, Any], module: nn.Module, *,
          format: str = "diffusers") -> Path:
    """Write ``adapters`` for diffusers (``format="diffusers"``: one safetensors file with the
    ``transformer.`` prefix and ``lora_adapter_metadata``, what ``save_lora_weights`` writes)
    or PEFT (``"peft"``: a folder with ``adapter_model.safetensors`` and
    ``adapter_config.json``). A ``path`` ending in ``.safetensors`` is the file itself, otherwise
    a folder to hold it. Written atomically."""
    from jdit.files import atomic_write
    from jdit.weights.safetensors_io import write_safetensors

    path = Path(path)
    if format == "diffusers":
        tensors, alphas, ranks = to_state_dict(adapters, module, "transformer.")
        config = peft_config(alphas, ranks)
        meta = {METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()},
                                         sort_keys=True), "format": "pt"}
        target = path if path.suffix == ".safetensors" else path / DIFFUSERS_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(target, tensors, meta)
        return target
    if format == "peft":
        tensors, alphas, ranks = to_state_dict(adapters, module, "base_model.model.")
        path.mkdir(parents=True, exist_ok=True)
        config = {**peft_config(alphas, ranks), "peft_type": "LORA", "task_type": None,
                  "base_model_name_or_path": None}
        write_safetensors(path / PEFT_FILE, tensors, {"format": "pt"})
        atomic_write(path / PEFT_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return path
    raise ValueError(f"format must be 'diffusers' or 'peft', got {format!r}")


def load(path: str | Path, module: nn.Module | None = None, *, adapter_name: str | None = None
         ) -> tuple[dict[str, Any], LoraConfig]:
    """Adapters and their config from a diffusers / PEFT LoRA file or folder for ``module``
    (required: the names and shapes to map to; :func:`read`). A jdit LoRA run directory is
    read by ``jdit.train.loop.load_adapters`` (or exported with ``jdit convert --lora``)."""
    if module is None:
        raise ValueError(f"{path}: pass module= (the jdit model the LoRA is for): diffusers "
                         "names map to jdit kernels through the model's shapes")
    if (Path(path) / "config.json").is_file() and (Path(path) / "checkpoints").is_dir():
        raise ValueError(f"{path} is a jdit run directory: read it with jdit.train.loop."
                         "load_adapters, or export it with jdit convert --lora")
    return read(path, module, adapter_name=adapter_name)


def save(path: str | Path, adapters: Mapping[str, Any], config: LoraConfig | None = None, *,
         module: nn.Module, format: str = "diffusers") -> Path:
    """Write ``adapters`` for ``module`` as diffusers loads them (:func:`write`). ``config``
    is accepted for symmetry with :func:`load`; each adapter carries its own alpha."""
    return write(path, adapters, module, format=format)
