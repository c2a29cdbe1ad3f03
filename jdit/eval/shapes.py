"""The exact evaluator of the embedded ``shapes`` data (:mod:`jdit.data.shapes`).

:func:`detect` reads the objects back from an image and :func:`score` compares them with the
prompt (:func:`scores` and :func:`adherence` for batches): prompt adherence, GenEval-style
(:func:`locate_batch` adds where each object is, for :mod:`jdit.eval.moving_shapes`). The
evaluator is exact on rendered images and tolerant of blur, pixel noise, dimming and slightly
off colours, but an object with any wrong attribute, a missing or an extra object fails. Images
may be ``uint8`` (read as [0, 255]) or floating (read as [-1, 1], the model's output range).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from jdit.data.shapes import (
    ALL_COLORS,
    ALL_SHAPES,
    COLORS,
    POSITIONS,
    SHAPES,
    Obj,
    canonical,
    parse_caption,
)

UNKNOWN = "unknown"
"""Colour or shape :func:`detect` reports for an object that matches no palette colour or shape."""

_MIN_SIZE_DIVISOR = 24
_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], np.float32) / 255.0
# extended=True: the new concepts of jdit.data.shapes too (purple, diamond)
_ALL_COLOR_NAMES = tuple(ALL_COLORS)
_ALL_PALETTE = np.array([ALL_COLORS[c] for c in _ALL_COLOR_NAMES], np.float32) / 255.0
_POS_INDEX = {p: i for i, p in enumerate(POSITIONS)}


def _as_unit(images: np.ndarray) -> np.ndarray:
    """Images to float32 [0, 1]: ``uint8`` is read as [0, 255], floating types as [-1, 1]."""
    images = np.asarray(images)
    if images.shape[-1:] != (3,):
        raise ValueError(f"images must end in 3 RGB channels, got shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if np.issubdtype(images.dtype, np.floating):
        return np.clip((images.astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)
    raise ValueError(f"images must be uint8 [0, 255] or float [-1, 1], got dtype {images.dtype}")


def _components(fg: np.ndarray, cls: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of the foreground ``fg`` (N, H, W), batched.

    ``cls`` (N, H, W), if given, holds each pixel's colour class; neighbours then join only if
    their classes are equal. Returns the flat indices (into the (N, H, W) batch) of the
    foreground pixels and, for each, a component id (the position of the component's first
    pixel in that list). Works on a padded grid (one empty row below and one empty column either
    side of every image) so flat neighbour offsets never wrap, and on the foreground pixels only:
    min-label propagation over the neighbour edges with pointer jumping.
    """
    n, h, w = fg.shape
    wp = w + 2
    grid = np.zeros((n, h + 1, wp), bool)
    grid[:, :h, 1 : w + 1] = fg
    flat = grid.reshape(-1)
    if cls is not None:
        grid_cls = np.full((n, h + 1, wp), -1, np.int16)
        grid_cls[:, :h, 1 : w + 1] = cls
        flat_cls = grid_cls.reshape(-1)
    pix = np.flatnonzero(flat)
    us, vs = [], []
    for off in (1, wp - 1, wp, wp + 1):
        both = flat[:-off] & flat[off:]
        if cls is not None:
            both &= flat_cls[:-off] == flat_cls[off:]
        link = np.flatnonzero(both)
        us.append(link)
        vs.append(link + off)
    where = np.zeros(flat.size, np.int64)
    where[pix] = np.arange(len(pix))
    u, v = where[np.concatenate(us)], where[np.concatenate(vs)]
    lab = np.arange(len(pix))
    while True:
        m = np.minimum(lab[u], lab[v])
        new = lab.copy()
        np.minimum.at(new, u, m)
        np.minimum.at(new, v, m)
        new = new[new]  # pointer jumping: a label is a pixel of the same component
        new = new[new]
        if np.array_equal(new, lab):
            break
        lab = new
    img, rem = np.divmod(pix, (h + 1) * wp)
    y, xp = np.divmod(rem, wp)
    return (img * h + y) * w + (xp - 1), lab


