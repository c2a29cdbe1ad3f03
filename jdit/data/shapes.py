"""``shapes``: an embedded procedural text-to-image dataset with an exact evaluator.

Each image shows one or two coloured shapes on a black background, each in one cell of a 3x3
grid, and its caption names them: ``"a red circle in the top left and a blue square in the
bottom right"``. Because images are rendered from the caption, prompt adherence of a generator
can be measured exactly: :func:`detect` reads the objects back from an image and :func:`score`
compares them with the prompt (:func:`scores` and :func:`adherence` for batches). The evaluator
is exact on rendered images and tolerant of blur, pixel noise, dimming and slightly off
colours, but an object with any wrong attribute, a missing or an extra object fails.

Conventions
-----------
* Objects of a prompt are listed in grid order (row-major position index); two objects never
  share a cell. :func:`canonical` sorts and validates.
* Rendered images are ``uint8`` (H, W, 3); training batches are ``float32`` in [-1, 1]. The
  evaluator accepts both: ``uint8`` arrays are read as [0, 255], floating arrays as [-1, 1].
* Train/held-out splits are defined by a seeded hash of each prompt's caption, so they do not
  depend on enumeration order, Python's hash randomisation or the numpy version.
* Batch ``k`` of :func:`iterate` depends only on ``(seed, k)`` (``np.random.SeedSequence``), so
  a training run resumes exactly with ``iterate(..., start=k)`` or :func:`batch`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import re
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "orange": (255, 128, 0),
    "white": (255, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = (
    "top left", "top center", "top right",
    "center left", "center", "center right",
    "bottom left", "bottom center", "bottom right",
)
UNKNOWN = "unknown"
"""Colour or shape :func:`detect` reports for an object that matches no palette colour or shape."""

EXTENT = 0.8
"""Object extent as a fraction of the cell: circle diameter, square side, triangle base/height."""
_MIN_SIZE_DIVISOR = 24
SPLIT_SEED = "jdit-shapes-v1"

_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], np.float32) / 255.0
_POS_INDEX = {p: i for i, p in enumerate(POSITIONS)}

Kind = Literal["single", "pair"]
Split = Literal["train", "heldout"]


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object: colour, shape and grid position, named from the vocabularies.

    Prompts hold valid names only (:func:`canonical` checks); :func:`detect` may report
    :data:`UNKNOWN` as colour or shape.
    """

    color: str
    shape: str
    position: str


# ----------------------------------------------------------------------------- captions


def _check(obj: Obj) -> None:
    if obj.color not in COLORS:
        raise ValueError(f"unknown colour {obj.color!r}; expected one of {_COLOR_NAMES}")
    if obj.shape not in SHAPES:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    if obj.position not in _POS_INDEX:
        raise ValueError(f"unknown position {obj.position!r}; expected one of {POSITIONS}")


def canonical(objs: Sequence[Obj]) -> tuple[Obj, ...]:
    """Validate ``objs`` and sort them by grid index; raise ValueError on a shared cell."""
    if not objs:
        raise ValueError("a prompt needs at least one object")
    for o in objs:
        _check(o)
    out = tuple(sorted(objs, key=lambda o: _POS_INDEX[o.position]))
    for a, b in itertools.pairwise(out):
        if a.position == b.position:
            raise ValueError(f"two objects share the cell {a.position!r}")
    return out


def _phrase(o: Obj) -> str:
    article = "an" if o.color[0] in "aeiou" else "a"
    return f"{article} {o.color} {o.shape} in the {o.position}"


def caption(objs: Sequence[Obj]) -> str:
    """``"a red circle in the top left and a blue square in the bottom right"`` (canonical order).

    The article follows English (``"an orange ..."``).
    """
    return " and ".join(_phrase(o) for o in canonical(objs))


_PHRASE_RE = re.compile(
    r"an? (" + "|".join(_COLOR_NAMES) + r") (" + "|".join(SHAPES) + r") in the ("
    + "|".join(sorted(POSITIONS, key=len, reverse=True)) + r")"
)
_CAPTION_RE = re.compile(rf"{_PHRASE_RE.pattern}(?: and {_PHRASE_RE.pattern})*")


