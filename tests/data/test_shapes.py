"""The embedded ``shapes`` dataset: captions, splits, deterministic batches and the evaluator."""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from jdit.data import shapes
from jdit.data.shapes import Obj

SINGLES = [(Obj(c, s, p),) for c in shapes.COLORS for s in shapes.SHAPES for p in shapes.POSITIONS]


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of float [-1, 1] images (N, H, W, 3); outside is black."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    h, w = images.shape[1:3]
    x = np.pad(images + 1.0, ((0, 0), (r, r), (r, r), (0, 0)))
    x = sum(k[i] * x[:, i : i + h] for i in range(2 * r + 1))
    x = sum(k[i] * x[:, :, i : i + w] for i in range(2 * r + 1))
    return (x - 1.0).astype(np.float32)


@pytest.fixture(scope="module")
def rendered() -> dict[int, dict]:
    """1200 jittered training images at 32x32 and 1000 held-out ones at 48x48."""
    return {
        32: shapes.make_examples("train", num=1200, seed=11, size=32),
        48: shapes.make_examples("heldout", num=1000, seed=12, size=48),
    }


# ----------------------------------------------------------------------------- vocabulary


def test_vocabulary():
    assert len(shapes.COLORS) == 8 and len(shapes.SHAPES) == 3 and len(shapes.POSITIONS) == 9
    rgb = np.array(list(shapes.COLORS.values()), float)
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert dist[~np.eye(8, dtype=bool)].min() >= 127  # orange's neighbours are the closest
    assert shapes.POSITIONS[0] == "top left" and shapes.POSITIONS[4] == "center"
    with pytest.raises(dataclasses.FrozenInstanceError):
        Obj("red", "circle", "center").color = "blue"


# ----------------------------------------------------------------------------- captions


def test_caption_format_and_canonical_order():
    a = Obj("red", "circle", "top left")
    b = Obj("blue", "square", "bottom right")
    assert shapes.caption([a]) == "a red circle in the top left"
    expected = "a red circle in the top left and a blue square in the bottom right"
    assert shapes.caption([a, b]) == shapes.caption([b, a]) == expected
    assert shapes.caption([Obj("orange", "triangle", "center")]) == (
        "an orange triangle in the center"
    )


def test_caption_round_trip_all_prompts():
    for objs in SINGLES:
        assert shapes.parse_caption(shapes.caption(objs)) == objs
    pairs = shapes.prompts("pair", "train") + shapes.prompts("pair", "heldout")
    assert len(pairs) == 20736
    for objs in pairs:
        assert shapes.parse_caption(shapes.caption(objs)) == objs


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red circle",
        "a red circle in the top left ",
        " a red circle in the top left",
        "a red  circle in the top left",
        "A red circle in the top left",
        "a orange circle in the top left",
        "an red circle in the top left",
        "a purple circle in the top left",
        "a red hexagon in the top left",
        "a red circle in the middle",
        "a red circle in the top left and",
        "a red circle in the top left, a blue square in the center",
        "a blue square in the bottom right and a red circle in the top left",  # not canonical
        "a red circle in the center and a blue square in the center",  # shared cell
    ],
)
def test_parse_caption_rejects(text):
    with pytest.raises(ValueError):
        shapes.parse_caption(text)


def test_invalid_objects_rejected():
    for bad in (Obj("pink", "circle", "center"), Obj("red", "oval", "center"),
                Obj("red", "circle", "middle")):
        with pytest.raises(ValueError):
            shapes.caption([bad])
        with pytest.raises(ValueError):
            shapes.render([bad])
    with pytest.raises(ValueError):
        shapes.canonical([Obj("red", "circle", "center"), Obj("blue", "square", "center")])
    with pytest.raises(ValueError):
        shapes.canonical([])
    with pytest.raises(ValueError):
        shapes.render([Obj("red", "circle", "center")], size=16)


# ----------------------------------------------------------------------------- splits


