"""Step caches inside the compiled sampler: skip most of the transformer when it would change
little from the previous step.

A cache needs the model in three stages (:class:`Staged`): ``front`` (embeddings and the first
block; its output ``h`` and the first block's residual ``r``), ``rest`` (the remaining
blocks) and ``final`` (the output layer). At each call:

- :class:`FirstBlockCache` (diffusers' FirstBlockCache): when the first block's residual moved
  less than ``threshold`` relative to the last computed call's (mean absolute change over mean
  absolute value), the remaining blocks are skipped and their last residual reused. Decided in
  the graph with ``lax.cond``: one compile, the skip taken per call for the whole batch.
- :class:`StaticCache` (MagCache-style, calibrated once): a fixed per-call list of which calls
  reuse the remaining blocks' residual; :func:`calibrate` measures the residual changes on
  calibration inputs and picks the calls whose change is below a threshold. Static, so the
  skipped calls cost nothing on any backend (no data-dependent control flow).
- :class:`GuidanceCache` (FasterCache's CFG cache): on every ``every``-th call after the first
  the unconditional half is not computed; its output is the conditional one plus the
  difference (uncond − cond) of the last full call.

The first call always computes everything. ``sample(..., cache=...)`` threads the cache's state
through the solver's loop (:data:`jdit.sampling.solvers.THREADED`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdit.sampling.guidance import ClassifierFreeGuidance

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Staged:
    """A model function in three stages, each taking the model function's ``(x, t, *args)``:
    ``front(x, t, *args) -> (h, r, state)``, ``rest(h, state, x, t, *args) -> h`` and
    ``final(h, state, x, t, *args) -> out``. Called as a whole it is the plain forward.
    ``depth``: its number of blocks (the first one is in ``front``)."""

    front: Callable[..., tuple[Array, Array, Any]]
    rest: Callable[..., Array]
    final: Callable[..., Array]
    depth: int

    def __call__(self, x: Array, t: Array, *args: Any) -> Array:
        h, _, state = self.front(x, t, *args)
        return self.final(self.rest(h, state, x, t, *args), state, x, t, *args)


@dataclasses.dataclass(frozen=True)
class FirstBlockCache:
    threshold: float

    def __post_init__(self) -> None:
        if not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"FirstBlockCache threshold must lie in (0, 1), got {self.threshold}")


@dataclasses.dataclass(frozen=True)
class StaticCache:
    reuse: tuple[bool, ...]  # per model call: reuse the remaining blocks' residual

    def __post_init__(self) -> None:
        if self.reuse and self.reuse[0]:
            raise ValueError("StaticCache: the first call has nothing to reuse (reuse[0] must "
                             "be False)")


@dataclasses.dataclass(frozen=True)
class GuidanceCache:
    every: int = 2  # the unconditional half is skipped on calls i with i % every != 0
    inner: FirstBlockCache | StaticCache | None = None  # a block cache beside it

    def __post_init__(self) -> None:
        if int(self.every) < 2:
            raise ValueError(f"GuidanceCache.every must be >= 2, got {self.every}")


@dataclasses.dataclass(frozen=True)
class MeasureChanges:
    """No skipping: records each call's relative change of the first block's residual (for
    :func:`calibrate`; the stats' ``changes``)."""

    num_calls: int


Cache = FirstBlockCache | StaticCache | GuidanceCache | MeasureChanges


def relative_change(new: Array, old: Array) -> Array:
    """mean |new − old| / mean |old| (diffusers' FirstBlockCache measure)."""
    return jnp.mean(jnp.abs(new - old)) / jnp.maximum(jnp.mean(jnp.abs(old)), 1e-12)


def _staged_of(model_fn: Any) -> tuple[Staged, ClassifierFreeGuidance | None]:
    cfg = model_fn if isinstance(model_fn, ClassifierFreeGuidance) else None
    staged = cfg.model_fn if cfg is not None else model_fn
    if not isinstance(staged, Staged):
        raise ValueError("a step cache needs the model in stages (jdit.sampling.cache.Staged, "
                         "e.g. from jdit.sampling.cache.staged(module, ...)); got "
                         f"{type(staged).__name__}")
    return staged, cfg


class CachedModel:
    """The sampler's ``model_fn(x, t, *args)`` with a cache: :meth:`init` gives the state for
    given shapes, :meth:`__call__` ``(state, x, t, *args) -> (out, state)``."""

    def __init__(self, model_fn: Any, cache: Cache) -> None:
        self.staged, self.cfg = _staged_of(model_fn)
        self.cache = cache
        self.block = cache.inner if isinstance(cache, GuidanceCache) else cache
        if isinstance(cache, GuidanceCache) and self.cfg is None:
            raise ValueError("GuidanceCache caches the unconditional half of classifier-free "
                             "guidance: the model function must be a ClassifierFreeGuidance")

    def _inputs(self, x: Array, t: Array, args: tuple[Any, ...]
                ) -> tuple[Array, Array, tuple[Any, ...]]:
        if self.cfg is None:
            return x, t, args
        return jnp.concatenate([x, x]), jnp.concatenate([t, t]), args[1:]

    def init(self, x: Array, t: Array, *args: Any) -> dict[str, Any]:
        xx, tt, rest = self._inputs(x, t, args)
        h, r, _ = jax.eval_shape(self.staged.front, xx, tt, *rest)
        zeros = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731
        state = {"call": jnp.zeros((), jnp.int32), "blocks": jnp.zeros((), jnp.int32),
                 "skipped": jnp.zeros((), jnp.int32)}
        if self.block is not None:
            state.update(r=zeros(r), rest=zeros(h))
        if isinstance(self.cache, MeasureChanges):
            state["changes"] = jnp.zeros((self.cache.num_calls,), jnp.float32)
        if isinstance(self.cache, GuidanceCache):
            state["delta"] = jnp.zeros(x.shape, jnp.float32)
        return state

    def _blocks(self, state: dict[str, Any], h: Array, r: Array, st: Any, xt: tuple[Array, Array],
                rest: tuple[Any, ...], share: Array | None = None
                ) -> tuple[Array, dict[str, Any], Array]:
        """The remaining blocks, or their cached residual; the number of blocks run."""
        depth = self.staged.depth
        if self.block is None:
            return self.staged.rest(h, st, *xt, *rest), state, jnp.int32(depth)
        first = state["call"] == 0
        if share is not None:  # a conditional-only call: the cache holds the doubled batch
            return self.staged.rest(h, st, *xt, *rest), state, jnp.int32(depth)
        if isinstance(self.block, MeasureChanges):
            change = jnp.where(first, jnp.inf, relative_change(r, state["r"]))
            state = {**state, "changes": state["changes"].at[state["call"]].set(change)}
            skip = jnp.zeros((), jnp.bool_)
        elif isinstance(self.block, FirstBlockCache):
            skip = ~first & (relative_change(r, state["r"]) < self.block.threshold)
        else:
            table = jnp.asarray(list(self.block.reuse) or [False], jnp.bool_)
            skip = ~first & table[jnp.minimum(state["call"], len(table) - 1)]
            if not self.block.reuse:
                skip = jnp.zeros((), jnp.bool_)
        out = jax.lax.cond(skip, lambda: h + state["rest"],
                           lambda: self.staged.rest(h, st, *xt, *rest))
        # as diffusers: the reference residual is the last *computed* call's, so a run of
        # skips is measured against the same one and ends as the drift accumulates
        state = {**state, "r": jnp.where(skip, state["r"], r),
                 "rest": jnp.where(skip, state["rest"], out - h)}
        return out, state, jnp.where(skip, 1, depth).astype(jnp.int32)

    def __call__(self, state: dict[str, Any], x: Array, t: Array, *args: Any
                 ) -> tuple[Array, dict[str, Any]]:
        staged = self.staged
        if isinstance(self.cache, GuidanceCache):
            full = (state["call"] % self.cache.every == 0)
            out, state, blocks = jax.lax.cond(
                full, lambda s: self._guided_full(s, x, t, args),
                lambda s: self._guided_cond_only(s, x, t, args), state)
        else:
            xx, tt, rest = self._inputs(x, t, args)
            h, r, st = staged.front(xx, tt, *rest)
            hl, state, blocks = self._blocks(state, h, r, st, (xx, tt), rest)
            out = staged.final(hl, st, xx, tt, *rest)
            if self.cfg is not None:
                out = self.cfg.combine(out, x, t, args[0])
        return out, {**state, "call": state["call"] + 1, "blocks": state["blocks"] + blocks,
                     "skipped": state["skipped"] + (blocks < staged.depth)}

    def _guided_full(self, state: dict[str, Any], x: Array, t: Array, args: tuple[Any, ...]
                     ) -> tuple[Array, dict[str, Any], Array]:
        xx, tt, rest = self._inputs(x, t, args)
        h, r, st = self.staged.front(xx, tt, *rest)
        hl, state, blocks = self._blocks(state, h, r, st, (xx, tt), rest)
        out2 = self.staged.final(hl, st, xx, tt, *rest)
        b, c = x.shape[0], x.shape[-1]
        state = {**state, "delta": (out2[:b, ..., :c] - out2[b:, ..., :c]).astype(jnp.float32)}
        return self.cfg.combine(out2, x, t, args[0]), state, blocks

    def _guided_cond_only(self, state: dict[str, Any], x: Array, t: Array,
                          args: tuple[Any, ...]) -> tuple[Array, dict[str, Any], Array]:
        """The conditional half alone (the doubled batch's second half of every batch-sized
        argument); the unconditional output is rebuilt from the last full call's delta."""
        b = x.shape[0]
        rest = tuple(_second_half(a, b) for a in args[1:])
        h, r, st = self.staged.front(x, t, *rest)
        hl, _, blocks = self._blocks(state, h, r, st, (x, t), rest, share=jnp.ones((), jnp.bool_))
        cond = self.staged.final(hl, st, x, t, *rest)
        c = x.shape[-1]
        uncond = cond.at[..., :c].add(state["delta"].astype(cond.dtype))
        out = self.cfg.combine(jnp.concatenate([uncond, cond]), x, t, args[0])
        return out, state, (blocks + 1) // 2  # half a batch: half the work of a full call


def _second_half(a: Any, b: int) -> Any:
    """A doubled-batch argument's conditional half; anything else (parameters) as it is."""
    if isinstance(a, jax.Array | np.ndarray) and a.ndim >= 1 and a.shape[0] == 2 * b:
        return a[b:]
    return a


def calibrate(changes: Sequence[float], threshold: float, max_run: int = 1,
              every: int = 1) -> StaticCache:
    """A :class:`StaticCache` from per-call relative changes of the first block's residual
    (measured once with :class:`MeasureChanges`): reuse where the change is below ``threshold``,
    at most ``max_run`` calls in a row (then one computes). ``every``: only calls ``i`` with
    ``i % every == 0`` may reuse (beside a ``GuidanceCache(every)``, whose other calls run the
    conditional half alone and never reuse)."""
    if max_run < 1 or every < 1:
        raise ValueError(f"max_run and every must be >= 1, got {max_run}, {every}")
    reuse, run = [False], 0
    for i, c in enumerate(list(changes)[1:], start=1):
        r = bool(c < threshold) and run < max_run and i % every == 0
        reuse.append(r)
        run = run + 1 if r else (run if i % every else 0)
    return StaticCache(tuple(reuse))


def staged_text_model(module: Any, depth: int | None = None) -> Staged:
    """:class:`Staged` for ``model_fn(x, t, params, context, context_mask, **kwargs)`` of a jdit
    text-conditioned model that runs in stages (PixArt: ``apply(..., _branch="front" | "rest"
    | "final")``)."""
    def run(branch: str, x: Array, t: Array, params: Any, ctx: Array, mask: Array,
            state: Any = None) -> Any:
        return module.apply({"params": params}, x, t, context=ctx, context_mask=mask,
                            _branch=branch, _state=state)

    def front(x: Array, t: Array, params: Any, ctx: Array, mask: Array) -> tuple[Array, Array, Any]:
        state = run("front", x, t, params, ctx, mask)
        return state["h"], state["r"], state

    def rest(h: Array, state: Any, x: Array, t: Array, params: Any, ctx: Array, mask: Array
             ) -> Array:
        return run("rest", x, t, params, ctx, mask, {**state, "h": h})

    def final(h: Array, state: Any, x: Array, t: Array, params: Any, ctx: Array, mask: Array
              ) -> Array:
        return run("final", x, t, params, ctx, mask, {**state, "h": h})

    return Staged(front, rest, final, int(depth or module.depth))
