"""Multi-host start-up: one process per host, all running the same program.

    jdit train --config C --workdir gs://... --coordinator HOST:PORT --num-processes N --process-id I

or the environment ``JAX_COORDINATOR_ADDRESS``, ``JDIT_NUM_PROCESSES``, ``JDIT_PROCESS_ID``. On a
TPU pod slice (or SLURM) ``--distributed`` lets JAX discover all of it by itself. Call before any
other JAX work: the set of devices is fixed when the first backend starts.
"""

from __future__ import annotations

import os

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False) -> bool:
    """Join the process group if asked to (arguments, then environment); ``auto`` leaves the
    discovery to JAX (TPU pods, SLURM). Returns whether this is a multi-process run."""
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    n = num_processes if num_processes is not None else _env_int("JDIT_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int("JDIT_PROCESS_ID")
    given = {"coordinator address": address, "number of processes": n, "process id": pid}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(f"multi-host start-up needs all of {list(given)}; missing "
                             f"{missing} (flags --coordinator/--num-processes/--process-id or "
                             "JAX_COORDINATOR_ADDRESS/JDIT_NUM_PROCESSES/JDIT_PROCESS_ID)")
        if not 0 <= int(pid) < int(n):
            raise ValueError(f"process id {pid} must lie in [0, {n})")
        jax.distributed.initialize(address, int(n), int(pid))
        return True
    if auto:
        jax.distributed.initialize()
        return True
    return False


def is_primary() -> bool:
    """The process that writes run files (config, metrics, sample grids)."""
    return jax.process_index() == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
