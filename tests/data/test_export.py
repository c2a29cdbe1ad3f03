"""export_dataset: an exported folder reads back (open_source) as exactly the first N training
examples of that seed; a folder that is not jdit's is never written into."""

import argparse
import json

import numpy as np
import pytest

pytest.importorskip("PIL.Image")

from jdit.config import DATA  # noqa: E402 (after the importorskip)
from jdit.data import digits, export, shapes  # noqa: E402
from jdit.data.export import export_dataset  # noqa: E402
from jdit.data.loader import to_unit_range  # noqa: E402
from jdit.data.sources import ImageFolderSource, open_source  # noqa: E402
from jdit.train.tasks import DigitsTask, ShapesTask  # noqa: E402


def test_defaults_are_the_training_tasks():
    for name, defaults in export.TASK_DEFAULTS.items():
        assert {k: DATA[name][k] for k in defaults} == defaults


def test_shapes_export_is_the_first_training_examples(tmp_path):
    seed, batch_size, n = 3, 2, 5  # crosses batches, ends inside one
    out = export_dataset("shapes", tmp_path / "shapes", n, seed=seed, size=24,
                         batch_size=batch_size)
    assert sorted(p.name for p in out.iterdir())[:3] == ["00000.png", "00000.txt", "00001.png"]
    src = open_source(out)
    assert isinstance(src, ImageFolderSource) and src.kind == "text" and len(src) == n
    task = ShapesTask({"name": "shapes", "size": 24}, batch_size, seed)
    for i in range(n):
        k, row = divmod(i, batch_size)
        ex = src[i]
        trained = task.batch(k)["images"][row]
        np.testing.assert_array_equal(to_unit_range(ex["image"]), trained)  # exact
        caption = shapes.batch(seed, k, batch_size, size=24, pair_fraction=0.5)["captions"][row]
        assert ex["caption"] == caption and ex["id"] == f"{i:05d}.png"


def test_digits_export_is_the_first_training_examples(tmp_path):
    seed, batch_size, n = 1, 3, 4
    out = export_dataset("digits", tmp_path / "digits", n, seed=seed, size=12,
                         batch_size=batch_size)
    assert (out / "00003.cls").read_text() == f"{digits.batch(seed, 1, 3, 12)['labels'][0]}\n"
    src = open_source(out, label=True)
    assert src.kind == "class" and len(src) == n
    task = DigitsTask({"name": "digits", "size": 12}, batch_size, seed)
    for i in range(n):
        k, row = divmod(i, batch_size)
        batch = task.batch(k)
        ex = src[i]
        assert ex["label"] == batch["labels"][row]
        grey = ex["image"]
        assert grey.shape == (12, 12, 3) and (grey == grey[..., :1]).all()
        expected = np.round((batch["images"][row, ..., 0].astype(np.float64) + 1) * 127.5)
        np.testing.assert_array_equal(grey[..., 0], expected)
        error = np.abs(to_unit_range(grey[..., 0]) - batch["images"][row, ..., 0]).max()
        assert error <= 1 / 255 + 1e-6  # half a step of 2/255, and float32 rounding


def test_refuses_folders_that_are_not_exports(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a jdit export"):
        export_dataset("shapes", mine, 1, size=24)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        export_dataset("shapes", tmp_path / "file", 1, size=24)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(open_source(export_dataset("digits", empty, 2, size=8), label=True)) == 2
    # An earlier export is replaced whole: no example of the longer one is left behind.
    export_dataset("digits", empty, 1, size=8)
    assert sorted(p.name for p in empty.iterdir()) == ["00000.cls", "00000.png", export.MARKER]
    assert json.loads((empty / export.MARKER).read_text())["num_examples"] == 1
    with pytest.raises(ValueError, match=r"embedded datasets are \['digits', 'shapes'\]"):
        export_dataset("mnist", tmp_path / "x", 1)
    with pytest.raises(ValueError, match="num_examples must be an integer >= 1"):
        export_dataset("shapes", tmp_path / "x", 0)


def test_a_failed_export_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="size must be an integer >= 24"):
        export_dataset("shapes", tmp_path / "out", 2, size=8)
    assert list(tmp_path.iterdir()) == []


def test_command_line(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    args = parser.parse_args(["digits", str(tmp_path / "d"), "-n", "3", "--size", "8",
                              "--seed", "2", "--batch-size", "2"])
    assert export.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_examples"] == 3 and printed["directory"] == str(tmp_path / "d")
    assert printed["read_with"] == "open_source(folder, label=True)"
    assert len(open_source(tmp_path / "d", label=True)) == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["digits", str(tmp_path / "e"), "-n", "0"])
    assert "expected an integer >= 1, got 0" in capsys.readouterr().err
