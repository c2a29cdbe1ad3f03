"""Tiled AutoencoderKL decoding and encoding that equal the untiled ones: whole-image GroupNorm
statistics.

Blended tiles (:func:`jdit.autoencoders.decode_tiled`) normalise every tile by its own GroupNorm
statistics, so a dark tile and a bright tile come out in different tones. Here every GroupNorm
uses the statistics of the *whole* image, gathered tile by tile, and tiles carry enough margin
(halo) that their cores are computed exactly; the cores partition the image, so nothing is
blended and the result is the untiled decode (or encode) up to float rounding.

Layout of the work:
- everything at latent resolution runs whole: it is small. Decoding, the *head*: post-quant conv,
  input conv, middle block with its attention over all pixels in query chunks, the first level's
  ResNets; encoding, the *tail*: the last level's ResNets, the middle block, the output norm and
  conv, the quant conv;
- the rest is cut into *segments* of whole levels, each run tile by tile from the previous
  segment's output, which is stored whole. Decoding, a level is nearest ×2 upsampling and its
  conv, then the level's ResNets (and for the last level the output norm and conv); encoding, a
  level is its ResNets then the stride-2 downsampling conv (the first level starts with the
  input conv). A GroupNorm's statistics depend on everything before it, so a segment with n
  GroupNorms takes n passes over its tiles to gather them (pass k runs each tile up to norm k,
  using the already-gathered statistics of norms 1..k-1, and returns the mean and squared
  deviations of its core, combined over tiles with Chan's formula), then one pass to write the
  output: about (n/2 + 1) times a segment's cost. ``store_levels`` picks which level boundaries
  are stored whole; merging levels saves memory at the price of longer recomputation.

The encoder's downsampling conv (diffusers' ``Downsample2D``: pad right and bottom by one, 3×3,
stride 2) reads input pixels 2i .. 2i + 2 for output pixel i, so a window must start on an even
pixel of every resolution it passes through: window starts, tile cores and halos are multiples
of the segment's total downsampling, and the image sides multiples of the VAE's factor.

Only :class:`jdit.autoencoders.AutoencoderKL` is supported. :class:`AutoencoderDC` (SANA's
DC-AE) is refused: its norms are per pixel, but its EfficientViT stages attend over the whole
image through ReLU linear attention, so an exact tiled DC-AE would gather each attention layer's
key-value sums over the tiles (the role GroupNorm statistics play here) through a second
functional port of its stage variants (stem-only stages, pixel-(un)shuffle or strided
resampling, multi-scale projections); that port is not written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdit.autoencoders.kl import EPS, AutoencoderKL, GroupNorm, ResnetBlock, group_norm

Array = jax.Array
Moments = tuple[Array, Array, Array]  # count, mean (B, G), sum of squared deviations (B, G)
# (kind, parameter name, resolution of the op's output relative to the segment's input)
Op = tuple[str, str, Fraction]
CONVS = {"conv": 1, "down": 1, "upsample": 1, "resnet": 2, "out": 1}  # 3×3 convs per op kind
NORMS = {"resnet": 2, "out": 1}  # GroupNorms per op kind


class _Gathered(Exception):
    """Raised (at trace time) by the norm a statistics pass stops at, carrying its moments."""

    def __init__(self, moments: Moments) -> None:
        self.moments = moments


def _check_vae(vae: Any, what: str) -> None:
    if not isinstance(vae, AutoencoderKL):
        raise TypeError(f"{what} supports AutoencoderKL only (GroupNorm statistics gathered over "
                        f"tiles), got {type(vae).__name__}; see jdit.autoencoders.exact_tiling "
                        f"for why AutoencoderDC is not tiled exactly")


def _px(n: Any, scale: Fraction) -> Any:
    """``n`` segment-input pixels counted at resolution ``scale`` (exact: windows, cores and
    halos are aligned to every resolution they pass through). ``n``: an int or a traced int."""
    return n * scale.numerator // scale.denominator


def _conv(p: Any, x: Array, dtype: Any, stride: int = 1, padding: Any = "SAME") -> Array:
    """As :class:`jdit.autoencoders.kl.Conv`."""
    y = jax.lax.conv_general_dilated(x.astype(dtype), p["kernel"].astype(dtype),
                                     (stride, stride), padding,
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


def _resnet(vae: Any, p: Any, x: Array) -> Array:
    """One ResNet block, whole."""
    block = ResnetBlock(p["conv1"]["kernel"].shape[-1], vae.norm_num_groups, vae.dtype)
    return block.apply({"params": p}, x)


def _middle(vae: Any, p: Any, x: Array, chunk: int) -> Array:
    """The middle block (ResNet, attention in query chunks, ResNet), whole."""
    x = _resnet(vae, p["resnet_0"], x)
    if vae.mid_block_add_attention:
        x = _attention(p["attn"], x, vae.norm_num_groups, vae.dtype, chunk)
    return _resnet(vae, p["resnet_1"], x)


def _head(vae: Any, params: Any, latents: Array, chunk: int) -> Array:
    """The decoder at latent resolution, whole: up to the first level's last ResNet."""
    x = latents.astype(vae.dtype)
    if vae.use_post_quant_conv:
        x = _conv(params["post_quant_conv"], x, vae.dtype)
    x = _middle(vae, params["dec_mid"], _conv(params["dec_in"], x, vae.dtype), chunk)
    for i in range(vae.layers_per_block + 1):
        x = _resnet(vae, params[f"dec_blocks_0_{i}"], x)
    return x


