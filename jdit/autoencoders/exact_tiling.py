"""Tiled decoding that equals the untiled decoder: whole-image GroupNorm statistics.

Blended tiles (:func:`jdit.autoencoders.decode_tiled`) normalise every tile by its own GroupNorm
statistics, so a dark tile and a bright tile come out in different tones. Here every GroupNorm
uses the statistics of the *whole* image, gathered tile by tile, and tiles carry enough margin
(halo) that their cores are computed exactly; the cores partition the image, so nothing is
blended and the result is the untiled decode up to float rounding.

Layout of the work:
- the *head* (everything at latent resolution: post-quant conv, input conv, middle block with its
  attention over all pixels in query chunks, the first level's ResNets) runs whole: it is small;
- each later level is a *segment*: nearest ×2 upsampling and its conv, the level's ResNets (and
  for the last level the output norm and conv), run tile by tile from the previous level's output,
  which is stored whole. A GroupNorm's statistics depend on everything before it, so a segment with
  n GroupNorms takes n passes over its tiles to gather them (pass k runs each tile up to norm k,
  using the already-gathered statistics of norms 1..k-1, and returns the mean and squared
  deviations of its core, combined over tiles with Chan's formula), then one pass to write the
  output: about (n/2 + 1) times a segment's cost. ``store_levels`` picks which level outputs are
  stored whole; merging levels saves memory at the price of longer recomputation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.autoencoders.kl import EPS, ResnetBlock, group_norm

Array = jax.Array
Moments = tuple[Array, Array, Array]  # count, mean (B, G), sum of squared deviations (B, G)


class _Gathered(Exception):
    """Raised (at trace time) by the norm a statistics pass stops at, carrying its moments."""

    def __init__(self, moments: Moments) -> None:
        self.moments = moments


def _conv(p: Any, x: Array, dtype: Any) -> Array:
    """As :class:`jdit.autoencoders.kl.Conv` with stride 1 and SAME padding."""
    y = jax.lax.conv_general_dilated(x.astype(dtype), p["kernel"].astype(dtype), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["bias"].astype(dtype)


def _grouped(x: Array, groups: int) -> Array:
    b, h, w, c = x.shape
    return x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)


def _masked_moments(x: Array, mask: Array, groups: int) -> Moments:
    """Moments per (batch, group) over the pixels where ``mask`` (h, w) is 1."""
    g = _grouped(x, groups)
    m = mask[None, :, :, None, None]
    count = jnp.sum(mask) * g.shape[-1]
    mean = jnp.sum(g * m, axis=(1, 2, 4)) / count
    dev = jnp.sum(m * jnp.square(g - mean[:, None, None, :, None]), axis=(1, 2, 4))
    return count, mean, dev


def _combine(moments: Moments) -> tuple[Array, Array]:
    """Per-tile moments (leading tile axis) -> whole-image mean and variance (Chan et al.)."""
    count, mean, dev = moments
    n = count[:, None, None]
    total = jnp.sum(count)
    whole = jnp.sum(n * mean, axis=0) / total
    m2 = jnp.sum(dev + n * jnp.square(mean - whole), axis=0)
    return whole, m2 / total


def _normalize(x: Array, p: Any, mean: Array, var: Array, groups: int) -> Array:
    b, h, w, c = x.shape
    s = (slice(None), None, None, slice(None), None)
    g = (_grouped(x, groups) - mean[s]) * jax.lax.rsqrt(var[s] + EPS)
    g = g.reshape(b, h, w, c) * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return g.astype(x.dtype)


def _attention(p: Any, x: Array, groups: int, dtype: Any, chunk: int) -> Array:
    """The middle block's single-head attention over all pixels, queries in chunks (the
    logits of a 2K latent would need 17 GB at once)."""
    b, h, w, c = x.shape
    t = group_norm(x, groups, p["norm"]["scale"], p["norm"]["bias"]).astype(x.dtype)
    t = t.reshape(b, h * w, c)

    def dense(name: str, y: Array) -> Array:
        return y.astype(dtype) @ p[name]["kernel"].astype(dtype) + p[name]["bias"].astype(dtype)

    q, k, v = dense("q", t), dense("k", t), dense("v", t)

    def attend(qc: Array) -> Array:
        logits = jnp.einsum("bqc,bkc->bqk", qc, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * c ** -0.5, axis=-1).astype(dtype)
        return jnp.einsum("bqk,bkc->bqc", weights, v)

    n = h * w
    if n <= chunk:
        o = attend(q)
    else:
        pad = -n % chunk
        qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, c).swapaxes(0, 1)
        o = jax.lax.map(attend, qs).swapaxes(0, 1).reshape(b, n + pad, c)[:, :n]
    return x + dense("out", o).reshape(b, h, w, c).astype(x.dtype)


def _head(vae: Any, params: Any, latents: Array, chunk: int) -> Array:
    """Everything at latent resolution, whole: up to the first level's last ResNet."""
    g, dt = vae.norm_num_groups, vae.dtype
    x = latents.astype(dt)
    if vae.use_post_quant_conv:
        x = _conv(params["post_quant_conv"], x, dt)
    x = _conv(params["dec_in"], x, dt)
    c = x.shape[-1]
    mid = params["dec_mid"]
    x = ResnetBlock(c, g, dt).apply({"params": mid["resnet_0"]}, x)
    if vae.mid_block_add_attention:
        x = _attention(mid["attn"], x, g, dt, chunk)
    x = ResnetBlock(c, g, dt).apply({"params": mid["resnet_1"]}, x)
    for i in range(vae.layers_per_block + 1):
        x = ResnetBlock(vae.block_out_channels[-1], g, dt).apply(
            {"params": params[f"dec_blocks_0_{i}"]}, x)
    return x


