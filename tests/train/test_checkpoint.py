"""Checkpoints: atomic steps, readers beside a live run, damaged steps skipped for older ones."""

from __future__ import annotations

import re
import warnings

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from jdit.train.checkpoint import Checkpointer, DiskFull, is_disk_full


def _state(step):
    return {"w": jnp.full((32, 32), float(step)), "b": jnp.arange(8.0) + step}


def _write(directory, steps=(1, 2, 3)):
    writer = Checkpointer(directory, every=1, keep=5, async_save=False)
    for step in steps:
        writer.save(step, _state(step), {"data_index": step})
    writer.close()


def _truncate_data(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncated data", "missing metadata"])
def test_a_damaged_newest_checkpoint_falls_back_to_an_older_one(tmp_path, damage):
    _write(tmp_path)
    if damage == "truncated data":
        _truncate_data(tmp_path / "3")
    else:
        (tmp_path / "3" / "meta" / "metadata").unlink()
    abstract = _state(0)
    # a reader (sample, eval) restores step 2, warns naming step 3, touches nothing
    with pytest.warns(UserWarning, match=re.escape(f"checkpoint step 3 in {tmp_path}")):
        state, meta = Checkpointer(tmp_path, every=0, read_only=True).restore(abstract)
    assert meta["data_index"] == 2 and float(state["w"][0, 0]) == 2.0
    assert (tmp_path / "3").is_dir()
    # a writer (a resuming run) moves the damaged step aside, for inspection, and saves on
    writer = Checkpointer(tmp_path, every=1, keep=5, async_save=False)
    with pytest.warns(UserWarning, match="moved the damaged checkpoint"):
        state, meta = writer.restore(abstract)
    assert meta["data_index"] == 2 and writer.latest_step() == 2
    (aside,) = tmp_path.glob("damaged-3-*")
    assert (aside / "state").is_dir()
    writer.save(3, _state(30), {"data_index": 3})
    writer.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state, meta = Checkpointer(tmp_path, every=0, read_only=True).restore(abstract)
    assert meta["data_index"] == 3 and float(state["w"][0, 0]) == 30.0


def test_no_usable_checkpoint_is_said_clearly(tmp_path):
    _write(tmp_path, steps=(1, 2))
    for step in ("1", "2"):
        _truncate_data(tmp_path / step)
    with pytest.warns(UserWarning), pytest.raises(
            ValueError, match=re.escape(f"no usable checkpoint in {tmp_path} (step 2: ")):
        Checkpointer(tmp_path, every=0, read_only=True).restore(_state(0))
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        Checkpointer(tmp_path / "empty", every=1).restore(_state(0))


def test_a_reader_survives_a_step_deleted_while_it_lists(tmp_path, monkeypatch):
    """A live run removes its oldest step while `jdit eval` (a read-only Checkpointer) lists the
    directory; the reader lists again instead of failing."""
    writer = Checkpointer(tmp_path, every=1, keep=2, async_save=False)
    for step in (1, 2):
        writer.save(step, {"w": jnp.full(3, float(step))}, {"step": step})
    writer.close()
    real, calls = ocp.CheckpointManager, []

    def racing(directory, options):
        calls.append(directory)
        if len(calls) == 1:  # what orbax raises when a listed step's directory has gone
            raise FileNotFoundError(f"{directory}/1")
        return real(directory, options=options)

    monkeypatch.setattr(ocp, "CheckpointManager", racing)
    assert Checkpointer(tmp_path, every=0, read_only=True).latest_step() == 2 and len(calls) == 2
    calls.clear()
    with pytest.raises(FileNotFoundError):  # a writer does not hide it
        Checkpointer(tmp_path, every=1)


def test_a_full_disk_is_one_clear_error_and_the_last_checkpoint_stays(tmp_path, monkeypatch):
    _write(tmp_path, steps=(1, 2))
    writer = Checkpointer(tmp_path, every=1, keep=5, async_save=False)

    def full(*args, **kwargs):  # what orbax raises (through TensorStore) when a write fails
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/0": Failed to write 4096 bytes: '
                         "No space left on device [os_error_code='28']")

    monkeypatch.setattr(writer.manager, "save", full)
    with pytest.raises(DiskFull, match=re.escape(f"disk full while saving a checkpoint in {tmp_path}; "
                                                 "step 2 is the latest intact checkpoint")) as e:
        writer.save(3, _state(3), {"data_index": 3})
    assert e.value.errno == 28 and is_disk_full(e.value)
    writer.close()
    state, meta = Checkpointer(tmp_path, every=0, read_only=True).restore(_state(0))
    assert meta["data_index"] == 2 and float(state["w"][0, 0]) == 2.0
    assert not is_disk_full(ValueError("RESOURCE_EXHAUSTED: out of memory"))


def test_late_tensorstore_callbacks_for_a_closed_loop_are_not_printed(monkeypatch):
    import asyncio
    import sys
    import types

    import jdit.train.checkpoint as checkpoint

    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        late = e
    # as TensorStore's thread reports it: raised by call_soon_threadsafe called from native code
    report = types.SimpleNamespace(exc_type=RuntimeError, exc_value=late, err_msg=None,
                                   exc_traceback=late.__traceback__.tb_next, object=None)
    assert checkpoint._late_callback_for_closed_loop(report)
    other = types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("boom"),
                                  exc_traceback=None, err_msg=None, object=None)
    assert not checkpoint._late_callback_for_closed_loop(other)
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoint._install_quiet_unraisable_hook()
    sys.unraisablehook(report)
    sys.unraisablehook(other)
    assert seen == [other]  # everything else still reaches the hook that was there before
    checkpoint._install_quiet_unraisable_hook()  # installing twice does not stack hooks
    sys.unraisablehook(other)
    assert seen == [other, other]


@pytest.mark.slow
def test_a_run_on_a_full_disk_says_so_in_one_line(tmp_path):
    """A real full file system (a 3 MB tmpfs; needs the right to mount, as root in CI here)."""
    import subprocess
    import sys
    from pathlib import Path

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        root = Path(__file__).resolve().parents[2]
        overrides = ["train.steps=60", "train.checkpoint_every=2", "train.keep_checkpoints=50",
                     "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                     "train.batch_size=8", "train.sample_every=0"]
        done = subprocess.run(
            [sys.executable, "-m", "jdit.cli", "train", "--config",
             str(root / "configs" / "digits_tiny.py"), "--workdir", str(mount / "run")]
            + [f"--config.{o}" for o in overrides], capture_output=True, text=True, cwd=root,
            env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
        assert done.returncode == 1, done.stderr[-3000:]
        # Nothing but the progress bar and one line: no orbax per-array errors, no tracebacks of
        # TensorStore threads finishing writes for orbax's closed event loop.
        said = [line for line in done.stderr.split("\n") if line.strip() and "/60 [" not in line]
        assert len(said) == 1, said[:10]
        assert said[0].startswith("jdit train: error: [Errno 28] disk full while "), said
        latest = int(done.stderr.split("; step ")[1].split(" ")[0])
        state = Checkpointer(mount / "run" / "checkpoints", every=0, read_only=True)
        assert state.latest_step() == latest
    finally:
        subprocess.run(["umount", str(mount)], check=True)