def _tail(vae: Any, params: Any, x: Array, chunk: int) -> Array:
    """The encoder at latent resolution, whole: from the last level's first ResNet to the
    posterior mean."""
    last = len(vae.block_out_channels) - 1
    for i in range(vae.layers_per_block):
        x = _resnet(vae, params[f"enc_blocks_{last}_{i}"], x)
    x = _middle(vae, params["enc_mid"], x, chunk)
    x = nn.silu(GroupNorm(vae.norm_num_groups, vae.param_dtype).apply(
        {"params": params["enc_norm"]}, x))
    x = _conv(params["enc_out"], x, vae.dtype)
    if vae.use_quant_conv:
        x = _conv(params["quant_conv"], x, vae.dtype)
    return x[..., : vae.latent_channels].astype(jnp.float32)


def _decoder_ops(vae: Any, levels: Sequence[int]) -> list[Op]:
    """The decoder's ops for the given levels (each from its upsampling on)."""
    ops, scale, last = [], Fraction(1), len(vae.block_out_channels) - 1
    for level in levels:
        scale *= 2
        ops.append(("upsample", f"dec_up_{level - 1}", scale))
        ops += [("resnet", f"dec_blocks_{level}_{i}", scale)
                for i in range(vae.layers_per_block + 1)]
        if level == last:
            ops.append(("out", "", scale))
    return ops


def _encoder_ops(vae: Any, levels: Sequence[int]) -> list[Op]:
    """The encoder's ops for the given levels (each up to its downsampling; level 0 from the
    input conv on, and with no levels, only the input conv)."""
    scale = Fraction(1)
    ops: list[Op] = [("conv", "enc_in", scale)] if not levels or levels[0] == 0 else []
    for level in levels:
        ops += [("resnet", f"enc_blocks_{level}_{i}", scale)
                for i in range(vae.layers_per_block)]
        scale /= 2
        ops.append(("down", f"enc_down_{level}", scale))
    return ops


def _halo(ops: list[Op]) -> int:
    """Segment-input pixels of margin a tile needs: each 3×3 conv widens the wrong border of a
    window by one pixel of its input, 1/s segment-input pixels at resolution s; a stride-2 conv
    then rounds the border up to whole output pixels. The halo is rounded up to whole pixels of
    the coarsest resolution, so that windows start on every stride's grid."""
    halo, coarsest = Fraction(0), Fraction(1)
    for kind, _, scale in ops:
        if kind == "down":  # the conv reads the finer grid, then the border rounds up
            halo += CONVS[kind] / (2 * scale)
            halo = math.ceil(halo * scale) / scale
            coarsest = min(coarsest, scale)
        else:
            halo += CONVS[kind] / scale
    return int(math.ceil(halo * coarsest) / coarsest)