def _segment_ops(vae: Any, levels: Sequence[int]) -> list[tuple[str, str, int]]:
    """(kind, parameter name, scale relative to the segment input) for the given levels."""
    ops, scale, last = [], 1, len(vae.block_out_channels) - 1
    for level in levels:
        scale *= 2
        ops.append(("upsample", f"dec_up_{level - 1}", scale))
        ops += [("resnet", f"dec_blocks_{level}_{i}", scale)
                for i in range(vae.layers_per_block + 1)]
        if level == last:
            ops.append(("out", "", scale))
    return ops


def _halo(ops: list[tuple[str, str, int]]) -> int:
    """Input pixels of margin a tile needs: each 3×3 conv at scale s widens the wrong border of a
    window by one of its pixels, 1/s input pixels."""
    convs = {"upsample": 1, "resnet": 2, "out": 1}
    return math.ceil(sum(convs[kind] / scale for kind, _, scale in ops))


def _run(ops: list[tuple[str, str, int]], params: Any, x: Array, vae: Any,
         stats: Sequence[tuple[Array, Array]], stop: int | None,
         mask: Callable[[int], Array]) -> Array:
    """The segment on one window; the GroupNorms use ``stats`` in order; with ``stop`` the pass
    raises the moments of norm number ``stop``'s input over the tile's core."""
    g, dt = vae.norm_num_groups, vae.dtype
    site = 0

    def norm(h: Array, p: Any, scale: int) -> Array:
        nonlocal site
        if site == stop:
            raise _Gathered(_masked_moments(h, mask(scale), g))
        out = _normalize(h, p, *stats[site], g)
        site += 1
        return out

    for kind, name, scale in ops:
        if kind == "upsample":
            b, h, w, c = x.shape
            x = jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c))
            x = _conv(params[name], x.reshape(b, 2 * h, 2 * w, c), dt)
        elif kind == "resnet":
            p = params[name]
            y = _conv(p["conv1"], nn.silu(norm(x, p["norm1"], scale)), dt)
            y = _conv(p["conv2"], nn.silu(norm(y, p["norm2"], scale)), dt)
            if "shortcut" in p:  # 1×1
                x = _conv(p["shortcut"], x, dt)
            x = x + y
        else:
            x = _conv(params["dec_out"], nn.silu(norm(x, params["dec_norm"], scale)), dt)
    return x


def _windows(size: int, core: int, halo: int) -> tuple[int, list[tuple[int, int, int]]]:
    """Window length and (window start, core start, core end) along one axis: cores partition
    [0, size); windows have one length, shifted inward at the edges (so the image border is a
    window border, padded as the untiled decoder pads it)."""
    length = min(size, core + 2 * halo)
    spans = []
    for a in range(0, size, core):
        b = min(a + core, size)
        s = min(max(a - halo, 0), size - length)
        spans.append((s, a, b))
    return length, spans