def _smooth(value: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (σ in pixels) of an (N, H, W) array, zero padded."""
    if sigma <= 0:
        return value
    r = max(1, int(np.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    h, w = value.shape[1:]
    p = np.pad(value, ((0, 0), (r, r), (0, 0)))
    out = sum(k[i] * p[:, i : i + h] for i in range(2 * r + 1))
    p = np.pad(out, ((0, 0), (0, 0), (r, r)))
    return sum(k[i] * p[:, :, i : i + w] for i in range(2 * r + 1))


def _measure(
    images: np.ndarray,
    threshold: float,
    floor: float,
    min_peak: float,
    min_size: int | None,
    smooth: float,
    palette: np.ndarray = _PALETTE,
    split_cells: bool = True,
) -> dict[str, np.ndarray]:
    """Segment a batch into objects and measure each (see :func:`detect` for the steps;
    ``split_cells=False`` skips the split along cell borders, :func:`locate_batch`).

    Returns one array entry per object: ``image`` (batch index), ``color`` (palette index),
    ``hue_off`` (mean distance of its pixels' full-brightness colour from that palette colour),
    ``position`` (grid index of the centroid), ``area`` (pixels), ``extent`` (larger side of
    the bounding box, in cells), ``fill`` (area / box area), ``aspect`` (box width / height),
    ``top_bottom`` (area in the upper half of the box / area in the lower half), ``skew_x``,
    ``skew_y`` (standardised third moments), ``kurt_axis``, ``kurt_diag`` (standardised fourth
    moments, averaged over the two axes and over the two diagonals), ``elong`` (ratio of the
    principal second moments) and ``cx``, ``cy`` (centroid in pixels, pixel ``(i, j)`` covering
    ``[j, j + 1) x [i, i + 1)``).
    """
    x = _as_unit(images)
    if x.ndim != 4:
        raise ValueError(f"expected a batch (N, H, W, 3), got shape {x.shape}")
    n, h, w, _ = x.shape
    ch, cw = h / 3.0, w / 3.0
    if min_size is None:
        min_size = max(3, round(ch * cw / _MIN_SIZE_DIVISOR))

    # 1. Foreground: per blob above the floor, the pixels above `threshold` x its peak.
    value = _smooth(np.maximum(np.maximum(x[..., 0], x[..., 1]), x[..., 2]), smooth * ch)
    idx, blob = _components(value > floor)
    val = value.reshape(-1)[idx]
    order = np.lexsort((val, blob))
    ids, starts, counts = np.unique(blob[order], return_index=True, return_counts=True)
    peak = np.zeros(len(idx))
    peak[ids] = val[order][starts + ((counts - 1) * 0.9).astype(np.int64)]
    keep = (val > threshold * peak[blob]) & (peak[blob] >= min_peak)
    fg = np.zeros(n * h * w, bool)
    fg[idx[keep]] = True
    fg = fg.reshape(n, h, w)

    # 2. Colour class per foreground pixel: nearest palette colour at full brightness.
    rgb = x[fg]
    chroma = rgb / np.maximum(rgb.max(-1, keepdims=True), 1e-6)
    d2 = ((chroma[:, None, :] - palette) ** 2).sum(-1)
    cls = np.zeros(fg.shape, np.int16)
    cls[fg] = np.argmin(d2, -1)
    off = np.zeros(fg.shape, np.float32)
    off[fg] = np.sqrt(d2.min(-1))

    # 3. Objects: connected pixels of one colour, split along cell borders when they hold
    # two or more substantial parts; small ones are noise.
    idx, comp = _components(fg, cls)
    img_i, rem = np.divmod(idx, h * w)
    ys, xs = np.divmod(rem, w)
    col = cls.reshape(-1)[idx].astype(np.int64)
    hue = off.reshape(-1)[idx]
    cell = np.minimum((ys + 0.5) // ch, 2).astype(np.int64) * 3 + np.minimum(
        (xs + 0.5) // cw, 2
    ).astype(np.int64)
    _, c_inv, c_area = np.unique(comp, return_inverse=True, return_counts=True)
    part = comp * 9 + cell
    _, p_inv, p_area = np.unique(part, return_inverse=True, return_counts=True)
    big = (p_area[p_inv] >= 0.25 * c_area[c_inv]) & (p_area[p_inv] >= min_size)
    _, first = np.unique(p_inv, return_index=True)
    n_big = np.bincount(c_inv[first], weights=big[first], minlength=len(c_area))
    split = (n_big[c_inv] >= 2) & split_cells
    key = np.where(split, part * 2 + 1, comp * 18)  # odd: a part, even: a whole component
    keep = ~split | big
    _, inv, area = np.unique(key[keep], return_inverse=True, return_counts=True)
    keep[keep] = area[inv] >= min_size
    key, img_i, ys, xs, col, hue = (a[keep] for a in (key, img_i, ys, xs, col, hue))
    _, inv, area = np.unique(key, return_inverse=True, return_counts=True)
    k = len(area)
    if k == 0:
        return {name: np.zeros(0, np.int64) for name in _FEATURES}

    # 4. Measurements.
    def mean(v: np.ndarray) -> np.ndarray:
        return np.bincount(inv, weights=v, minlength=k) / area

    order = np.argsort(inv, kind="stable")
    starts = np.concatenate([[0], np.cumsum(area)[:-1]])
    y0, y1 = np.minimum.reduceat(ys[order], starts), np.maximum.reduceat(ys[order], starts)
    x0, x1 = np.minimum.reduceat(xs[order], starts), np.maximum.reduceat(xs[order], starts)
    bh, bw = y1 - y0 + 1, x1 - x0 + 1
    mid = (y0 + y1) / 2.0
    upper = area * mean((ys < mid[inv]) + 0.5 * (ys == mid[inv]))
    cy, cx = mean(ys + 0.5), mean(xs + 0.5)
    dy, dx = ys + 0.5 - cy[inv], xs + 0.5 - cx[inv]
    du, dv = (dx + dy) / np.sqrt(2.0), (dx - dy) / np.sqrt(2.0)
    vy, vx, vxy, vu, vv = mean(dy**2), mean(dx**2), mean(dx * dy), mean(du**2), mean(dv**2)
    half_tr = (vx + vy) / 2.0
    disc = np.sqrt(np.maximum(half_tr**2 - (vx * vy - vxy**2), 0.0))
    image_of = np.zeros(k, np.int64)
    color = np.zeros(k, np.int64)
    image_of[inv] = img_i
    color[inv] = col  # an object never mixes colour classes
    with np.errstate(divide="ignore", invalid="ignore"):  # one-pixel-wide objects
        return {
            "image": image_of,
            "color": color,
            "hue_off": mean(hue),
            "position": np.minimum(cy // ch, 2).astype(np.int64) * 3
            + np.minimum(cx // cw, 2).astype(np.int64),
            "area": area,
            "extent": np.maximum(bh / ch, bw / cw),
            "fill": area / (bh * bw),
            "aspect": bw / bh,
            "top_bottom": upper / (area - upper),
            "skew_x": mean(dx**3) / vx**1.5,
            "skew_y": mean(dy**3) / vy**1.5,
            "kurt_axis": (mean(dx**4) / vx**2 + mean(dy**4) / vy**2) / 2.0,
            "kurt_diag": (mean(du**4) / vu**2 + mean(dv**4) / vv**2) / 2.0,
            "elong": (half_tr + disc) / (half_tr - disc),
            "cx": cx,
            "cy": cy,
        }


_FEATURES = (
    "image", "color", "hue_off", "position", "area", "extent", "fill", "aspect", "top_bottom",
    "skew_x", "skew_y", "kurt_axis", "kurt_diag", "elong", "cx", "cy",
)


def _classify(f: dict[str, np.ndarray], extended: bool = False) -> np.ndarray:
    """Shape index per object (into ``SHAPES``, or ``ALL_SHAPES`` when ``extended``; its
    length for unknown) from :func:`_measure`'s output.

    Two scores, each 0 for an ideal circle and 1 for the ideal other shape:

    * triangle: vertical skewness (upward triangle -0.57, symmetric shapes 0) and the
      upper/lower area ratio of the bounding box (triangle 1/3, symmetric shapes 1);
    * square: fourth moment along the diagonals minus along the axes (square 0.6, circle 0)
      and the fill ratio of the bounding box (square 1, circle pi/4).

    Objects that are elongated, lopsided, top-heavy, sparse, or smaller than 0.35 or larger
    than 1.25 cells are unknown. ``extended`` adds the diamond (a square on its corner): the
    square score mirrored, fourth moment along the axes minus along the diagonals (diamond
    0.6) and a half-filled bounding box; without it a diamond is unknown (never a circle).
    """
    fill = f["fill"]
    tri_score = (-f["skew_y"] / 0.57 + (1.0 - f["top_bottom"]) / (2.0 / 3.0)) / 2.0
    sq_score = (
        (f["kurt_diag"] - f["kurt_axis"]) / 0.6 + (fill - np.pi / 4) / (1.0 - np.pi / 4)
    ) / 2.0
    with np.errstate(invalid="ignore"):
        plausible = (
            (f["aspect"] > 0.6) & (f["aspect"] < 1.0 / 0.6) & (f["elong"] < 2.5)
            & (np.abs(f["skew_x"]) < 0.5) & (tri_score > -0.5) & (fill > 0.35)
            & (f["extent"] > 0.35) & (f["extent"] < 1.25)
        )
    names = ALL_SHAPES if extended else SHAPES
    out = np.full(fill.shape, len(names), np.int64)
    tri = plausible & (tri_score >= 0.4) & (fill < 0.9)
    sym = plausible & (tri_score < 0.4)
    out[tri] = names.index("triangle")
    out[sym & (sq_score >= 0.45)] = names.index("square")
    dia_score = ((f["kurt_axis"] - f["kurt_diag"]) / 0.6 + (np.pi / 4 - fill)
                 / (np.pi / 4 - 0.5)) / 2.0
    round_ = sym & (sq_score < 0.45)
    out[round_ & (fill > 0.55) & (dia_score < 0.5)] = names.index("circle")
    if extended:  # (without: a diamond is no circle, it is unknown)
        out[round_ & (dia_score >= 0.5)] = names.index("diamond")
    return out


class Located(NamedTuple):
    """A detected object with where it is: the centroid ``(x, y)`` of its pixels in pixel units
    (pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``) and its area in pixels."""

    obj: Obj
    x: float
    y: float
    area: int


def locate_batch(
    images: np.ndarray,
    threshold: float = 0.5,
    floor: float = 0.25,
    min_peak: float = 0.5,
    min_size: int | None = None,
    smooth: float = 0.04,
    max_hue_off: float = 0.4,
    extended: bool = False,
    split_cells: bool = True,
) -> list[list[Located]]:
    """:func:`detect_batch` with each object's centroid and area, in the order measured.

    ``split_cells=False``: never split an object along the 3x3 cell borders. The split serves
    two objects of one colour blurred together in neighbouring cells; an object that may lie
    anywhere (a moving one, :mod:`jdit.eval.moving_shapes`) straddles a border as one object.
    """
    names = _ALL_COLOR_NAMES if extended else _COLOR_NAMES
    f = _measure(images, threshold, floor, min_peak, min_size, smooth,
                 _ALL_PALETTE if extended else _PALETTE, split_cells)
    shape = _classify(f, extended)
    color = np.where(f["hue_off"] <= max_hue_off, f["color"], len(names))
    out: list[list[Located]] = [[] for _ in range(len(images))]
    shapes = (ALL_SHAPES if extended else SHAPES) + (UNKNOWN,)
    colors = names + (UNKNOWN,)
    for i, c, s, p, x, y, a in zip(f["image"], color, shape, f["position"], f["cx"], f["cy"],
                                   f["area"], strict=False):
        out[i].append(Located(Obj(colors[c], shapes[s], POSITIONS[p]), float(x), float(y),
                              int(a)))
    return out


def detect_batch(
    images: np.ndarray,
    threshold: float = 0.5,
    floor: float = 0.25,
    min_peak: float = 0.5,
    min_size: int | None = None,
    smooth: float = 0.04,
    max_hue_off: float = 0.4,
    extended: bool = False,
) -> list[list[Obj]]:
    """:func:`detect` for a batch (N, H, W, 3), vectorised over the batch."""
    found = locate_batch(images, threshold, floor, min_peak, min_size, smooth, max_hue_off,
                         extended)
    out = [[loc.obj for loc in objs] for objs in found]
    for objs in out:
        objs.sort(key=lambda o: (_POS_INDEX[o.position], o.color, o.shape))
    return out


def detect(
    image: np.ndarray,
    threshold: float = 0.5,
    floor: float = 0.25,
    min_peak: float = 0.5,
    min_size: int | None = None,
    smooth: float = 0.04,
    max_hue_off: float = 0.4,
    extended: bool = False,
) -> list[Obj]:
    """Objects in one image (H, W, 3), in grid order; :func:`detect_batch` for many.
    ``extended``: also the new concepts (purple, diamond) of :mod:`jdit.data.shapes`.

    Input convention: ``uint8`` is read as [0, 255], any floating dtype as [-1, 1] (the model's
    output range; values outside are clipped). Brightness is the largest channel, in [0, 1].

    1. Foreground. Brightness is smoothed with a Gaussian of σ = ``smooth`` cells (0.43 px at
       32x32) against pixel noise. Blobs are 8-connected pixels brighter than ``floor``; a blob
       whose peak (90th percentile of its brightness) is below ``min_peak`` is dropped, and of
       the others the pixels brighter than ``threshold`` x peak are foreground (the half-maximum
       outline by default, so dim or blurred objects keep their shape).
    2. Colour. Each foreground pixel takes the nearest palette colour after scaling it to full
       brightness (every palette colour has a channel at 255), so dark edges keep their hue.
    3. Objects are 8-connected foreground pixels of one colour. One with parts of at least a
       quarter of its pixels in two or more cells (two objects of one colour blurred together) is
       split along the cell borders. Objects under ``min_size`` pixels (default: cell area / 24,
       5 px at 32x32, 19 px at 64x64) are noise and ignored.
    4. Attributes: the colour class, or ``UNKNOWN`` if the object's pixels lie on average more
       than ``max_hue_off`` (RGB distance at full brightness, in [0, 1] units) from it; the grid
       cell of the centroid; the shape from moments and bounding-box geometry (``_classify``),
       or ``UNKNOWN`` for anything elongated, lopsided, top-heavy, sparse, tiny or larger than a
       cell.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected one image (H, W, 3), got shape {image.shape}")
    return detect_batch(
        image[None], threshold, floor, min_peak, min_size, smooth, max_hue_off, extended
    )[0]


def _key(o: Obj) -> tuple[int, str, str]:
    return _POS_INDEX.get(o.position, -1), o.color, o.shape


def _matches(found: Sequence[Obj], expected: Sequence[Obj] | str,
             ignore_color: bool = False) -> bool:
    exp = parse_caption(expected) if isinstance(expected, str) else canonical(expected)
    if ignore_color:  # control accuracy: shape and position only
        def layout(objs: Sequence[Obj]) -> list[tuple[int, str]]:
            return sorted((_POS_INDEX.get(o.position, -1), o.shape) for o in objs)
        return layout(found) == layout(exp)
    return sorted(found, key=_key) == sorted(exp, key=_key)


def score(image: np.ndarray, expected: Sequence[Obj] | str, **kwargs: Any) -> bool:
    """True iff the objects detected in ``image`` are exactly ``expected`` (objects or caption):
    same number of objects, and every colour, shape and position right.

    ``kwargs`` go to :func:`detect`.
    """
    return _matches(detect(image, **kwargs), expected)


def scores(
    images: np.ndarray, objects_list: Sequence[Sequence[Obj] | str],
    ignore_color: bool = False, **kwargs: Any
) -> np.ndarray:
    """:func:`score` for a batch (N, H, W, 3): bool (N,). Detection runs in chunks of 512.
    ``ignore_color``: every object's shape and position right, whatever its colour (a control
    condition's accuracy)."""
    images = np.asarray(images)
    if images.ndim != 4 or len(images) != len(objects_list):
        raise ValueError(
            f"expected images (N, H, W, 3) and N prompts, got {images.shape} and "
            f"{len(objects_list)} prompts"
        )
    out = np.zeros(len(images), bool)
    for s in range(0, len(images), 512):
        found = detect_batch(images[s : s + 512], **kwargs)
        out[s : s + 512] = [_matches(f, e, ignore_color)
                            for f, e in zip(found, objects_list[s : s + 512], strict=True)]
    return out


def adherence(
    images: np.ndarray, objects_list: Sequence[Sequence[Obj] | str], **kwargs: Any
) -> float:
    """Fraction of ``images`` whose detected objects equal their prompt's exactly (:func:`scores`).

    ``objects_list[i]`` is a tuple of :class:`Obj` or a caption.
    """
    if len(objects_list) == 0:
        raise ValueError("adherence of an empty batch")
    return float(scores(images, objects_list, **kwargs).mean())


def objects_found(
    images: np.ndarray, objects_list: Sequence[Sequence[Obj] | str], **kwargs: Any
) -> np.ndarray:
    """For each image and each of its prompt's objects (in the caption's order), whether an
    object of that colour and shape was detected in that cell: bool (N, objects). Extra objects
    are not counted against it (:func:`scores` is the exact match). All prompts must name the
    same number of objects."""
    images = np.asarray(images)
    expected = [parse_caption(e) if isinstance(e, str) else canonical(e) for e in objects_list]
    if images.ndim != 4 or len(images) != len(expected) or not expected:
        raise ValueError(f"expected images (N, H, W, 3) and N >= 1 prompts, got {images.shape} "
                         f"and {len(expected)} prompts")
    counts = {len(e) for e in expected}
    if len(counts) != 1:
        raise ValueError(f"prompts name different numbers of objects: {sorted(counts)}")
    out = np.zeros((len(images), counts.pop()), bool)
    for s in range(0, len(images), 512):
        found = detect_batch(images[s : s + 512], **kwargs)
        for i, (f, e) in enumerate(zip(found, expected[s : s + 512], strict=True)):
            have = {_key(o) for o in f}
            out[s + i] = [_key(o) in have for o in e]
    return out