def _run(ops: list[Op], params: Any, x: Array, vae: Any,
         stats: Sequence[tuple[Array, Array]], stop: int | None,
         mask: Callable[[Fraction], Array]) -> Array:
    """The segment on one window; the GroupNorms use ``stats`` in order; with ``stop`` the pass
    raises the moments of norm number ``stop``'s input over the tile's core."""
    g, dt = vae.norm_num_groups, vae.dtype
    site = 0

    def norm(h: Array, p: Any, scale: Fraction) -> Array:
        nonlocal site
        if site == stop:
            raise _Gathered(_masked_moments(h, mask(scale), g))
        out = _normalize(h, p, *stats[site], g)
        site += 1
        return out

    for kind, name, scale in ops:
        if kind == "conv":
            x = _conv(params[name], x, dt)
        elif kind == "down":  # diffusers' Downsample2D: pad right and bottom, 3×3 stride 2
            x = _conv(params[name], x, dt, stride=2, padding=((0, 1), (0, 1)))
        elif kind == "upsample":
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
    window border, padded as the untiled network pads it)."""
    length = min(size, core + 2 * halo)
    spans = []
    for a in range(0, size, core):
        b = min(a + core, size)
        s = min(max(a - halo, 0), size - length)
        spans.append((s, a, b))
    return length, spans


def _segment(ops: list[Op], params: Any, x: Array, vae: Any, core: int, out_c: int) -> Array:
    """Run a segment tile by tile over the stored input ``x`` (B, H, W, C); ``core``: tile core
    in input pixels; ``out_c``: the segment's output channels."""
    b, h, w, _ = x.shape
    halo = _halo(ops)
    wh, ys = _windows(h, core, halo)
    ww, xs = _windows(w, core, halo)
    spans = [(y, x_) for y in ys for x_ in xs]
    factor = ops[-1][2]
    grid = min([Fraction(1)] + [scale for _, _, scale in ops]).denominator
    if any(n % grid for n in (wh, ww, *(i for y, x_ in spans for i in y + x_))):
        raise AssertionError(f"windows off the stride grid {grid}: {wh}, {ww}, {spans}")
    table = jnp.array([[y[0], y[1] - y[0], y[2] - y[0], x_[0], x_[1] - x_[0], x_[2] - x_[0]]
                       for y, x_ in spans], jnp.int32)  # window start, core lo / hi (window)

    def window(row: Array) -> tuple[Array, Callable[[Fraction], Array]]:
        win = jax.lax.dynamic_slice(x, (0, row[0], row[3], 0), (b, wh, ww, x.shape[-1]))

        def mask(scale: Fraction) -> Array:
            iy = jnp.arange(_px(wh, scale))[:, None]
            ix = jnp.arange(_px(ww, scale))[None, :]
            inside = ((iy >= _px(row[1], scale)) & (iy < _px(row[2], scale))
                      & (ix >= _px(row[4], scale)) & (ix < _px(row[5], scale)))
            return inside.astype(jnp.float32)

        return win, mask

    stats: list[tuple[Array, Array]] = []
    for k in range(sum(NORMS.get(kind, 0) for kind, _, _ in ops)):
        def gather(row: Array, k: int = k) -> Moments:
            win, mask = window(row)
            try:
                _run(ops, params, win, vae, stats, k, mask)
            except _Gathered as found:
                return found.moments
            raise AssertionError(f"norm {k} not reached")  # the op list counts the norms

        stats.append(_combine(jax.lax.map(gather, table)))

    out = jnp.zeros((b, _px(h, factor), _px(w, factor), out_c), vae.dtype)

    def write(out: Array, row: Array) -> tuple[Array, None]:
        win, mask = window(row)
        y = _run(ops, params, win, vae, stats, None, mask) * mask(factor)[None, :, :, None]
        at = (0, _px(row[0], factor), _px(row[3], factor), 0)
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
    _check_vae(vae, "decode_tiled_exact")
    levels = list(range(1, len(vae.block_out_channels)))
    starts = sorted(set(levels if store_levels is None else store_levels) | {1})
    if not set(starts) <= set(levels):
        raise ValueError(f"store_levels must be among {levels}, got {list(store_levels or [])}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1 latent, got {tile}")
    x = _head(vae, params, latents, attention_chunk)
    if not levels:  # a one-level VAE: no upsampling, the head is all but the output conv
        ops: list[Op] = [("out", "", Fraction(1))]
        return _segment(ops, params, x, vae, tile, vae.out_channels).astype(jnp.float32)
    bounds = starts + [levels[-1] + 1]
    scale = 1
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        ops = _decoder_ops(vae, range(lo, hi))
        out_c = vae.out_channels if hi > levels[-1] else vae.block_out_channels[::-1][hi - 1]
        x = _segment(ops, params, x, vae, tile * scale, out_c)
        scale *= int(ops[-1][2])
    return x.astype(jnp.float32)


