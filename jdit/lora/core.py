"""Low-rank adapters beside a parameter tree: make, attach (unmerged), merge and unmerge.

An adapter for a Dense kernel of shape ``in_dims + out_dims`` is ``A`` (*in_dims, r) and
``B`` (r, *out_dims) with a scale ``alpha / r``: the adapted kernel is ``W + alpha/r · A·B``.
Adapter trees mirror the parameter tree down to the Dense module (``{"block_0": {"attn":
{"qkv": Adapter}}}``), in the same layout: a scanned kernel (``blocks_a_b/...``, a leading
``layers`` axis) has scanned adapters. Fused kernels (PixArt's ``qkv``) get one adapter over
the fused output, which maps exactly to per-projection files (:mod:`jdit.lora.formats`).

:func:`apply` puts adapters into the parameter tree beside their kernels, where
:class:`jdit.nn.layers.Dense` computes ``x·W + (x·A)·(s·B)``: training never forms a
full-size delta and the base tree is untouched (no gradient or optimizer state for it).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from jdit.weights.state_dict import flatten

Array = jax.Array
Tree = dict[str, Any]

# Named target sets (regular expressions over parameter paths, matched whole). Block modules
# are ``block_{i}`` (unscanned) or ``blocks_{a}_{b}`` (scanned); the names are shared by the
# PixArt, SANA and DiT blocks (SANA's Mix-FFN 1x1 convolutions are Dense kernels).
_BLOCK = r"blocks?_[0-9_]+"
TARGETS: dict[str, str] = {
    "attention": _BLOCK + r"/attn/(qkv|out)/kernel",
    "cross_attention": _BLOCK + r"/cross_attn/(q|kv|out)/kernel",
    "mlp": _BLOCK + r"/mlp/(fc1|fc2|conv_inverted|conv_point)/kernel",
}
DEFAULT_TARGETS = ("attention", "cross_attention")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how. ``targets``: names of :data:`TARGETS` or regular expressions
    matched against whole parameter paths (``block_3/attn/qkv/kernel``); ``alpha`` defaults to
    ``rank`` (scale 1); ``dropout`` applies to each adapter's input in training."""

    rank: int = 8
    alpha: float | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int | np.integer) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None and not _finite_positive(self.alpha):
            raise ValueError(f"LoraConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoraConfig.dropout must lie in [0, 1), got {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"LoraConfig.targets must be non-empty strings, got {self.targets!r}")
        for t in targets:
            try:
                re.compile(TARGETS.get(t, t))
            except re.error as e:
                raise ValueError(f"LoraConfig.targets: {t!r} is not a regular expression: {e}"
                                 ) from None
        object.__setattr__(self, "targets", targets)

    @property
    def scale(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def patterns(self) -> list[re.Pattern[str]]:
        return [re.compile(TARGETS.get(t, t)) for t in self.targets]

    def to_dict(self) -> dict[str, Any]:
        return {"rank": int(self.rank), "alpha": None if self.alpha is None else float(self.alpha),
                "targets": list(self.targets), "dropout": float(self.dropout)}


def _finite_positive(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, int | float | np.number) and \
        math.isfinite(float(x)) and float(x) > 0


@struct.dataclass
class Adapter:
    """``a`` (*in_dims, r), ``b`` (r, *out_dims), both with a leading ``layers`` axis when the
    kernel is scanned; the update is ``alpha / r · a·b``. ``alpha`` is static (not trained)."""

    a: Any
    b: Any
    alpha: float = struct.field(pytree_node=False)
    n_in: int = struct.field(pytree_node=False)  # the kernel's input dims (Dense in_axes)

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def scanned(self) -> bool:
        return len(self.a.shape) == self.n_in + 2

    def delta(self) -> Array:
        """``alpha / r · A·B`` in float32, the kernel's shape."""
        a, b = jnp.asarray(self.a, jnp.float32), jnp.asarray(self.b, jnp.float32)
        if self.scanned:
            return jax.vmap(lambda x, y: jnp.tensordot(x, y, 1))(a, b) * self.scale
        return jnp.tensordot(a, b, 1) * self.scale


def is_adapter(x: Any) -> bool:
    return isinstance(x, Adapter)


def adapter_items(adapters: Mapping[str, Any]) -> dict[str, Adapter]:
    """``{"block_0/attn/qkv": Adapter, ...}``: the module path of each adapter."""
    out: dict[str, Adapter] = {}

    def walk(tree: Any, prefix: str) -> None:
        if is_adapter(tree):
            out[prefix] = tree
        elif isinstance(tree, Mapping):
            for k, v in tree.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            raise TypeError(f"adapter tree: {prefix or '<root>'} holds {type(tree).__name__}, "
                            "expected nested dicts of jdit.lora.Adapter")

    walk(adapters, "")
    return out


def from_items(items: Mapping[str, Adapter]) -> Tree:
    tree: Tree = {}
    for path, adapter in items.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = adapter
    return tree


def layout(module: nn.Module) -> dict[str, tuple[tuple[Any, ...], tuple[Any, ...]]]:
    """Each Dense module's path -> (``in_axes``, ``out_axes``) (logical names), read by tracing
    ``module``'s init (nothing is allocated)."""
    from jdit.nn.layers import Dense

    seen: dict[str, tuple[tuple[Any, ...], tuple[Any, ...]]] = {}

    def record(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        if isinstance(context.module, Dense) and context.method_name == "__call__":
            m = context.module
            seen["/".join(m.path)] = (tuple(m.in_axes), tuple(m.out_axes))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: module.init(jax.random.key(0), **module.example_inputs()))
    return seen


def _n_in_by_convention(path: str) -> int:
    # jdit's attention output projections contract (heads, head_dim); every other Dense one axis
    return 2 if path.rsplit("/", 1)[-1] == "out" else 1


def _is_scanned(path: str) -> bool:
    return path.split("/", 1)[0].startswith("blocks_")


def targeted_kernels(params: Mapping[str, Any], config: LoraConfig) -> list[str]:
    """Module paths whose ``kernel`` matches ``config.targets``, in parameter order."""
    patterns = config.patterns
    return [k[: -len("/kernel")] for k in flatten(params)
            if k.endswith("/kernel") and any(p.fullmatch(k) for p in patterns)]


def init(params: Mapping[str, Any], config: LoraConfig, rng: jax.Array, *,
         module: nn.Module | None = None) -> Tree:
    """Adapters for every kernel of ``params`` that ``config.targets`` selects: ``A`` uniform
    in ±1/sqrt(fan_in) (PEFT's default), ``B`` zero, so the adapted model equals the base at
    first. ``module`` gives each kernel's input dims exactly; without it jdit's naming says
    (attention ``out`` kernels contract two axes, every other Dense one). Float32."""
    flat = flatten(params)
    paths = targeted_kernels(params, config)
    if not paths:
        kernels = sorted(k for k in flat if k.endswith("/kernel"))
        raise ValueError(f"LoRA targets {list(config.targets)} match no Dense kernel; the "
                         f"kernels are: {', '.join(kernels)}")
    dims = {p: len(v[0]) for p, v in layout(module).items()} if module is not None else {}
    items: dict[str, Adapter] = {}
    keys = jax.random.split(rng, len(paths))
    for key, path in zip(keys, paths, strict=True):
        shape = tuple(flat[path + "/kernel"].shape)
        lead = 1 if _is_scanned(path) else 0
        n_in = dims.get(path, _n_in_by_convention(path))
        in_shape, out_shape = shape[lead:lead + n_in], shape[lead + n_in:]
        fan_in = math.prod(in_shape)
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, shape[:lead] + in_shape + (config.rank,), jnp.float32,
                               -bound, bound)
        b = jnp.zeros(shape[:lead] + (config.rank,) + out_shape, jnp.float32)
        alpha = float(config.rank if config.alpha is None else config.alpha)
        items[path] = Adapter(a, b, alpha, n_in)
    return from_items(items)


def _as_list(adapters: Any, scale: Any) -> list[tuple[Tree, Any]]:
    many = isinstance(adapters, list | tuple)
    trees = list(adapters) if many else [adapters]
    if isinstance(scale, list | tuple):
        if not many or len(scale) != len(trees):
            raise ValueError(f"{len(scale)} scales for {len(trees)} adapter trees")
        scales = list(scale)
    else:
        scales = [scale] * len(trees)
    for s in scales:
        if isinstance(s, int | float | np.number) and not math.isfinite(float(s)):
            raise ValueError(f"a LoRA scale must be finite, got {s!r}")
    return list(zip(trees, scales, strict=True))


def _check(flat: Mapping[str, Any], items: Mapping[str, Adapter]) -> None:
    missing, misshaped = [], []
    for path, ad in items.items():
        kernel = flat.get(path + "/kernel")
        if kernel is None:
            missing.append(path)
            continue
        lead = 1 if ad.scanned else 0
        k = tuple(kernel.shape)
        want_a = k[:lead + ad.n_in]
        want_b = k[lead + ad.n_in:]
        a, b = tuple(ad.a.shape), tuple(ad.b.shape)
        if a[:-1] != want_a or b[:lead] + b[lead + 1:] != k[:lead] + want_b:
            misshaped.append(f"{path}: kernel {k}, A {a}, B {b}")
        elif a[-1] != b[lead]:
            misshaped.append(f"{path}: rank of A ({a[-1]}) differs from rank of B ({b[lead]})")
    if missing or misshaped:
        lines = ["the adapters do not fit these parameters:"]
        if missing:
            lines.append(f"  no such kernel ({len(missing)}): " + ", ".join(missing))
        if misshaped:
            lines.append(f"  wrong shape ({len(misshaped)}): " + "; ".join(misshaped))
        raise ValueError("\n".join(lines))


def _combined(params: Mapping[str, Any], adapters: Any, scale: Any
              ) -> dict[str, tuple[Array, Array]]:
    """Per kernel path: (A, s·B) of every adapter tree concatenated along the rank."""
    flat = flatten(params)
    parts: dict[str, list[tuple[Array, Array]]] = {}
    lead: dict[str, int] = {}
    for tree, s in _as_list(adapters, scale):
        items = adapter_items(tree)
        _check(flat, items)
        for path, ad in items.items():
            parts.setdefault(path, []).append((ad.a, jnp.asarray(ad.b) * (ad.scale * s)))
            lead[path] = 1 if ad.scanned else 0
    return {path: pieces[0] if len(pieces) == 1 else
            (jnp.concatenate([p[0] for p in pieces], axis=-1),
             jnp.concatenate([p[1] for p in pieces], axis=lead[path]))
            for path, pieces in parts.items()}


def _replace(params: Mapping[str, Any], updates: Mapping[str, Mapping[str, Any]]) -> Tree:
    """A copy of ``params`` with ``updates[module_path]`` merged into that module's dict
    (only the dicts on the way are copied; the arrays are shared)."""
    out: Tree = dict(params)
    for path, values in updates.items():
        node = out
        for part in path.split("/"):
            node[part] = dict(node[part])
            node = node[part]
        node.update(values)
    return out


def apply(params: Mapping[str, Any], adapters: Any, scale: Any = 1.0) -> Tree:
    """``params`` with the adapters beside their kernels, unmerged: running the model on the
    result computes ``x·W + s·(x·A)·B`` in every adapted Dense. ``adapters`` is one tree or a
    list of trees (several at once), ``scale`` a number or one per tree (may be traced)."""
    combined = _combined(params, adapters, scale)
    return _replace(params, {p: {"lora_a": a, "lora_b": b} for p, (a, b) in combined.items()})


def _fold(params: Mapping[str, Any], adapters: Any, scale: Any, sign: float) -> Tree:
    flat = flatten(params)
    updates = {}
    for tree, s in _as_list(adapters, scale):
        items = adapter_items(tree)
        _check(flat, items)
        for path, ad in items.items():
            kernel = updates.get(path, {}).get("kernel", flat[path + "/kernel"])
            new = jnp.asarray(kernel, jnp.float32) + sign * s * ad.delta()
            updates[path] = {"kernel": new.astype(flat[path + "/kernel"].dtype)}
    return _replace(params, updates)


def merge(params: Mapping[str, Any], adapters: Any, scale: Any = 1.0) -> Tree:
    """``W + s · alpha/r · A·B`` for every adapted kernel (one tree or a list, ``scale`` a
    number or one per tree); computed in float32, stored in the kernel's dtype."""
    return _fold(params, adapters, scale, 1.0)


def unmerge(params: Mapping[str, Any], adapters: Any, scale: Any = 1.0) -> Tree:
    """The inverse of :func:`merge` with the same arguments (to float32 rounding)."""
    return _fold(params, adapters, scale, -1.0)


def strip(params: Mapping[str, Any]) -> Tree:
    """``params`` without attached (unmerged) adapters."""
    if isinstance(params, Mapping):
        return {k: strip(v) for k, v in params.items() if k not in ("lora_a", "lora_b")}
    return params


def num_params(adapters: Mapping[str, Any]) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))


