"""Conditions of the shapes data: partial conditions (a share of two-object images trained with
a condition that shows one of the objects and a caption that is never dropped: what lets
condition LoRAs compose), and conditions at a smaller size than the image."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdit
from jdit.config import load_config
from jdit.data import shapes
from jdit.nn import perturbed
from jdit.train.step import make_loss_fn


def _lit(image):  # pixels drawn (any channel above black)
    return image.max(-1) > -1.0


def test_a_partial_condition_shows_one_of_the_pairs_objects_where_the_image_has_it():
    b = shapes.batch(0, 3, 64, condition="silhouette", partial=0.5)
    flags = b["partial"]
    pairs = np.array([len(o) == 2 for o in b["objects"]])
    assert flags.any() and not (flags & ~pairs).any()  # only pairs, and some of them
    for n in range(64):
        image, cond = _lit(b["images"][n]), _lit(b["conditions"][n])
        assert cond.any() and not (cond & ~image).any()  # inside the image's objects
        if flags[n]:  # one object: far fewer pixels than the image's two
            assert cond.sum() < 0.8 * image.sum()
        else:
            np.testing.assert_array_equal(cond, image)
    # without it, batches are those of before (no flag, every condition whole)
    plain = shapes.batch(0, 3, 64, condition="silhouette")
    assert "partial" not in plain
    np.testing.assert_array_equal(_lit(plain["conditions"]), _lit(plain["images"]))
    with pytest.raises(ValueError, match="partial"):
        shapes.batch(0, 3, 8, partial=0.5)  # no condition to make partial
    with pytest.raises(ValueError, match="partial"):
        shapes.batch(0, 3, 8, condition="outline", partial=1.5)


def test_render_only_draws_the_chosen_objects_of_the_condition_with_the_images_jitter():
    objs = (shapes.Obj("red", "square", "top left"), shapes.Obj("blue", "circle", "center"))
    styles = ("color", "silhouette")
    full = shapes.render_styles(objs, 32, np.random.default_rng(1), styles)
    parts = [shapes.render_styles(objs, 32, np.random.default_rng(1), styles, only=(o,))
             for o in objs]
    for image, _ in parts:
        np.testing.assert_array_equal(image, full[0])  # the image keeps both objects
    a, b = (p[1] > 0 for p in parts)
    assert a.any() and b.any() and not (a & b).any()
    np.testing.assert_array_equal(a | b, full[1] > 0)
    with pytest.raises(ValueError, match="only="):
        shapes.render_styles(objs, 32, None, styles, only=(shapes.Obj("red", "circle", "center"),))


def test_the_task_keeps_the_captions_of_partial_rows():
    config = load_config("configs/shapes_control.py", ["data.partial_condition=0.5",
                                                       "train.batch_size=16"])
    from jdit.train.tasks import ShapesTask

    task = ShapesTask(config.data, 16, 0)
    batch = task.batch(2)
    assert batch["keep_caption"].dtype == bool and batch["keep_caption"].shape == (16,)
    assert batch["keep_caption"].any()
    with pytest.raises(ValueError, match="partial_condition needs data.condition"):
        ShapesTask({**dict(config.data), "condition": None}, 16, 0)


def test_rows_with_keep_caption_never_lose_their_caption_to_dropout():
    module = jdit.models.build(dict(family="pixart", input_size=8, patch_size=2, in_channels=4,
                                    hidden_size=32, depth=1, num_heads=2, caption_channels=16,
                                    learn_sigma=False))
    params = perturbed(jdit.models.init_params(module, jax.random.key(0)), jax.random.key(1), 0.1)
    k1, k2 = jax.random.split(jax.random.key(2))
    batch = {"images": jax.random.normal(k1, (4, 8, 8, 4)),
             "context": jax.random.normal(k2, (4, 5, 16)),
             "context_mask": jnp.ones((4, 5), jnp.int32)}
    null = (jnp.zeros((1, 5, 16)), jnp.ones((1, 5), jnp.int32))
    diffusion = {"objective": "flow", "flow_shift": 3.0}
    kept = make_loss_fn(module, diffusion, 0.0, null)
    dropped = make_loss_fn(module, diffusion, 1.0, null)
    rng = jax.random.key(3)
    losses = jax.jit(lambda b: (kept(params, b, rng), dropped(params, b, rng)))
    keep, drop = losses(batch)
    assert abs(float(keep) - float(drop)) > 1e-4  # dropout changes the loss ...
    keep, drop = losses({**batch, "keep_caption": jnp.ones((4,), bool)})
    assert float(drop) == float(keep)  # ... but not on rows whose caption is kept


def test_resize_averages_areas_and_keeps_equal_sizes():
    rng = np.random.default_rng(0)
    images = rng.random((2, 32, 32, 3)).astype(np.float32)
    half = shapes.resize(images, (16, 16))
    want = images.reshape(2, 16, 2, 16, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(half, want, atol=1e-6)
    np.testing.assert_array_equal(shapes.resize(images, (32, 32)), images)
    assert shapes.resize(images, (32, 48)).shape == (2, 32, 48, 3)
    with pytest.raises(ValueError, match="N, H, W, C"):
        shapes.resize(images[0], (16, 16))


def test_the_task_gives_conditions_at_their_own_size():
    from jdit.train.tasks import ShapesTask

    config = load_config("configs/shapes_control.py", ["data.condition_size=16"])
    task = ShapesTask(config.data, 8, 0)
    full = ShapesTask({**dict(config.data), "condition_size": 0}, 8, 0)
    small, big = task.batch(1)["condition"], full.batch(1)["condition"]
    assert small.shape == (8, 16, 16, 3) and big.shape == (8, 32, 32, 3)
    np.testing.assert_allclose(small, shapes.resize(big, (16, 16)), atol=1e-6)

