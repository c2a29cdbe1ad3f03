"""CAME: Confidence-guided Adaptive Memory Efficient optimization (Luo et al., ACL 2023).

The optimizer PixArt-Σ trains with (lr 2e-5, weight decay 0, betas (0.9, 0.999, 0.9999),
eps (1e-30, 1e-16)), written as optax transformations:

    came(lr) = chain(scale_by_came(...), add_decayed_weights(wd), scale_by_learning_rate(lr))

Per parameter, with ``g`` its gradient (Algorithm 1 of arXiv 2307.02047; no bias correction):

1. second moment of ``g² + eps1``: for a *factored* parameter only the EMAs (``b2``) of its row
   means and column means are kept and ``v ≈ row ⊗ col / mean(row)`` (Adafactor); otherwise the
   full EMA ``v`` is kept;
2. ``u = g / sqrt(v)``, clipped by its root mean square: ``u /= max(1, RMS(u) / clip_threshold)``
   (RMS over the whole tensor);
3. first moment ``m = b1·m + (1 - b1)·u``;
4. factored parameters only: the instability ``(u - m)² + eps2`` is factored the same way with
   ``b3`` into ``S``, and the update is ``m / sqrt(S)``; other parameters' update is ``m``;
5. decoupled weight decay and the learning rate: ``param -= lr·(update + weight_decay·param)``.

Which axes are factored. By default a parameter with two or more dimensions is factored over its
**last two axes** and any leading axes are batched (each leading index keeps its own row and
column statistics), exactly as ``came_pytorch`` treats a tensor in its own layout. For a 2-D
matrix the result does not depend on orientation (``row ⊗ col / mean(row)`` is symmetric under
transposition), so jdit's ``(in, out)`` Dense kernels get the same updates as PyTorch's
``(out, in)`` ``nn.Linear`` weights. jdit's multi-axis kernels differ from their PyTorch
counterparts, though: the fused QKV kernel ``(D, 3, H, Dh)`` is one ``(3·H·Dh, D)`` matrix in
PyTorch, and the patch-embedding kernel ``(p, p, C, D)`` is a ``(D, C, p, p)`` conv weight that
``came_pytorch`` factors over ``(p, p)``. ``factor_axes`` reproduces any such choice per leaf:

* ``None``: the default rule above;
* ``False``: never factor (a full second moment, as PyTorch keeps for a 1-D bias that jdit
  stores with head axes, e.g. the ``(3, H, Dh)`` QKV bias);
* an int ``k``: factor the matrix ``(prod(shape[:k]), prod(shape[k:]))``, no batch axes (for a
  jdit Dense kernel, ``k`` = its number of input axes gives PyTorch's ``nn.Linear`` statistics);
* a pair ``(row_axes, col_axes)`` of axis tuples: rows are the flattened ``row_axes``, columns the
  flattened ``col_axes``, every other axis is batched (``((0,), (1,))`` on a ``(p, p, C, D)``
  kernel matches PyTorch's ``(D, C, p, p)`` conv weight).

Memory: the first moment has the parameter's shape; a factored parameter adds
``batch·(rows + cols)`` numbers for each of its two factored moments, an unfactored one a full
second moment. Unused slots hold a ``(1,)`` placeholder so every state field mirrors the
parameter tree. Statistics are kept in float32 (or the parameter dtype if wider), and updates
are returned in the gradient's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
# Per leaf: None (last two axes), an int split, or (row_axes, col_axes).
FactorSpec = bool | int | tuple[tuple[int, ...], tuple[int, ...]] | None
FactorAxes = Any  # a pytree of FactorSpec with the parameters' structure, or a callable giving one

__all__ = ["ScaleByCameState", "came", "scale_by_came"]


class ScaleByCameState(NamedTuple):
    """State of :func:`scale_by_came`; every field is a pytree with the parameters' structure.

    Attributes:
        mu: first moment ``m`` of the clipped update, the parameter's shape.
        v_row, v_col: factored second moment of ``g² + eps1`` (row and column EMAs); ``(1,)``
            placeholders for unfactored parameters.
        v: full second moment of unfactored parameters; ``(1,)`` for factored ones.
        r_row, r_col: factored EMAs of the instability ``(u - m)² + eps2``; ``(1,)`` for
            unfactored parameters.
    """

    mu: optax.Updates
    v_row: optax.Updates
    v_col: optax.Updates
    v: optax.Updates
    r_row: optax.Updates
    r_col: optax.Updates


class _View(NamedTuple):
    """How one factored parameter is laid out as ``batch_shape + (rows, cols)``."""

    perm: tuple[int, ...]  # axes order: batch axes, row axes, column axes
    shape: tuple[int, ...]  # batch_shape + (rows, cols)

    def to_view(self, x: Array) -> Array:
        if self.perm != tuple(range(x.ndim)):
            x = jnp.transpose(x, self.perm)
        return x.reshape(self.shape)

    def from_view(self, x: Array, shape: tuple[int, ...]) -> Array:
        permuted = tuple(shape[a] for a in self.perm)
        x = x.reshape(permuted)
        if self.perm != tuple(range(len(shape))):
            x = jnp.transpose(x, tuple(self.perm.index(a) for a in range(len(shape))))
        return x


def _make_view(shape: tuple[int, ...], spec: FactorSpec) -> _View | None:
    """The factored layout of a parameter of ``shape``, or None when it is not factored."""
    ndim = len(shape)
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    if spec is False:
        return None
    if spec is None:
        if ndim < 2:
            return None
        rows, cols = (ndim - 2,), (ndim - 1,)
    elif isinstance(spec, int) and not isinstance(spec, bool):
        if not 1 <= spec < ndim:
            raise ValueError(f"factor_axes split {spec} needs 1 <= split < ndim for shape {shape}")
        rows, cols = tuple(range(spec)), tuple(range(spec, ndim))
    else:
        pair: Any = spec
        try:
            rows, cols = (tuple(int(a) for a in axes) for axes in pair)
        except (TypeError, ValueError):
            raise ValueError(
                f"factor_axes entry {spec!r}: expected None, an int or (row_axes, col_axes)"
            ) from None
        rows = tuple(a % ndim if -ndim <= a < ndim else a for a in rows)
        cols = tuple(a % ndim if -ndim <= a < ndim else a for a in cols)
        used = rows + cols
        if (not rows or not cols or len(set(used)) != len(used)
                or any(not 0 <= a < ndim for a in used)):
            raise ValueError(
                f"factor_axes entry {spec!r}: row and column axes must be non-empty, distinct "
                f"axes of shape {shape}"
            )
    batch = tuple(a for a in range(ndim) if a not in rows and a not in cols)
    view_shape = tuple(shape[a] for a in batch) + (
        math.prod(shape[a] for a in rows),
        math.prod(shape[a] for a in cols),
    )
    return _View(batch + rows + cols, view_shape)


def _ema(avg: Array, new: Array, decay: float) -> Array:
    return decay * avg + (1.0 - decay) * new


def _inv_sqrt_factored(row: Array, col: Array) -> Array:
    """``1 / sqrt(row ⊗ col / mean(row))`` for row and column means over the last two axes."""
    row_factor = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))
    return row_factor[..., :, None] * jax.lax.rsqrt(col)[..., None, :]


def _rms(x: Array) -> Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def _state_dtype(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


def _resolve_views(
    tree: optax.Params, factor_axes: FactorAxes | Callable[..., Any]
) -> list[_View | None]:
    """One ``_View`` (or None) per leaf of ``tree``."""
    leaves, treedef = jax.tree.flatten(tree)
    if factor_axes is None:
        specs: list[FactorSpec] = [None] * len(leaves)
    else:
        spec_tree = factor_axes(tree) if callable(factor_axes) else factor_axes
        specs = treedef.flatten_up_to(spec_tree)
    return [_make_view(tuple(x.shape), s) for x, s in zip(leaves, specs, strict=True)]


def scale_by_came(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps1: float = 1e-30,
    eps2: float = 1e-16,
    clip_threshold: float = 1.0,
    factor_axes: FactorAxes | Callable[..., Any] = None,
) -> optax.GradientTransformation:
    """CAME's preconditioning, without learning rate or weight decay (see the module docstring).

    Args:
        b1: decay of the first moment ``m``.
        b2: decay of the (factored) second moment of ``g² + eps1``.
        b3: decay of the factored instability ``(u - m)² + eps2``.
        eps1: added to the squared gradient.
        eps2: added to the instability.
        clip_threshold: ``d`` in ``u /= max(1, RMS(u) / d)``.
        factor_axes: which axes to factor, per leaf; a pytree with the parameters' structure
            whose leaves are None, an int split or a ``(row_axes, col_axes)`` pair, or a
            callable mapping the parameter (or update) tree to one. None: every parameter with
            two or more dimensions is factored over its last two axes.

    Returns:
        An ``optax.GradientTransformation`` with state :class:`ScaleByCameState`.
    """

    def init_fn(params: optax.Params) -> ScaleByCameState:
        leaves, treedef = jax.tree.flatten(params)
        views = _resolve_views(params, factor_axes)
        fields: dict[str, list[Array]] = {k: [] for k in ScaleByCameState._fields}
        for p, view in zip(leaves, views, strict=True):
            dt = _state_dtype(p.dtype)
            if view is None:
                full, row, col = p.shape, (1,), (1,)
            else:
                full, row, col = (1,), view.shape[:-1], view.shape[:-2] + view.shape[-1:]
            shapes = {"mu": p.shape, "v": full, "v_row": row, "v_col": col, "r_row": row,
                      "r_col": col}
            for name, shape in shapes.items():  # distinct buffers, so the state can be donated
                fields[name].append(jnp.zeros(shape, dt))
        return ScaleByCameState(**{k: jax.tree.unflatten(treedef, v) for k, v in fields.items()})

    def update_leaf(
        g: Array, view: _View | None, mu: Array, v_row: Array, v_col: Array, v: Array,
        r_row: Array, r_col: Array,
    ) -> tuple[Array, ...]:
        shape, out_dtype = g.shape, g.dtype
        g = g.astype(mu.dtype)
        if view is None:
            v = _ema(v, jnp.square(g) + eps1, b2)
            u = g * jax.lax.rsqrt(v)
        else:
            g = view.to_view(g)
            sq = jnp.square(g) + eps1
            v_row = _ema(v_row, jnp.mean(sq, axis=-1), b2)
            v_col = _ema(v_col, jnp.mean(sq, axis=-2), b2)
            u = g * _inv_sqrt_factored(v_row, v_col)
        u = u / jnp.maximum(1.0, _rms(u) / clip_threshold)
        if view is None:
            mu = _ema(mu, u, b1)
            update = mu
        else:
            m = _ema(view.to_view(mu), u, b1)
            instability = jnp.square(u - m) + eps2
            r_row = _ema(r_row, jnp.mean(instability, axis=-1), b3)
            r_col = _ema(r_col, jnp.mean(instability, axis=-2), b3)
            update = view.from_view(m * _inv_sqrt_factored(r_row, r_col), shape)
            mu = view.from_view(m, shape)
        return update.astype(out_dtype), mu, v_row, v_col, v, r_row, r_col

    def update_fn(
        updates: optax.Updates, state: ScaleByCameState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByCameState]:
        del params
        leaves, treedef = jax.tree.flatten(updates)
        views = _resolve_views(updates, factor_axes)
        per_field = [jax.tree.leaves(field) for field in state]
        if not leaves:
            return updates, state
        results = [
            update_leaf(g, view, *slots)
            for g, view, *slots in zip(leaves, views, *per_field, strict=True)
        ]
        new_updates, *new_state = (jax.tree.unflatten(treedef, c) for c in zip(*results, strict=True))
        return new_updates, ScaleByCameState(*new_state)

    return optax.GradientTransformation(init_fn, update_fn)


def came(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps1: float = 1e-30,
    eps2: float = 1e-16,
    clip_threshold: float = 1.0,
    weight_decay: float | Array = 0.0,
    factor_axes: FactorAxes | Callable[..., Any] = None,
) -> optax.GradientTransformation:
    """The CAME optimizer (``came_pytorch.CAME`` semantics) as an optax transformation.

    ``param -= lr · (m / sqrt(S) + weight_decay · param)`` for factored parameters and
    ``param -= lr · (m + weight_decay · param)`` for the others; see the module docstring.
    PixArt-Σ: ``came(2e-5, weight_decay=0.0)`` with the default betas and eps.

    Args:
        learning_rate: a float or an optax schedule of the step count.
        b1, b2, b3: decays of the first moment, the second moment and the instability
            (``came_pytorch``'s ``betas``).
        eps1, eps2: regularisers of the squared gradient and of the instability (its ``eps``).
        clip_threshold: RMS threshold of the normalised update.
        weight_decay: decoupled decay, scaled by the learning rate like ``came_pytorch``'s.
        factor_axes: which axes to factor per parameter (see :func:`scale_by_came`).

    Returns:
        An ``optax.GradientTransformation``. Unless ``weight_decay`` is the number 0, its
        ``update`` needs ``params``. Works with ``optax.inject_hyperparams``.
    """
    parts = [scale_by_came(b1, b2, b3, eps1, eps2, clip_threshold, factor_axes)]
    if not (isinstance(weight_decay, int | float) and weight_decay == 0):  # arrays: keep it
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