def parse_caption(text: str) -> tuple[Obj, ...]:
    """Inverse of :func:`caption`: the objects of a canonical caption.

    Raises ValueError for anything :func:`caption` cannot produce (unknown words, wrong article,
    non-canonical order, shared cells, extra whitespace).
    """
    if not isinstance(text, str) or not _CAPTION_RE.fullmatch(text):
        raise ValueError(f"not a shapes caption: {text!r}")
    objs = tuple(Obj(*m.groups()) for m in _PHRASE_RE.finditer(text))
    if caption(objs) != text:
        raise ValueError(f"not a canonical shapes caption: {text!r} (expected {caption(objs)!r})")
    return objs


# ----------------------------------------------------------------------------- rendering


def render(
    objs: Sequence[Obj], size: int = 32, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Draw ``objs`` as a ``uint8`` (size, size, 3) image with hard edges on black.

    Each object is centred in its cell (cell = size / 3) with extent ``EXTENT`` of the cell; with
    ``rng`` its centre is jittered uniformly by up to ±size/32 px on each axis. A pixel is set
    when its centre lies inside the shape. Objects always stay inside their cell; towards an
    occupied neighbouring cell the jitter is capped so that the object keeps more than half a
    pixel from the border, hence neighbouring objects are always separated by black pixels (for
    a diagonal neighbour, along x).
    """
    if int(size) != size or size < 24:
        raise ValueError(f"size must be an integer >= 24, got {size!r}")
    size = int(size)
    objs = canonical(objs)
    cell = size / 3.0
    half = EXTENT * cell / 2.0
    jit = size / 32.0
    cap = cell / 2.0 - half - 0.51  # largest shift that keeps half a pixel from the border
    cells = {divmod(_POS_INDEX[o.position], 3) for o in objs}
    centres = np.arange(size, dtype=np.float64) + 0.5
    img = np.zeros((size, size, 3), np.uint8)
    for o in objs:
        row, col = divmod(_POS_INDEX[o.position], 3)
        dy, dx = rng.uniform(-jit, jit, size=2) if rng is not None else (0.0, 0.0)
        for r, c in cells:
            if (r, c) == (row, col) or abs(r - row) > 1 or abs(c - col) > 1:
                continue
            if c != col:
                dx = min(dx, cap) if c > col else max(dx, -cap)
            else:
                dy = min(dy, cap) if r > row else max(dy, -cap)
        cy, cx = (row + 0.5) * cell + dy, (col + 0.5) * cell + dx
        ys = centres[(centres > row * cell) & (centres < (row + 1) * cell)]
        xs = centres[(centres > col * cell) & (centres < (col + 1) * cell)]
        y, x = ys[:, None] - cy, xs[None, :] - cx
        if o.shape == "circle":
            mask = x * x + y * y <= half * half
        elif o.shape == "square":
            mask = (np.abs(x) <= half) & (np.abs(y) <= half)
        else:  # upward triangle: apex at the top, base at the bottom, base == height
            mask = (y <= half) & (np.abs(x) <= (y + half) / 2.0)
        y0, x0 = int(ys[0]), int(xs[0])
        window = img[y0 : y0 + len(ys), x0 : x0 + len(xs)]
        window[mask] = COLORS[o.color]
    return img


def to_float(images: np.ndarray) -> np.ndarray:
    """``uint8`` [0, 255] images to ``float32`` [-1, 1]."""
    return (np.asarray(images, np.float32) / 127.5 - 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- prompt space


@functools.cache
def _all_prompts(kind: Kind) -> tuple[tuple[Obj, ...], ...]:
    triples = [Obj(c, s, p) for p in POSITIONS for c in _COLOR_NAMES for s in SHAPES]
    if kind == "single":
        return tuple((t,) for t in triples)
    if kind == "pair":
        return tuple(
            (a, b) for a, b in itertools.combinations(triples, 2) if a.position != b.position
        )
    raise ValueError(f"kind must be 'single' or 'pair', got {kind!r}")


@functools.cache
def _permuted(kind: Kind) -> tuple[tuple[Obj, ...], ...]:
    """The prompt space of ``kind`` in a fixed pseudo-random order: sorted by a seeded SHA-256."""

    def key(objs: tuple[Obj, ...]) -> bytes:
        return hashlib.sha256(f"{SPLIT_SEED}|{caption(objs)}".encode()).digest()

    return tuple(sorted(_all_prompts(kind), key=key))


def prompts(
    kind: Kind,
    split: Split,
    holdout_single: float = 0.25,
    holdout_pair: float = 0.1,
) -> list[tuple[Obj, ...]]:
    """The ``split`` of the ``kind`` prompt space (216 singles, 20,736 pairs).

    The first ``round(fraction * n)`` prompts of a fixed seeded permutation are held out
    (54 singles and 2,074 pairs with the defaults); the rest are for training.
    """
    frac = {"single": holdout_single, "pair": holdout_pair}.get(kind)
    if frac is None:
        raise ValueError(f"kind must be 'single' or 'pair', got {kind!r}")
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"held-out fraction must lie in [0, 1], got {frac}")
    space = _permuted(kind)
    n_hold = round(frac * len(space))
    if split == "heldout":
        return list(space[:n_hold])
    if split == "train":
        return list(space[n_hold:])
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


# ----------------------------------------------------------------------------- examples


def _sample(
    rng: np.random.Generator,
    num: int,
    split: Split,
    size: int,
    pair_fraction: float,
    jitter: bool,
    holdout_single: float,
    holdout_pair: float,
) -> dict[str, Any]:
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    if not 0.0 <= pair_fraction <= 1.0:
        raise ValueError(f"pair_fraction must lie in [0, 1], got {pair_fraction}")
    singles = prompts("single", split, holdout_single, holdout_pair)
    pairs = prompts("pair", split, holdout_single, holdout_pair)
    is_pair = rng.random(num) < pair_fraction
    if (is_pair.any() and not pairs) or ((~is_pair).any() and not singles):
        raise ValueError(f"the {split!r} split is empty for the requested kind of prompt")
    pick_s = rng.integers(0, max(len(singles), 1), size=num)
    pick_p = rng.integers(0, max(len(pairs), 1), size=num)
    objects = [pairs[j] if p else singles[i] for p, i, j in zip(is_pair, pick_s, pick_p, strict=False)]
    images = np.empty((num, size, size, 3), np.float32)
    for n, objs in enumerate(objects):
        images[n] = to_float(render(objs, size, rng if jitter else None))
    return {"images": images, "captions": [caption(o) for o in objects], "objects": objects}


def make_examples(
    split: Split = "train",
    num: int = 1024,
    seed: int = 0,
    size: int = 32,
    pair_fraction: float = 0.5,
    jitter: bool = True,
    holdout_single: float = 0.25,
    holdout_pair: float = 0.1,
) -> dict[str, Any]:
    """``num`` random examples of ``split``: a fraction ``pair_fraction`` of two-object prompts.

    Returns ``images`` float32 (num, size, size, 3) in [-1, 1], ``captions`` list[str] and
    ``objects`` list[tuple[Obj, ...]]; prompts are drawn with replacement. Deterministic in
    ``seed`` and independent of the :func:`iterate` stream with the same seed.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E7, 0xE4A1]))
    return _sample(rng, num, split, size, pair_fraction, jitter, holdout_single, holdout_pair)