def test_split_sizes_and_disjointness():
    for kind, n_total, n_held in (("single", 216, 54), ("pair", 20736, 2074)):
        train = shapes.prompts(kind, "train")
        held = shapes.prompts(kind, "heldout")
        assert len(held) == n_held and len(train) == n_total - n_held
        assert len(set(train)) == len(train) and len(set(held)) == len(held)
        assert not set(train) & set(held)
        for objs in train + held:
            assert objs == shapes.canonical(objs)
    assert set(shapes.prompts("single", "train") + shapes.prompts("single", "heldout")) == set(
        SINGLES
    )
    assert len(shapes.prompts("pair", "heldout")) >= 200
    pairs = shapes.prompts("pair", "train") + shapes.prompts("pair", "heldout")
    assert all(a.position != b.position for a, b in pairs)
    assert len({frozenset(p) for p in pairs}) == 8 * 3 * 8 * 3 * 36
    # Other fractions keep the permutation: a larger held-out set contains the smaller one.
    assert len(shapes.prompts("single", "heldout", holdout_single=0.0)) == 0
    assert set(shapes.prompts("single", "heldout")) <= set(
        shapes.prompts("single", "heldout", holdout_single=0.5)
    )
    for args in (("triple", "train"), ("single", "test")):
        with pytest.raises(ValueError):
            shapes.prompts(*args)
    with pytest.raises(ValueError):
        shapes.prompts("single", "train", holdout_single=1.5)


