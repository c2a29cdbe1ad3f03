"""Each library in its own process: torch's threads and jax's share two cores badly in one
(measured: jdit's step fell from 6.0 to 4.6 s over five steps with torch loaded beside it).

A benchmark's parent writes the weights and inputs to files, starts one worker process per
timed run (``python -m MODULE ARGS``, alternating libraries), and reads back the one JSON line
the worker prints last. Workers report their own peak memory (:func:`peak_rss_mb`).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_worker(module: str, args: Sequence[str], env: Mapping[str, str] | None = None,
               timeout: float = 3600.0) -> dict[str, Any]:
    """Run ``python -m module *args`` and return the JSON object on its last stdout line;
    ``env`` entries are added to this process's environment."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{module} {' '.join(map(str, args))} failed (exit "
                           f"{proc.returncode}):\n{proc.stderr[-3000:]}")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{module} printed no JSON result on its last line: "
                           f"{lines[-1][:200]!r}") from e


def emit(result: Mapping[str, Any]) -> None:
    """A worker's result: one JSON line on stdout, the last thing it prints."""
    sys.stdout.write(json.dumps(dict(result)) + "\n")
    sys.stdout.flush()