def encode_tiled_exact(vae: Any, params: Any, images: Array, tile: int = 512,
                       store_levels: Sequence[int] | None = None,
                       attention_chunk: int = 4096) -> Array:
    """``vae.encode`` of (B, H, W, in_channels) images in [-1, 1], tile by tile: the posterior
    mean (B, H/f, W/f, latent_channels), float32, equal to the untiled encode.

    ``tile``: the tile core in image pixels, a multiple of the VAE's factor f
    (:attr:`AutoencoderKL.scale_factor`); H and W must be multiples of f too (the untiled encoder
    floors other sizes; those are refused here). The tile need not divide the image: the last
    tiles are cut short. ``store_levels``: encoder levels (1 .. levels-1) whose input (the
    previous level's downsampled output) is stored whole and starts a new segment; the last
    level's input (latent resolution) always is. Default: all of them (fewest recomputations;
    the largest stored map is the first level's output, at half the image's resolution).
    ``(levels - 1,)`` keeps only the image and latent-resolution maps whole, at several times
    the compute. ``attention_chunk``: queries per chunk of the middle attention. Jit-friendly.
    """
    _check_vae(vae, "encode_tiled_exact")
    n_levels, f = len(vae.block_out_channels), vae.scale_factor
    if images.ndim != 4 or images.shape[-1] != vae.in_channels:
        raise ValueError(f"images must be (B, H, W, {vae.in_channels}) (NHWC, the VAE's "
                         f"in_channels), got shape {tuple(images.shape)}")
    if tile < 1 or tile % f:
        raise ValueError(f"tile must be a positive multiple of the VAE's downsampling factor "
                         f"{f} (image pixels), got {tile}")
    if images.shape[1] % f or images.shape[2] % f:
        raise ValueError(f"image height and width must be multiples of the VAE's downsampling "
                         f"factor {f}, got {images.shape[1]} x {images.shape[2]}")
    levels = list(range(1, n_levels))
    stored = set(levels if store_levels is None else store_levels)
    if not stored <= set(levels):
        raise ValueError(f"store_levels must be among {levels}, got {list(store_levels or [])}")
    bounds = sorted({0, n_levels - 1} | stored)
    # segments of levels [lo, hi); a one-level VAE has none but tiles its input conv, (0, 0)
    segments = list(zip(bounds[:-1], bounds[1:], strict=True)) or [(0, 0)]
    x = images
    for lo, hi in segments:
        out_c = vae.block_out_channels[max(hi - 1, 0)]  # the downsampling's (or input conv's)
        x = _segment(_encoder_ops(vae, range(lo, hi)), params, x, vae, tile >> lo, out_c)
    return _tail(vae, params, x, attention_chunk)