def batch(
    seed: int,
    index: int,
    batch_size: int,
    size: int = 32,
    split: Split = "train",
    pair_fraction: float = 0.5,
    jitter: bool = True,
    holdout_single: float = 0.25,
    holdout_pair: float = 0.1,
) -> dict[str, Any]:
    """Batch ``index`` of :func:`iterate`: a function of ``(seed, index)`` only.

    Same keys as :func:`make_examples`, with ``batch_size`` examples.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    return _sample(
        rng, batch_size, split, size, pair_fraction, jitter, holdout_single, holdout_pair
    )


def iterate(
    batch_size: int,
    seed: int,
    size: int = 32,
    split: Split = "train",
    pair_fraction: float = 0.5,
    jitter: bool = True,
    start: int = 0,
    holdout_single: float = 0.25,
    holdout_pair: float = 0.1,
) -> Iterator[dict[str, Any]]:
    """Infinite stream of batches ``batch(seed, k, ...)`` for k = start, start + 1, ..."""
    for k in itertools.count(start):
        yield batch(
            seed, k, batch_size, size, split, pair_fraction, jitter, holdout_single, holdout_pair
        )


# ----------------------------------------------------------------------------- evaluator


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
) -> dict[str, np.ndarray]:
    """Segment a batch into objects and measure each (see :func:`detect` for the steps).

    Returns one array entry per object: ``image`` (batch index), ``color`` (palette index),
    ``hue_off`` (mean distance of its pixels' full-brightness colour from that palette colour),
    ``position`` (grid index of the centroid), ``area`` (pixels), ``extent`` (larger side of
    the bounding box, in cells), ``fill`` (area / box area), ``aspect`` (box width / height),
    ``top_bottom`` (area in the upper half of the box / area in the lower half), ``skew_x``,
    ``skew_y`` (standardised third moments), ``kurt_axis``, ``kurt_diag`` (standardised fourth
    moments, averaged over the two axes and over the two diagonals) and ``elong`` (ratio of the
    principal second moments).
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
    d2 = ((chroma[:, None, :] - _PALETTE) ** 2).sum(-1)
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
    split = n_big[c_inv] >= 2
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
        }