def _segment(ops: list[tuple[str, str, int]], params: Any, x: Array, vae: Any,
             core: int, out_c: int) -> Array:
    """Run a segment tile by tile over the stored input ``x`` (B, H, W, C); ``core``: tile core
    in input pixels; ``out_c``: the segment's output channels."""
    b, h, w, _ = x.shape
    halo = _halo(ops)
    wh, ys = _windows(h, core, halo)
    ww, xs = _windows(w, core, halo)
    spans = [(y, x_) for y in ys for x_ in xs]
    table = jnp.array([[y[0], y[1] - y[0], y[2] - y[0], x_[0], x_[1] - x_[0], x_[2] - x_[0]]
                       for y, x_ in spans], jnp.int32)  # window start, core lo / hi (window)
    n_norms = sum(2 if kind == "resnet" else kind == "out" for kind, _, _ in ops)
    factor = ops[-1][2]

    def window(row: Array) -> tuple[Array, Callable[[int], Array]]:
        win = jax.lax.dynamic_slice(x, (0, row[0], row[3], 0), (b, wh, ww, x.shape[-1]))

        def mask(scale: int) -> Array:
            iy = jnp.arange(wh * scale)[:, None]
            ix = jnp.arange(ww * scale)[None, :]
            inside = ((iy >= row[1] * scale) & (iy < row[2] * scale)
                      & (ix >= row[4] * scale) & (ix < row[5] * scale))
            return inside.astype(jnp.float32)

        return win, mask

    stats: list[tuple[Array, Array]] = []
    for k in range(n_norms):
        def gather(row: Array, k: int = k) -> Moments:
            win, mask = window(row)
            try:
                _run(ops, params, win, vae, stats, k, mask)
            except _Gathered as found:
                return found.moments
            raise AssertionError(f"norm {k} not reached")  # the op list counts the norms

        stats.append(_combine(jax.lax.map(gather, table)))

    out = jnp.zeros((b, h * factor, w * factor, out_c), vae.dtype)

    def write(out: Array, row: Array) -> tuple[Array, None]:
        win, mask = window(row)
        y = _run(ops, params, win, vae, stats, None, mask) * mask(factor)[None, :, :, None]
        at = (0, row[0] * factor, row[3] * factor, 0)
        region = jax.lax.dynamic_slice(out, at, y.shape)
        return jax.lax.dynamic_update_slice(out, region + y.astype(out.dtype), at), None

    return jax.lax.scan(write, out, table)[0]


def decode_tiled_exact(vae: Any, params: Any, latents: Array, tile: int = 64,
                       store_levels: Sequence[int] | None = None,
                       attention_chunk: int = 4096) -> Array:
    """``vae.decode`` of (B, h, w, C) latents, tile by tile, equal to the untiled decode.

    ``tile``: the tile core in latents (64: 512-pixel tiles). ``store_levels``: decoder levels
    (1 .. levels-1) whose input is stored whole and starts a new segment; default: all of them
    (fewest recomputations; the largest stored map is the second-to-last level's output, half the
    image's resolution). ``(1,)`` keeps only latent-resolution maps whole at roughly three times
    the compute. ``attention_chunk``: queries per chunk of the middle attention. Jit-friendly.
    """
    levels = list(range(1, len(vae.block_out_channels)))
    starts = sorted(set(levels if store_levels is None else store_levels) | {1})
    if not set(starts) <= set(levels):
        raise ValueError(f"store_levels must be among {levels}, got {list(store_levels or [])}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1 latent, got {tile}")
    x = _head(vae, params, latents, attention_chunk)
    if not levels:  # a one-level VAE: no upsampling, the head is all but the output conv
        ops: list[tuple[str, str, int]] = [("out", "", 1)]
        return _segment(ops, params, x, vae, tile, vae.out_channels).astype(jnp.float32)
    bounds = starts + [levels[-1] + 1]
    scale = 1
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        ops = _segment_ops(vae, range(lo, hi))
        out_c = vae.out_channels if hi > levels[-1] else vae.block_out_channels[::-1][hi - 1]
        x = _segment(ops, params, x, vae, tile * scale, out_c)
        scale = ops[-1][2] * scale
    return x.astype(jnp.float32)
