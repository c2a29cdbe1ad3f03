"""Orbax checkpoints of the train state plus run metadata (data position), saved asynchronously.

Orbax writes each step into a temporary directory and renames it on completion, so a run killed
mid-save leaves the previous step as the latest readable checkpoint; unfinished temporaries are
ignored on restore.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

_LIST_ATTEMPTS = 5


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or one it was raised from) says the disk is full: an ``ENOSPC``
    ``OSError``, or TensorStore's ``RESOURCE_EXHAUSTED ... No space left on device``."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error) or "os_error_code='28'" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


class DiskFull(OSError):
    """A checkpoint could not be written for lack of space; the earlier ones are intact."""


class _QuietDiskFull(logging.Filter):
    """Drops orbax's and asyncio's log records of a full disk (one per array and thread, with
    tracebacks): the error reaches the user once, as :class:`DiskFull`."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        return "No space left on device" not in text and "os_error_code='28'" not in text


class _QuietReadOnly(logging.Filter):
    """Drops orbax's warnings that a manager opened read-only is read-only: jdit opens readers
    that way on purpose (sample, eval, finding the latest step after a failure)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("CheckpointManagerOptions.read_only=True")
                    or text.startswith("Given directory is read only="))


def _late_callback_for_closed_loop(unraisable: Any) -> bool:
    """TensorStore finishing a write after orbax's event loop has closed (the save was abandoned
    because an earlier write failed): ``call_soon_threadsafe`` raises in a TensorStore thread,
    which prints the traceback as unraisable, once per pending write (hundreds on a full disk)."""
    error, tb = unraisable.exc_value, unraisable.exc_traceback
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        return False
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return bool(names) and names[0] == "call_soon_threadsafe"


def _install_quiet_unraisable_hook() -> None:
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _late_callback_for_closed_loop(unraisable):
            previous(unraisable)

    hook.jdit_quiet = True  # type: ignore[attr-defined]
    if not getattr(previous, "jdit_quiet", False):
        sys.unraisablehook = hook


_QUIET = _QuietDiskFull()
for _name in ("absl", "asyncio"):
    logging.getLogger(_name).addFilter(_QUIET)
logging.getLogger("absl").addFilter(_QuietReadOnly())
_install_quiet_unraisable_hook()


class Checkpointer:
    """``save(step, state, meta)`` every ``every`` steps (or when forced), keep the last ``keep``."""

    def __init__(self, directory: str | Path, every: int, keep: int = 3,
                 async_save: bool = True, read_only: bool = False,
                 this_process_only: bool = False) -> None:
        """``read_only`` opens a run's checkpoints without touching them (sample, eval, or
        watching a run that is still training: a writer removes unfinished temporaries on open,
        which would break a save in flight). ``this_process_only`` (read-only) lists the steps
        without waiting for the other hosts: each host may look at a different moment."""
        if this_process_only and not read_only:
            raise ValueError("this_process_only=True needs read_only=True")
        self.every, self.read_only = every, read_only
        here = jax.process_index()
        processes = (ocp.options.MultiprocessingOptions(primary_host=here, active_processes={here})
                     if this_process_only else ocp.options.MultiprocessingOptions())
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=async_save and not read_only,
            cleanup_tmp_directories=not read_only, multiprocessing_options=processes)
        # A live run deletes its oldest step as it saves a new one; a reader listing the
        # directory at that moment finds a step gone before it could read it: list again.
        for attempt in range(_LIST_ATTEMPTS):
            try:
                self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)
                break
            except FileNotFoundError:
                if not read_only or attempt == _LIST_ATTEMPTS - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        with self._disk_full_said_once():
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    @contextlib.contextmanager
    def _disk_full_said_once(self) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            if not is_disk_full(e):
                raise
            with contextlib.suppress(Exception):
                self.manager.reload()
            intact = self.manager.latest_step()
            kept = f"step {intact} is the latest intact checkpoint" if intact is not None else \
                "no checkpoint was completed"
            # saves are asynchronous: the write that failed may be an earlier step's
            raise DiskFull(errno.ENOSPC, f"disk full while saving a checkpoint in "
                           f"{self.manager.directory}; {kept}. Free some space and run the same "
                           "command to resume") from None

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """The state and metadata of ``step``, or of the newest checkpoint that reads back whole.

        A damaged checkpoint (a truncated or missing file) is skipped with a warning naming it,
        and an older one restored; a writer moves the damaged step aside to
        ``damaged-<step>-<time>`` (kept for inspection, out of the way of the steps to come)."""
        steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        damaged: list[tuple[int, str]] = []
        for s in steps:
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 (orbax / TensorStore raise many kinds)
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                damaged.append((s, reason))
                if step is None:
                    warnings.warn(f"checkpoint step {s} in {self.manager.directory} cannot be "
                                  f"restored ({reason}); trying an older one", stacklevel=2)
                continue
            if damaged and not self.read_only:
                self._set_aside([d for d, _ in damaged])
            return out["state"], dict(out["meta"])
        listed = "; ".join(f"step {s}: {reason}" for s, reason in damaged)
        raise ValueError(f"no usable checkpoint in {self.manager.directory} ({listed})")

    def _set_aside(self, steps: list[int]) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for s in steps:
            path = Path(self.manager.directory) / str(s)
            if path.exists():
                aside = path.with_name(f"damaged-{s}-{stamp}")
                os.replace(path, aside)
                warnings.warn(f"moved the damaged checkpoint {path} to {aside}", stacklevel=3)
        self.manager.reload()

    def wait(self) -> None:
        with self._disk_full_said_once():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            with self._disk_full_said_once():
                self.manager.wait_until_finished()
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                self.manager.close()
            raise
        self.manager.close()
