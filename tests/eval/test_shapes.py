"""The exact shapes evaluator: reads objects back from images, tolerant of blur, noise, dimming."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jdit.data import shapes
from jdit.data.shapes import Obj
from jdit.eval import shapes as evaluator

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



def test_evaluator_is_exact_on_rendered_images(rendered):
    total = 0
    for size, data in rendered.items():
        acc = evaluator.adherence(data["images"], data["objects"])
        assert acc == 1.0, (size, acc)
        total += len(data["objects"])
    assert total >= 2000
    # uint8 input, captions as prompts, and every single prompt at 64x64 without jitter.
    imgs = np.stack([shapes.render(o, size=64) for o in SINGLES])
    assert evaluator.adherence(imgs, [shapes.caption(o) for o in SINGLES]) == 1.0
    assert evaluator.detect(imgs[0]) == list(SINGLES[0])


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
    assert not evaluator.scores(np.stack(images), prompts).any()
    img, objs = data["images"][0], data["objects"][0]
    assert evaluator.score(img, objs) and evaluator.score(img, shapes.caption(objs))
    assert not evaluator.score(img, _wrong_variants(objs, rng)[0])


def test_evaluator_rejects_non_shapes():
    red = Obj("red", "square", "center")
    blank = np.zeros((32, 32, 3), np.uint8)
    assert evaluator.detect(blank) == [] and not evaluator.score(blank, [red])
    # A red frame filling the whole image is not a square in the center.
    full = np.zeros((32, 32, 3), np.uint8)
    full[1:-1, 1:-1] = (255, 0, 0)
    assert not evaluator.score(full, [red])
    # A bar across two cells, a pink square (no palette colour), an upside-down triangle.
    bar = np.zeros((32, 32, 3), np.uint8)
    bar[14:19, 2:20] = (255, 0, 0)
    assert not any(evaluator.score(bar, [dataclasses.replace(red, shape=s)]) for s in shapes.SHAPES)
    pink = shapes.render([red]).copy()
    pink[pink.max(-1) > 0] = (255, 128, 160)
    assert evaluator.detect(pink)[0].color == evaluator.UNKNOWN
    tri = shapes.render([Obj("red", "triangle", "center")], size=48)[::-1]
    assert evaluator.detect(tri)[0].shape == evaluator.UNKNOWN
    # Faint and tiny blobs are not objects.
    faint = (shapes.render([red]) * 0.4).astype(np.uint8)
    speck = blank.copy()
    speck[3:5, 3:5] = 255
    assert evaluator.detect(faint) == [] and evaluator.detect(speck) == []
    with pytest.raises(ValueError):
        evaluator.detect(blank[..., :2])
    with pytest.raises(ValueError):
        evaluator.detect(blank.astype(np.int32))


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
            acc = evaluator.adherence(images, objs)
            assert acc >= 0.95, (size, name, acc)


def test_adherence_without_pairs_reports_singles_only():
    """``num_pairs=0`` (the LiT test's short teacher): the single-object figures alone, from a
    generator that draws every prompt exactly (adherence 1)."""
    from jdit.data import shapes as data_shapes
    from jdit.train.tasks import shapes_adherence

    def perfect(cond, s):
        objs = data_shapes.prompts("single", "heldout")
        return np.stack([data_shapes.to_float(data_shapes.render(objs[(s + i) % len(objs)], 32))
                         for i in range(len(cond["context"]))])

    out = shapes_adherence(perfect, lambda caps: {"context": np.zeros((len(caps), 1))},
                           batch_size=54, num_pairs=0, single_repeats=1)
    assert out["adherence_single"] == 1.0 and "adherence_pair" not in out


def test_objects_found_scores_each_object_of_a_pair_on_its_own():
    rng = np.random.default_rng(0)
    pairs = shapes.prompts("pair", "heldout")[:6]
    images = np.stack([shapes.render(p, 32, rng) for p in pairs])
    np.testing.assert_array_equal(evaluator.objects_found(images, pairs), np.ones((6, 2), bool))
    # the second object drawn in another colour: the first still counts, the second does not
    recoloured = []
    for a, b in pairs:
        other = next(c for c in shapes.COLORS if c not in (a.color, b.color))
        recoloured.append(shapes.render((a, dataclasses.replace(b, color=other)), 32, rng))
    found = evaluator.objects_found(np.stack(recoloured), pairs)
    assert found[:, 0].all() and not found[:, 1].any()
    with pytest.raises(ValueError, match="different numbers of objects"):
        evaluator.objects_found(images[:2], [pairs[0], pairs[1][:1]])
