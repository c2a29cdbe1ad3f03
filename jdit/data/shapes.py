"""``shapes``: an embedded procedural text-to-image dataset.

Each image shows one or two coloured shapes on a black background, each in one cell of a 3x3
grid, and its caption names them: ``"a red circle in the top left and a blue square in the
bottom right"``. Because images are rendered from the caption, prompt adherence of a generator
can be measured exactly: :mod:`jdit.eval.shapes` reads the objects back from an image.

Conventions
-----------
* Objects of a prompt are listed in grid order (row-major position index); two objects never
  share a cell. :func:`canonical` sorts and validates.
* Rendered images are ``uint8`` (H, W, 3); training batches are ``float32`` in [-1, 1].
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
# Concepts the base vocabulary leaves out, for fine-tuning on what a model never saw (the LoRA
# recipe, configs/shapes_lora.py): data with ``concepts="new"`` and the evaluator's
# ``extended=True`` know them. Purple lies as far from blue and magenta as orange from red.
NEW_COLORS: dict[str, tuple[int, int, int]] = {"purple": (128, 0, 255)}
NEW_SHAPES: tuple[str, ...] = ("diamond",)
ALL_COLORS: dict[str, tuple[int, int, int]] = {**COLORS, **NEW_COLORS}
ALL_SHAPES: tuple[str, ...] = SHAPES + NEW_SHAPES
POSITIONS: tuple[str, ...] = (
    "top left", "top center", "top right",
    "center left", "center", "center right",
    "bottom left", "bottom center", "bottom right",
)
EXTENT = 0.8
"""Object extent as a fraction of the cell: circle diameter, square side, triangle base/height."""
SPLIT_SEED = "jdit-shapes-v1"

_COLOR_NAMES = tuple(COLORS)
_ALL_COLOR_NAMES = tuple(ALL_COLORS)
_POS_INDEX = {p: i for i, p in enumerate(POSITIONS)}

Kind = Literal["single", "pair"]
Split = Literal["train", "heldout"]
Concepts = Literal["base", "new"]


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object: colour, shape and grid position, named from the vocabularies.

    Prompts hold valid names only (:func:`canonical` checks); the evaluator
    (:func:`jdit.eval.shapes.detect`) may report ``"unknown"`` as colour or shape.
    """

    color: str
    shape: str
    position: str


# ----------------------------------------------------------------------------- captions


def _check(obj: Obj) -> None:
    if obj.color not in ALL_COLORS:
        raise ValueError(f"unknown colour {obj.color!r}; expected one of {_ALL_COLOR_NAMES}")
    if obj.shape not in ALL_SHAPES:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {ALL_SHAPES}")
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
    r"an? (" + "|".join(_ALL_COLOR_NAMES) + r") (" + "|".join(ALL_SHAPES) + r") in the ("
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


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray, half: float) -> np.ndarray:
    """Which points lie inside ``shape`` (one of ``ALL_SHAPES``) of half-extent ``half``, given
    their offsets ``x``, ``y`` (rightwards, downwards; broadcast against each other) from the
    shape's centre: the pixel test of :func:`render` (a pixel is set when its centre is inside),
    shared with renderers that place shapes anywhere (:mod:`jdit.data.moving_shapes`).

    The centre is that of the bounding box (side ``2 * half``); the upward triangle's base and
    height are both ``2 * half``, so its centroid lies ``half / 3`` below the centre.
    """
    if shape == "circle":
        return x * x + y * y <= half * half
    if shape == "square":
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    if shape == "diamond":  # a square standing on a corner, as wide as the others
        return np.abs(x) + np.abs(y) <= half
    if shape == "triangle":  # upward: apex at the top, base at the bottom, base == height
        return (y <= half) & (np.abs(x) <= (y + half) / 2.0)
    raise ValueError(f"unknown shape {shape!r}; expected one of {ALL_SHAPES}")


STYLES: tuple[str, ...] = ("color", "silhouette", "outline")
"""What :func:`render` draws: the image (``color``), or a control condition of it: every
object's mask in white (``silhouette``), or the mask's one-pixel inner border in white
(``outline``). Conditions carry shape and position, not colour."""


def render(
    objs: Sequence[Obj], size: int = 32, rng: np.random.Generator | None = None,
    style: str = "color",
) -> np.ndarray:
    """Draw ``objs`` as a ``uint8`` (size, size, 3) image with hard edges on black.

    Each object is centred in its cell (cell = size / 3) with extent ``EXTENT`` of the cell; with
    ``rng`` its centre is jittered uniformly by up to ±size/32 px on each axis. A pixel is set
    when its centre lies inside the shape. Objects always stay inside their cell; towards an
    occupied neighbouring cell the jitter is capped so that the object keeps more than half a
    pixel from the border, hence neighbouring objects are always separated by black pixels (for
    a diagonal neighbour, along x). ``style``: one of :data:`STYLES`.
    """
    return render_styles(objs, size, rng, (style,))[0]


