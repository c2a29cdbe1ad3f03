"""The embedded ``shapes`` dataset: captions, splits, deterministic batches, rendering."""

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
from jdit.eval import shapes as evaluator

SINGLES = [(Obj(c, s, p),) for c in shapes.COLORS for s in shapes.SHAPES for p in shapes.POSITIONS]


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
        "a pink circle in the top left",
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
        _, comp = evaluator._components(fg[None])
        assert len(np.unique(comp)) == 2
        ys, xs = np.nonzero(fg)
        cells = set(((ys + 0.5) // (size / 3) * 3 + (xs + 0.5) // (size / 3)).astype(int))
        assert cells == {a, b}


def test_new_concepts_are_drawn_read_back_and_unknown_to_the_base_reader():
    from jdit.eval import shapes as evaluator
    from jdit.text.words import WordEncoder

    base = shapes.batch(0, 5, 256, pair_fraction=0.5)
    new = shapes.batch(0, 5, 256, pair_fraction=0.5, concepts="new", new_fraction=0.5)
    is_new = [any(o.color in shapes.NEW_COLORS or o.shape in shapes.NEW_SHAPES for o in objs)
              for objs in new["objects"]]
    assert 0.35 < np.mean(is_new) < 0.65
    # the other examples are the base batch's prompts
    assert [c for c, n in zip(new["captions"], is_new, strict=True) if not n] == \
        [c for c, n in zip(base["captions"], is_new, strict=True) if not n]
    assert evaluator.adherence(new["images"], new["objects"], extended=True) == 1.0
    # the base reader knows neither purple nor diamonds: such objects are unknown, never right
    base_read = evaluator.scores(new["images"], new["objects"])
    assert not base_read[np.asarray(is_new)].any()
    img = shapes.render([shapes.Obj("red", "diamond", "center")], 32)
    assert evaluator.detect(img) == [shapes.Obj("red", "unknown", "center")]
    # held-out new prompts never appear in training batches
    held = {shapes.caption(p) for p in shapes.prompts("single", "heldout", concepts="new")}
    assert len(held) == 27 and not held & set(new["captions"])
    # the new words come after the base vocabulary: every base word keeps its vector
    words = shapes.vocabulary()
    extended = shapes.vocabulary(extended=True)
    assert extended[:len(words)] == words and extended[len(words):] == ["diamond", "purple"]
    a, b = WordEncoder(tuple(words)), WordEncoder(tuple(extended))
    prompt = ["a red circle in the top left and a blue square in the center"]
    np.testing.assert_array_equal(a.encode(prompt)[0], b.encode(prompt)[0])
