"""Nothing of the user's is lost: atomic writes, and jdit replaces only what it wrote."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import numpy as np
import pytest

import jdit
from jdit.cli import main as cli_main
from jdit.config import load_config
from jdit.files import (
    DirectoryLock,
    DirectoryLocked,
    atomic_file,
    atomic_write,
    check_replaceable,
    read_json_object,
)
from jdit.train.loop import is_run_directory, load_trained, train

ROOT = Path(__file__).resolve().parents[1]


def user_files(folder: Path) -> dict[str, bytes]:
    """A folder of someone's work: a file, a nested one, and a `checkpoints/` of their own."""
    files = {"notes.txt": b"my notes", "data/table.csv": b"a,b\n1,2\n",
             "checkpoints/7/weights.bin": b"\x00" * 16, "config.json": b'{"mine": true}'}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def assert_intact(folder: Path, files: dict[str, bytes]) -> None:
    assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == set(files)
    for name, data in files.items():
        assert (folder / name).read_bytes() == data


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "a" / "f.json"
    atomic_write(path, "first")
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"half of the second")
        raise RuntimeError("disk full, say")
    assert path.read_text() == "first"
    assert [p.name for p in path.parent.iterdir()] == ["f.json"]  # no temporary left behind
    with pytest.raises(IsADirectoryError, match="is a folder; expected a file"):
        atomic_write(tmp_path / "a", b"x")


def test_check_replaceable(tmp_path):
    def ours(p):
        return (p / "mark").exists()

    check_replaceable(tmp_path / "absent", ours=ours, what="ours")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", ours=ours, what="ours")
    (tmp_path / "marked").mkdir()
    (tmp_path / "marked" / "mark").write_text("")
    check_replaceable(tmp_path / "marked", ours=ours, what="ours")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not ours"):
        check_replaceable(tmp_path / "file", ours=ours, what="ours")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "x").write_text("")
    with pytest.raises(FileExistsError, match="holds files that are not ours"):
        check_replaceable(tmp_path / "theirs", ours=ours, what="ours")


def _tiny_checkpoint_source(tmp_path: Path) -> Path:
    module = jdit.models.build("dit", input_size=4, patch_size=2, in_channels=4, hidden_size=32,
                               depth=1, num_heads=2, num_classes=3)
    params = jdit.models.init_params(module, jax.random.key(0))
    jdit.models.save_pretrained(module, params, tmp_path / "src")
    return tmp_path / "src"


def test_convert_and_save_never_replace_the_users_files(tmp_path, capsys):
    src = _tiny_checkpoint_source(tmp_path)
    dst = tmp_path / "dst"
    dst.mkdir()
    files = user_files(dst)
    for flags in ([], ["--overwrite"]):
        assert cli_main(["convert", str(src), str(dst), *flags]) == 1
        err = capsys.readouterr().err
        assert "holds files that are not a jdit checkpoint" in err and "Traceback" not in err
        assert_intact(dst, files)
    module, params = jdit.models.from_pretrained(src)
    with pytest.raises(FileExistsError):
        jdit.models.save_pretrained(module, params, dst, overwrite=True)
    assert_intact(dst, files)
    # an empty folder takes a checkpoint; a checkpoint is replaced only with --overwrite
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["convert", str(src), str(empty)]) == 0
    assert cli_main(["convert", str(src), str(empty)]) == 1
    assert "pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert cli_main(["convert", str(src), str(empty), "--overwrite"]) == 0
    got = jdit.models.from_pretrained(empty)[1]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_training_refuses_a_folder_of_the_users_files(tmp_path):
    files = user_files(tmp_path)
    config = load_config(ROOT / "configs" / "digits_tiny.py", ["train.steps=1"])
    with pytest.raises(FileExistsError, match="not a jdit run directory"):
        train(config, tmp_path, quiet=True)
    assert_intact(tmp_path, files)
    assert not is_run_directory(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
    assert is_run_directory(tmp_path / "run")


def test_a_directory_lock_admits_one_holder(tmp_path):
    with DirectoryLock(tmp_path / "run", "run directory"):
        with pytest.raises(DirectoryLocked, match=f"in use by another process \\(pid {os.getpid()} "
                           ".*one process per run directory"), DirectoryLock(tmp_path / "run",
                                                                   "run directory"):
            pass
    with DirectoryLock(tmp_path / "run"):  # released on exit
        pass
    # a folder holding only the lock file counts as empty for a new run
    check_replaceable(tmp_path / "run", ours=lambda p: False, what="ours")


@pytest.mark.slow
def test_a_directory_lock_dies_with_its_process(tmp_path):
    """Another process is refused while the holder lives; a killed holder's lock file blocks no
    one (the kernel drops the lock with the process)."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from jdit.files import "
                               "DirectoryLock; held = DirectoryLock(sys.argv[1]).__enter__(); "
                               "print('held', flush=True); time.sleep(60)", str(tmp_path / "k")],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DirectoryLocked, match=f"pid {holder.pid} "), DirectoryLock(tmp_path / "k"):
        pass
    holder.kill()
    holder.wait()
    with DirectoryLock(tmp_path / "k"):
        pass


def test_json_files_that_are_damaged_or_not_objects_are_named(tmp_path):
    path = tmp_path / "config.json"
    for text, message in [('{"model": {"hidden', "is not valid JSON"),
                          ("[1, 2]", "must hold a JSON object, got a list")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"{path} {message}")):
            read_json_object(path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="is not a text"):
        read_json_object(path)
    # a run directory whose config.json was damaged: sample and eval say which file
    path.write_text('{"model": {"family": "dit"}, "optim": {"lr": 0.1}, "train": {"steps": 0}}')
    with pytest.raises(ValueError, match=re.escape(f"{path}: train.steps must be an integer > 0")):
        load_trained(tmp_path)