def render_styles(
    objs: Sequence[Obj], size: int = 32, rng: np.random.Generator | None = None,
    styles: Sequence[str] = ("color",), only: Sequence[Obj] | None = None,
) -> list[np.ndarray]:
    """:func:`render` in several ``styles`` with the same jitter (an image and its control
    conditions); draws from ``rng`` as one :func:`render` call does. ``only``: the objects
    drawn in the styles other than ``color`` (a condition that shows some of the image's
    objects, placed as in the image); None draws them all."""
    if int(size) != size or size < 24:
        raise ValueError(f"size must be an integer >= 24, got {size!r}")
    bad = [st for st in styles if st not in STYLES]
    if bad or not styles:
        raise ValueError(f"styles must be among {STYLES}, got {list(styles)}")
    size = int(size)
    objs = canonical(objs)
    cell = size / 3.0
    half = EXTENT * cell / 2.0
    jit = size / 32.0
    cap = cell / 2.0 - half - 0.51  # largest shift that keeps half a pixel from the border
    cells = {divmod(_POS_INDEX[o.position], 3) for o in objs}
    centres = np.arange(size, dtype=np.float64) + 0.5
    if only is not None and not set(canonical(only)) <= set(objs):
        raise ValueError(f"only= must be some of the objects drawn, got {list(only)}")
    shown = set(objs if only is None else canonical(only))
    out = [np.zeros((size, size, 3), np.uint8) for _ in styles]
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
        mask = shape_mask(o.shape, xs[None, :] - cx, ys[:, None] - cy, half)
        y0, x0 = int(ys[0]), int(xs[0])
        for img, st in zip(out, styles, strict=True):
            window = img[y0 : y0 + len(ys), x0 : x0 + len(xs)]
            if st != "color" and o not in shown:
                continue
            if st == "color":
                window[mask] = ALL_COLORS[o.color]
            elif st == "silhouette":
                window[mask] = 255
            else:  # the mask's pixels with a 4-neighbour outside it
                inner = np.pad(mask, 1)
                inner = inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
                window[mask & ~inner] = 255
    return out


def to_float(images: np.ndarray) -> np.ndarray:
    """``uint8`` [0, 255] images to ``float32`` [-1, 1]."""
    return (np.asarray(images, np.float32) / 127.5 - 1.0).astype(np.float32)


