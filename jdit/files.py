"""Writing without losing the user's files: atomic writes, and what jdit may replace.

Every file jdit writes goes through :func:`atomic_file` (a temporary sibling, flushed to disk,
then renamed into place), so a crash or a full disk leaves the previous file, never half of one.
Every folder jdit replaces or writes into must first pass :func:`check_replaceable`: absent,
empty, or recognised as jdit's own by its marker (a checkpoint's ``config.json`` format, a run
directory's ``config.json``). Anything else is the user's and is refused, whatever flag was given.
A :class:`DirectoryLock` keeps a second process out of a folder one process is writing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

LOCK_NAME = ".jdit.lock"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it is flushed to disk
    and renamed to ``path``; on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected a file path to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def check_replaceable(path: str | os.PathLike, *, ours: Callable[[Path], bool],
                      what: str) -> None:
    """Raise ``FileExistsError`` unless ``path`` is absent, an empty folder (but for a jdit
    lock file), or ``ours(path)``
    (something jdit wrote, told by its marker). ``what`` names jdit's kind of folder in the
    message, e.g. "a jdit checkpoint"."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} is a file, not {what}; refusing to replace it")
    if not [p for p in path.iterdir() if p.name != LOCK_NAME] or ours(path):
        return
    raise FileExistsError(f"{path} holds files that are not {what}; refusing to replace or write "
                          "into it (choose another path, or move those files yourself)")


class DirectoryLocked(OSError):
    """Another live process holds the folder's lock."""


class DirectoryLock:
    """An exclusive lock on a folder for as long as the ``with`` block runs: a second process
    that tries to take it is refused with the holder's PID. It is an OS lock (``flock``) on
    ``<folder>/.jdit.lock``, so the kernel releases it however the holder ends, a kill included:
    a lock left by a dead process never blocks."""

    def __init__(self, folder: str | os.PathLike, what: str = "folder") -> None:
        self.path = Path(folder) / LOCK_NAME
        self.what = what
        self._file: Any = None

    def __enter__(self) -> DirectoryLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 (held open for the lock's lifetime)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise DirectoryLocked(f"{self.path.parent} is in use by another process ({holder}); "
                                  f"one process per {self.what}") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file that must hold an object (a ``config.json``, an index): a missing, unreadable,
    corrupt or non-object file is refused naming the file and what is wrong."""
    import json

    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text (UTF-8) JSON file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column "
                         f"{e.colno}); the file is damaged or was cut short") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(value).__name__}")
    return value
