"""Control training on your own images: ``jdit cache --condition canny|FOLDER`` stores each
image's condition beside it, and a control run (condition LoRA or ControlNet) trains from that
cache; SANA bases train SANA's ControlNet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image")

from jdit.cli import main as jdit  # noqa: E402 (after the importorskip)
from jdit.config import load_config  # noqa: E402
from jdit.control.extractors import canny  # noqa: E402
from jdit.data import shapes  # noqa: E402
from jdit.data.cache import FeatureCache  # noqa: E402
from jdit.data.loader import resize_center_crop, to_unit_range  # noqa: E402
from jdit.train.loop import load_trained, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "train.batch_size=2",
        "train.checkpoint_every=0", "train.log_every=1", "sample.steps=2",
        "optim.warmup_steps=0", "train.ema_decay=0.0"]


def _photos(path: Path, n: int) -> list[str]:
    """Shapes images at 64 px (cached at 32: the condition is taken after the resize)."""
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    captions = []
    for i in range(n):
        objs = shapes.prompts("single" if i % 2 else "pair", "train")[i]
        image = shapes.render(objs, 64, rng)
        Image.fromarray(image).save(path / f"{i:02d}.png")
        captions.append(shapes.caption(objs))
        (path / f"{i:02d}.txt").write_text(captions[-1])
    return captions


def _cache(src: Path, out: Path, *extra: str) -> int:
    return jdit(["cache", str(src), str(out), "--vae", "identity", "--text-encoder",
                 "words:shapes", "--size", "32", "--no-progress", "--batch-size", "4", *extra])


@pytest.fixture(scope="module")
def canny_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("control_cache")
    _photos(tmp / "photos", 6)
    assert _cache(tmp / "photos", tmp / "cache", "--condition", "canny", "--canny", "50",
                  "150") == 0
    return tmp


def test_canny_conditions_are_the_edges_of_the_resized_images(canny_cache):
    cache = FeatureCache(canny_cache / "cache")
    assert len(cache) == 6
    assert cache.metadata["condition"] == {"kind": "canny", "low": 50.0, "high": 150.0}
    for i in range(6):
        ex = cache.get(f"{i:02d}.png")
        photo = np.asarray(Image.open(canny_cache / "photos" / f"{i:02d}.png"))
        resized = resize_center_crop(photo, 32, 32)
        np.testing.assert_array_equal(ex["latent"], to_unit_range(resized))
        edges = canny(resized, 50, 150)
        assert edges.any()  # shapes have edges
        np.testing.assert_array_equal(ex["condition"],
                                      to_unit_range(np.repeat(edges[..., None], 3, -1)))


def test_folder_conditions_are_matched_by_name_resized_and_checked(tmp_path):
    _photos(tmp_path / "photos", 4)
    cond = tmp_path / "masks"
    cond.mkdir()
    rng = np.random.default_rng(1)
    masks = {}
    for i in (0, 1):  # another extension, twice the size: same aspect ratio
        masks[i] = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
        Image.fromarray(masks[i]).save(cond / f"{i:02d}.jpg", quality=100)
    Image.fromarray(masks[0][:, :64]).save(cond / "02.png")  # a condition of another shape
    # 03 has none
    assert _cache(tmp_path / "photos", tmp_path / "cache", "--condition", str(cond)) == 0
    cache = FeatureCache(tmp_path / "cache")
    assert len(cache) == 2 and cache.metadata["condition"]["kind"] == "folder"
    for i in (0, 1):
        read = np.asarray(Image.open(cond / f"{i:02d}.jpg").convert("RGB"))
        np.testing.assert_array_equal(cache.get(f"{i:02d}.png")["condition"],
                                      to_unit_range(resize_center_crop(read, 32, 32)))
    skipped = {r["id"]: r["reason"] for r in map(
        json.loads, (tmp_path / "cache" / "skipped.jsonl").read_text().splitlines())}
    assert skipped == {"02.png": "condition_mismatch", "03.png": "missing_condition"}
    # a folder that does not exist: refused before anything is encoded
    assert _cache(tmp_path / "photos", tmp_path / "other", "--condition",
                  str(tmp_path / "nowhere")) == 1
    assert not (tmp_path / "other" / "index.json").exists()


@pytest.mark.slow
def test_control_runs_train_from_a_condition_cache(canny_cache):
    tmp, data = canny_cache, [f"data.path={canny_cache / 'cache'}", "model.input_size=32"]
    cfg = str(ROOT / "configs" / "shapes_tiny.py") + ":cache"
    train(load_config(cfg, [*data, *TINY, "train.steps=2", "train.sample_every=0"]),
          tmp / "base", quiet=True)
    # a condition LoRA: previews show the cache's captions with their examples' conditions
    lora = load_config(cfg, [*data, *TINY, "train.steps=2", "train.sample_every=2",
                             f"train.init_from={tmp / 'base'}", "control.method=easycontrol",
                             "lora.rank=4", "lora.targets=['attention']"])
    assert np.isfinite(train(lora, tmp / "canny", quiet=True)["loss"])
    prompts = (tmp / "canny" / "samples" / "prompts.txt").read_text().splitlines()
    assert prompts and all(p.startswith("[canny] ") for p in prompts)
    assert any((tmp / "canny" / "samples").glob("*.png"))
    run, params, _ = load_trained(tmp / "canny")
    assert run.task.condition == "canny"
    ex = run.task.batch(0)
    assert ex["condition"].shape == ex["images"].shape == (2, 32, 32, 3)
    # (a ControlNet reads the same batches: tests/control/test_control_training.py trains one)


@pytest.mark.slow
def test_a_sana_base_trains_sanas_controlnet(tmp_path):
    from jdit.models.sana_controlnet import SanaControlNet
    from jdit.train.tasks import render_conditions

    cfg = str(ROOT / "configs" / "shapes_tiny_linear.py")
    small = [*TINY, "model.cross_num_heads=2", "train.sample_every=0"]
    train(load_config(cfg, [*small, "train.steps=2"]), tmp_path / "base", quiet=True)
    train(load_config(cfg, [*small, "train.steps=3", f"train.init_from={tmp_path / 'base'}",
                            "data.condition=silhouette", "control.method=controlnet",
                            "control.guess_mode=True"]), tmp_path / "net", quiet=True)
    run, params, step = load_trained(tmp_path / "net")
    assert step == 3 and isinstance(run.controlnet, SanaControlNet)
    assert run.controlnet.depth == 1  # round(2 * 7 / 20): SANA's share of copied blocks
    # the copies started as the base's modules (embeddings included, as SANA's)
    assert "patch_embed" in params.adapters and "controlnet_block_0" in params.adapters
    cond = run.task.encode(["", "a red square in the center"])
    # no condition: the base (the generator path test_control_training.py checks bit for bit)
    plain = run.generate(params, cond, seed=0, num_steps=2)
    objs = [(shapes.Obj("red", "square", "center"),)] * 2
    cond["condition"] = render_conditions(objs, "silhouette", 32)
    assert np.abs(run.generate(params, cond, seed=0, num_steps=2) - plain).max() > 1e-5