_FEATURES = (
    "image", "color", "hue_off", "position", "area", "extent", "fill", "aspect", "top_bottom",
    "skew_x", "skew_y", "kurt_axis", "kurt_diag", "elong",
)


def _classify(f: dict[str, np.ndarray]) -> np.ndarray:
    """Shape index per object (``len(SHAPES)`` for unknown) from :func:`_measure`'s output.

    Two scores, each 0 for an ideal circle and 1 for the ideal other shape:

    * triangle: vertical skewness (upward triangle -0.57, symmetric shapes 0) and the
      upper/lower area ratio of the bounding box (triangle 1/3, symmetric shapes 1);
    * square: fourth moment along the diagonals minus along the axes (square 0.6, circle 0)
      and the fill ratio of the bounding box (square 1, circle pi/4).

    Objects that are elongated, lopsided, top-heavy, sparse, or smaller than 0.35 or larger
    than 1.25 cells are unknown.
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
    out = np.full(fill.shape, len(SHAPES), np.int64)
    tri = plausible & (tri_score >= 0.4) & (fill < 0.9)
    sym = plausible & (tri_score < 0.4)
    out[tri] = SHAPES.index("triangle")
    out[sym & (sq_score >= 0.45)] = SHAPES.index("square")
    out[sym & (sq_score < 0.45) & (fill > 0.55)] = SHAPES.index("circle")
    return out


def detect_batch(
    images: np.ndarray,
    threshold: float = 0.5,
    floor: float = 0.25,
    min_peak: float = 0.5,
    min_size: int | None = None,
    smooth: float = 0.04,
    max_hue_off: float = 0.4,
) -> list[list[Obj]]:
    """:func:`detect` for a batch (N, H, W, 3), vectorised over the batch."""
    f = _measure(images, threshold, floor, min_peak, min_size, smooth)
    shape = _classify(f)
    color = np.where(f["hue_off"] <= max_hue_off, f["color"], len(_COLOR_NAMES))
    out: list[list[Obj]] = [[] for _ in range(len(images))]
    shapes, colors = SHAPES + (UNKNOWN,), _COLOR_NAMES + (UNKNOWN,)
    for i, c, s, p in zip(f["image"], color, shape, f["position"], strict=False):
        out[i].append(Obj(colors[c], shapes[s], POSITIONS[p]))
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
) -> list[Obj]:
    """Objects in one image (H, W, 3), in grid order; :func:`detect_batch` for many.

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
        image[None], threshold, floor, min_peak, min_size, smooth, max_hue_off
    )[0]


def _key(o: Obj) -> tuple[int, str, str]:
    return _POS_INDEX.get(o.position, -1), o.color, o.shape


def _matches(found: Sequence[Obj], expected: Sequence[Obj] | str) -> bool:
    exp = parse_caption(expected) if isinstance(expected, str) else canonical(expected)
    return sorted(found, key=_key) == sorted(exp, key=_key)


def score(image: np.ndarray, expected: Sequence[Obj] | str, **kwargs: Any) -> bool:
    """True iff the objects detected in ``image`` are exactly ``expected`` (objects or caption):
    same number of objects, and every colour, shape and position right.

    ``kwargs`` go to :func:`detect`.
    """
    return _matches(detect(image, **kwargs), expected)


def scores(
    images: np.ndarray, objects_list: Sequence[Sequence[Obj] | str], **kwargs: Any
) -> np.ndarray:
    """:func:`score` for a batch (N, H, W, 3): bool (N,). Detection runs in chunks of 512."""
    images = np.asarray(images)
    if images.ndim != 4 or len(images) != len(objects_list):
        raise ValueError(
            f"expected images (N, H, W, 3) and N prompts, got {images.shape} and "
            f"{len(objects_list)} prompts"
        )
    out = np.zeros(len(images), bool)
    for s in range(0, len(images), 512):
        found = detect_batch(images[s : s + 512], **kwargs)
        out[s : s + 512] = [_matches(f, e) for f, e in zip(found, objects_list[s : s + 512], strict=False)]
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