def resize(images: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Float images (N, H, W, C) to (N, h, w, C) by area averaging (PIL's box filter): a
    condition at another resolution, or a generated image of another shape brought back to
    the evaluator's square."""
    from PIL import Image

    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    h, w = int(hw[0]), int(hw[1])
    if images.shape[1:3] == (h, w):
        return images
    return np.stack([np.stack([np.asarray(Image.fromarray(im[..., c], mode="F").resize(
        (w, h), Image.BOX)) for c in range(im.shape[-1])], -1) for im in images])


# ----------------------------------------------------------------------------- prompt space


@functools.cache
def vocabulary(extended: bool = False) -> list[str]:
    """Every word of every caption (colours, shapes, positions, "a"/"an", "and"), sorted: the
    vocabulary of the word-level text encoder trained on this data. ``extended`` appends the
    new concepts' words (``NEW_SHAPES``, then ``NEW_COLORS``) after them, so every base word
    keeps its place (and its vector in :class:`jdit.text.words.WordEncoder`)."""
    from jdit.text.words import tokenize

    texts = [caption(p) for kind in ("single", "pair") for p in _all_prompts(kind)]
    base = sorted({w for t in texts for w in tokenize(t)})
    return base + list(NEW_SHAPES) + list(NEW_COLORS) if extended else base


def _is_new(objs: tuple[Obj, ...]) -> bool:
    return any(o.color in NEW_COLORS or o.shape in NEW_SHAPES for o in objs)


@functools.cache
def _all_prompts(kind: Kind, concepts: Concepts = "base") -> tuple[tuple[Obj, ...], ...]:
    """``base``: the prompts of the base vocabulary; ``new``: prompts of the extended
    vocabulary with at least one new colour or shape."""
    if concepts not in ("base", "new"):
        raise ValueError(f"concepts must be 'base' or 'new', got {concepts!r}")
    colors, shapes_ = (_COLOR_NAMES, SHAPES) if concepts == "base" else (_ALL_COLOR_NAMES,
                                                                         ALL_SHAPES)
    triples = [Obj(c, s, p) for p in POSITIONS for c in colors for s in shapes_]
    if kind == "single":
        out = tuple((t,) for t in triples)
    elif kind == "pair":
        out = tuple(
            (a, b) for a, b in itertools.combinations(triples, 2) if a.position != b.position
        )
    else:
        raise ValueError(f"kind must be 'single' or 'pair', got {kind!r}")
    return out if concepts == "base" else tuple(p for p in out if _is_new(p))


@functools.cache
def _permuted(kind: Kind, concepts: Concepts = "base") -> tuple[tuple[Obj, ...], ...]:
    """The prompt space of ``kind`` in a fixed pseudo-random order: sorted by a seeded SHA-256."""

    def key(objs: tuple[Obj, ...]) -> bytes:
        return hashlib.sha256(f"{SPLIT_SEED}|{caption(objs)}".encode()).digest()

    return tuple(sorted(_all_prompts(kind, concepts), key=key))


def prompts(
    kind: Kind,
    split: Split,
    holdout_single: float = 0.25,
    holdout_pair: float = 0.1,
    concepts: Concepts = "base",
) -> list[tuple[Obj, ...]]:
    """The ``split`` of the ``kind`` prompt space (216 singles, 20,736 pairs; with
    ``concepts="new"``, those with a new colour or shape: 108 singles, 25,920 pairs).

    The first ``round(fraction * n)`` prompts of a fixed seeded permutation are held out
    (54 singles and 2,074 pairs with the defaults); the rest are for training.
    """
    frac = {"single": holdout_single, "pair": holdout_pair}.get(kind)
    if frac is None:
        raise ValueError(f"kind must be 'single' or 'pair', got {kind!r}")
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"held-out fraction must lie in [0, 1], got {frac}")
    space = _permuted(kind, concepts)
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
    concepts: Concepts = "base",
    new_fraction: float = 0.5,
    condition: str | None = None,
    partial: float = 0.0,
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
    if concepts == "new":  # drawn after the base choices: base batches stay as they were
        if not 0.0 <= new_fraction <= 1.0:
            raise ValueError(f"new_fraction must lie in [0, 1], got {new_fraction}")
        new_s = prompts("single", split, holdout_single, holdout_pair, "new")
        new_p = prompts("pair", split, holdout_single, holdout_pair, "new")
        is_new = rng.random(num) < new_fraction
        pick_ns = rng.integers(0, len(new_s), size=num)
        pick_np = rng.integers(0, len(new_p), size=num)
        objects = [(new_p[j] if p else new_s[i]) if n else o for o, n, p, i, j in
                   zip(objects, is_new, is_pair, pick_ns, pick_np, strict=True)]
    elif concepts != "base":
        raise ValueError(f"concepts must be 'base' or 'new', got {concepts!r}")
    if condition is not None and condition not in STYLES[1:]:
        raise ValueError(f"condition must be None or one of {STYLES[1:]}, got {condition!r}")
    if not 0.0 <= partial <= 1.0 or (partial and condition is None):
        raise ValueError(f"partial must lie in [0, 1] and needs a condition, got {partial}")
    shown: list[tuple[Obj, ...] | None] = [None] * num
    if partial:  # drawn after the objects, before the jitter: batches without it unchanged
        is_partial = rng.random(num) < partial
        keep = rng.integers(0, 2, size=num)
        shown = [(o[k],) if p and len(o) > 1 else None
                 for o, p, k in zip(objects, is_partial, keep, strict=True)]
    styles = ("color",) if condition is None else ("color", condition)
    images = np.empty((len(styles), num, size, size, 3), np.float32)
    for n, objs in enumerate(objects):
        for k, img in enumerate(render_styles(objs, size, rng if jitter else None, styles,
                                              only=shown[n])):
            images[k, n] = to_float(img)
    out = {"images": images[0], "captions": [caption(o) for o in objects], "objects": objects}
    if condition is not None:
        out["conditions"] = images[1]
    if partial:
        out["partial"] = np.array([s is not None for s in shown])
    return out


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
    concepts: Concepts = "base",
    new_fraction: float = 0.5,
    condition: str | None = None,
    partial: float = 0.0,
) -> dict[str, Any]:
    """Batch ``index`` of :func:`iterate`: a function of ``(seed, index)`` only.

    Same keys as :func:`make_examples`, with ``batch_size`` examples. ``concepts="new"``
    replaces a ``new_fraction`` of them by prompts with a new colour or shape (same
    ``split``, same share of pairs); the rest are the base batch's examples. ``condition``
    (``"silhouette"`` or ``"outline"``) adds ``conditions``: each image's control condition,
    float32 in [-1, 1], drawn with the image's jitter (the images are those without it).
    ``partial``: the share of two-object examples whose condition shows one of the two objects
    (which one drawn at random), flagged in ``partial`` (bool, (batch_size,)): what a condition
    that does not cover the whole image looks like, so that conditions trained apart compose.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    return _sample(
        rng, batch_size, split, size, pair_fraction, jitter, holdout_single, holdout_pair,
        concepts, new_fraction, condition, partial,
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
