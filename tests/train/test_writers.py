"""Run outputs read back by the real consumers: TensorBoard and Pillow."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from jdit.train.writers import MetricsWriter, crc32c, grid, read_jsonl, save_grid, write_png


def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_metrics_reach_jsonl_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in (1, 2, 5):
        writer.write(step, {"loss": 1.0 / step, "lr": np.float32(0.5)})
    writer.close()
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1] == {"step": 5, "loss": 0.2, "lr": 0.5}
    (events,) = tmp_path.glob("events.out.tfevents.*")
    acc = event_accumulator.EventAccumulator(str(events))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "lr"}
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert [s for s, _ in got] == [1, 2, 5]
    np.testing.assert_allclose([v for _, v in got], [1.0, 0.5, 0.2], rtol=1e-6)


def test_non_finite_metrics_stay_valid_json(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(3, {"loss": float("nan"), "grad_norm": float("inf"), "x": -float("inf"), "lr": 0.5})
    writer.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=pytest.fail) == {
        "step": 3, "loss": "nan", "grad_norm": "inf", "x": "-inf", "lr": 0.5}
    (row,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert math.isnan(row["loss"]) and row["grad_norm"] == math.inf and row["x"] == -math.inf


def test_a_resumed_writer_keeps_one_line_per_step(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # cut short by a kill
    writer = MetricsWriter(tmp_path, resume_step=3)  # the checkpoint the run resumes from
    writer.write(4, {"loss": 40.0})
    writer.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_a_grid_with_non_finite_images_is_not_written(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.float32)
    images[2, 1, 1, 1] = np.inf
    with pytest.raises(FloatingPointError, match=r"1 of 4 images hold NaN or infinite values \(indices \[2\]\)"):
        save_grid(tmp_path / "g.png", images)
    assert not list(tmp_path.iterdir())


def test_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), rgb)
    gray = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    write_png(tmp_path / "g.png", gray)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g.png")), gray)
    images = rng.uniform(-1, 1, (5, 4, 4, 1)).astype(np.float32)
    save_grid(tmp_path / "grid.png", images, columns=3, scale=2)
    tiled = np.asarray(Image.open(tmp_path / "grid.png"))
    assert tiled.shape == (2 * (8 + 2) + 2, 3 * (8 + 2) + 2, 3)
    assert grid(np.zeros((1, 2, 2, 3), np.uint8)).shape == (6, 6, 3)