def logical_axes(adapters: Mapping[str, Any], module: nn.Module) -> Tree:
    """The logical axis names of every adapter array (a tree like ``adapters`` whose leaves
    are ``nn.LogicallyPartitioned``-style name tuples): ``A`` the kernel's input axes, ``B``
    its output axes, the rank unsharded, ``layers`` first when scanned. FSDP and tensor
    parallelism then shard adapters by the base model's rules."""
    names = layout(module)
    items = {}
    for path, ad in adapter_items(adapters).items():
        if path not in names:
            raise ValueError(f"{path}: not a Dense module of {type(module).__name__}")
        in_axes, out_axes = names[path]
        lead = ("layers",) if ad.scanned else ()
        items[path] = Adapter(lead + in_axes + (None,), lead + (None,) + out_axes, ad.alpha,
                              ad.n_in)
    return from_items(items)


def shardings(adapters: Mapping[str, Any], module: nn.Module, partitioner: Any) -> Tree:
    """``NamedSharding`` of every adapter array under ``partitioner``'s rules."""
    axes = logical_axes(adapters, module)
    return jax.tree.map(lambda names, x: partitioner.logical_sharding(names, x.shape), axes,
                        adapters, is_leaf=lambda x: isinstance(x, tuple))


def stack(adapters: Mapping[str, Any], per_layer: Sequence[Mapping[str, Any]]) -> Tree:
    """Unscanned adapters (``block_{i}``) -> the scanned layout (``blocks_{a}_{b}``)."""
    from jdit.nn.stack import stack_params

    return stack_params(adapters, per_layer)


def unstack(adapters: Mapping[str, Any], per_layer: Sequence[Mapping[str, Any]]) -> Tree:
    """Scanned adapters -> the unscanned layout."""
    from jdit.nn.stack import unstack_params

    return unstack_params(adapters, per_layer)