def test_split_is_pinned_and_independent_of_hash_seed():
    # Golden values: a change here silently changes every held-out benchmark.
    held = [shapes.caption(o) for o in shapes.prompts("single", "heldout")]
    assert held[:3] == [
        "a white square in the center",
        "a green triangle in the center",
        "a cyan circle in the center",
    ]
    assert shapes.caption(shapes.prompts("pair", "heldout")[0]) == (
        "a white circle in the center left and a white circle in the bottom center"
    )
    # The same split in a process with another string-hash seed.
    code = (
        "from jdit.data import shapes\n"
        "for kind in ('single', 'pair'):\n"
        "    for objs in shapes.prompts(kind, 'heldout'):\n"
        "        print(shapes.caption(objs))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": str(hash("jdit") % 1000 + 1)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.splitlines()
    here = [shapes.caption(o) for k in ("single", "pair") for o in shapes.prompts(k, "heldout")]
    assert out == here


# ----------------------------------------------------------------------------- examples


def test_make_examples_format_and_determinism():
    a = shapes.make_examples("train", num=64, seed=3, size=32)
    b = shapes.make_examples("train", num=64, seed=3, size=32)
    c = shapes.make_examples("train", num=64, seed=4, size=32)
    assert a["images"].shape == (64, 32, 32, 3) and a["images"].dtype == np.float32
    assert a["images"].min() == -1.0 and a["images"].max() == 1.0
    assert len(a["captions"]) == len(a["objects"]) == 64
    assert a["captions"] == [shapes.caption(o) for o in a["objects"]]
    np.testing.assert_array_equal(a["images"], b["images"])
    assert a["captions"] == b["captions"]
    assert a["captions"] != c["captions"]
    # The examples stream is not the training-batch stream of the same seed.
    assert a["captions"] != shapes.batch(3, 0, 64)["captions"]


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_make_examples_draws_from_its_split(split):
    data = shapes.make_examples(split, num=400, seed=0, size=24)
    allowed = set(shapes.prompts("single", split)) | set(shapes.prompts("pair", split))
    assert all(objs in allowed for objs in data["objects"])
    n_pairs = sum(len(o) == 2 for o in data["objects"])
    assert 150 < n_pairs < 250  # pair_fraction=0.5
    assert all(len(o) == 1 for o in shapes.make_examples(split, 50, pair_fraction=0.0)["objects"])
    assert all(len(o) == 2 for o in shapes.make_examples(split, 50, pair_fraction=1.0)["objects"])


def test_batches_depend_only_on_seed_and_index():
    stream = shapes.iterate(batch_size=8, seed=5, size=32)
    first = [next(stream) for _ in range(4)]
    for k, b in enumerate(first):
        direct = shapes.batch(5, k, batch_size=8, size=32)
        np.testing.assert_array_equal(b["images"], direct["images"])
        assert b["captions"] == direct["captions"] and b["objects"] == direct["objects"]
    resumed = next(shapes.iterate(batch_size=8, seed=5, size=32, start=3))
    np.testing.assert_array_equal(resumed["images"], first[3]["images"])
    assert first[0]["captions"] != first[1]["captions"]
    assert shapes.batch(6, 0, 8)["captions"] != first[0]["captions"]
    assert first[0]["images"].shape == (8, 32, 32, 3) and first[0]["images"].dtype == np.float32
    with pytest.raises(ValueError):
        shapes.batch(5, -1, 8)


# ----------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("size", [24, 32, 48, 64])
def test_render_geometry(size):
    img = shapes.render([Obj("white", "square", "center")], size=size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    ys, xs = np.nonzero(img.max(-1))
    cell = size / 3
    side = shapes.EXTENT * cell
    assert abs((ys.max() - ys.min() + 1) - side) <= 1
    assert abs((xs.max() - xs.min() + 1) - side) <= 1
    assert abs(ys.mean() + 0.5 - 1.5 * cell) <= 0.5 and abs(xs.mean() + 0.5 - 1.5 * cell) <= 0.5
    # Only black and the palette colour, hard edges.
    assert {tuple(v) for v in img.reshape(-1, 3)} == {(0, 0, 0), (255, 255, 255)}
    circle = shapes.render([Obj("red", "circle", "center")], size=size)
    triangle = shapes.render([Obj("red", "triangle", "center")], size=size)
    square_area = (img.max(-1) > 0).sum()
    assert 0.7 < (circle.max(-1) > 0).sum() / square_area < 0.9  # pi/4 up to pixelisation
    assert 0.4 < (triangle.max(-1) > 0).sum() / square_area < 0.62
    rows = (triangle.max(-1) > 0).sum(1)
    rows = rows[rows > 0]
    assert rows[0] <= rows[-1] / 3  # apex up


@pytest.mark.parametrize("size", [24, 32, 48])
def test_render_keeps_objects_in_their_cells_and_apart(size):
    rng = np.random.default_rng(0)
    neighbours = [
        (a, b) for a, b in itertools.combinations(range(9), 2)
        if max(abs(a // 3 - b // 3), abs(a % 3 - b % 3)) == 1
    ]
    for trial in range(200):
        a, b = neighbours[trial % len(neighbours)]
        objs = [Obj("green", shapes.SHAPES[trial % 3], shapes.POSITIONS[a]),
                Obj("green", shapes.SHAPES[trial // 3 % 3], shapes.POSITIONS[b])]
        img = shapes.render(objs, size=size, rng=rng)
        fg = img.max(-1) > 0
        # Two objects of one colour never touch: exactly two 8-connected components.
        _, comp = shapes._components(fg[None])
        assert len(np.unique(comp)) == 2
        ys, xs = np.nonzero(fg)
        cells = set(((ys + 0.5) // (size / 3) * 3 + (xs + 0.5) // (size / 3)).astype(int))
        assert cells == {a, b}


# ----------------------------------------------------------------------------- evaluator


def test_evaluator_is_exact_on_rendered_images(rendered):
    total = 0
    for size, data in rendered.items():
        acc = shapes.adherence(data["images"], data["objects"])
        assert acc == 1.0, (size, acc)
        total += len(data["objects"])
    assert total >= 2000
    # uint8 input, captions as prompts, and every single prompt at 64x64 without jitter.
    imgs = np.stack([shapes.render(o, size=64) for o in SINGLES])
    assert shapes.adherence(imgs, [shapes.caption(o) for o in SINGLES]) == 1.0
    assert shapes.detect(imgs[0]) == list(SINGLES[0])


def _wrong_variants(objs: tuple[Obj, ...], rng: np.random.Generator) -> list[tuple[Obj, ...]]:
    """The prompt with one attribute or the count changed."""
    i = rng.integers(len(objs))
    o = objs[i]
    free = [p for p in shapes.POSITIONS if p not in {x.position for x in objs}]
    others = [x for j, x in enumerate(objs) if j != i]
    color = rng.choice([c for c in shapes.COLORS if c != o.color])
    shape = rng.choice([s for s in shapes.SHAPES if s != o.shape])
    out = [
        (*others, dataclasses.replace(o, color=str(color))),
        (*others, dataclasses.replace(o, shape=str(shape))),
        (*others, dataclasses.replace(o, position=str(rng.choice(free)))),
        (*objs, Obj(str(color), str(shape), str(rng.choice(free)))),  # one object too many
    ]
    if len(objs) == 2:
        out.append(tuple(others))  # one object too few
        a, b = objs  # attributes swapped between the two objects
        out.append((dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)))
        out.append((dataclasses.replace(a, shape=b.shape), dataclasses.replace(b, shape=a.shape)))
    return [shapes.canonical(w) for w in out if set(w) != set(objs)]


def test_evaluator_rejects_wrong_attributes(rendered):
    rng = np.random.default_rng(0)
    data = rendered[32]
    images, prompts = [], []
    for img, objs in zip(data["images"][:400], data["objects"][:400], strict=False):
        for wrong in _wrong_variants(objs, rng):
            images.append(img)
            prompts.append(wrong)
    assert len(prompts) > 1500
    assert not shapes.scores(np.stack(images), prompts).any()
    img, objs = data["images"][0], data["objects"][0]
    assert shapes.score(img, objs) and shapes.score(img, shapes.caption(objs))
    assert not shapes.score(img, _wrong_variants(objs, rng)[0])


def test_evaluator_rejects_non_shapes():
    red = Obj("red", "square", "center")
    blank = np.zeros((32, 32, 3), np.uint8)
    assert shapes.detect(blank) == [] and not shapes.score(blank, [red])
    # A red frame filling the whole image is not a square in the center.
    full = np.zeros((32, 32, 3), np.uint8)
    full[1:-1, 1:-1] = (255, 0, 0)
    assert not shapes.score(full, [red])
    # A bar across two cells, a pink square (no palette colour), an upside-down triangle.
    bar = np.zeros((32, 32, 3), np.uint8)
    bar[14:19, 2:20] = (255, 0, 0)
    assert not any(shapes.score(bar, [dataclasses.replace(red, shape=s)]) for s in shapes.SHAPES)
    pink = shapes.render([red]).copy()
    pink[pink.max(-1) > 0] = (255, 128, 160)
    assert shapes.detect(pink)[0].color == shapes.UNKNOWN
    tri = shapes.render([Obj("red", "triangle", "center")], size=48)[::-1]
    assert shapes.detect(tri)[0].shape == shapes.UNKNOWN
    # Faint and tiny blobs are not objects.
    faint = (shapes.render([red]) * 0.4).astype(np.uint8)
    speck = blank.copy()
    speck[3:5, 3:5] = 255
    assert shapes.detect(faint) == [] and shapes.detect(speck) == []
    with pytest.raises(ValueError):
        shapes.detect(blank[..., :2])
    with pytest.raises(ValueError):
        shapes.detect(blank.astype(np.int32))


def test_evaluator_is_robust_to_blur_noise_and_dimming(rendered):
    rng = np.random.default_rng(0)
    for size, data in rendered.items():
        x = data["images"][:600]
        objs = data["objects"][:600]
        s = size / 32
        noise = rng.normal(0.0, 0.1, x.shape).astype(np.float32)
        cases = {
            "blur": blur(x, 0.7 * s),
            "noise": np.clip(x + noise, -1, 1),
            "blur+noise": np.clip(blur(x, 0.7 * s) + noise, -1, 1),
            "dim": (x + 1) * 0.65 - 1,
            "blur+dim": (blur(x, 0.7 * s) + 1) * 0.65 - 1,
        }
        for name, images in cases.items():
            acc = shapes.adherence(images, objs)
            assert acc >= 0.95, (size, name, acc)
