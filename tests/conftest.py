"""Session-wide test settings.

Compiled programs are shared between processes: the tests that start processes (the CLI's
train / sample / eval / aot commands, the notebooks' kernels, the 8-device and multi-host
checks) compile the same train steps and samplers again and again, so every such subprocess
reads and writes one persistent JAX compilation cache, in a temporary folder made for this
session (every run starts cold, as CI does). The test processes themselves (the xdist workers)
do not use it: most of their compiles are the many small per-operation programs of eager
parity tests, for which computing a cache key costs more than compiling.
``JDIT_TEST_COMPILATION_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import os
import shutil
import tempfile

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWNED = "_JDIT_TEST_OWNS_COMPILATION_CACHE"


def pytest_configure(config) -> None:
    worker = hasattr(config, "workerinput")  # xdist workers inherit the controller's settings
    if not worker and os.environ.get("JDIT_TEST_COMPILATION_CACHE", "1") != "0" \
            and _CACHE_ENV not in os.environ:
        os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="jdit-test-xla-cache-")
        os.environ[_OWNED] = "1"
        # Programs that compile in under half a second are cheaper to compile than to store.
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    if os.environ.get(_OWNED):
        # JAX reads the setting once, when it is imported: import it without the variable, so
        # that this process compiles without the cache while its subprocesses inherit it.
        cache = os.environ.pop(_CACHE_ENV)
        import jax  # noqa: F401

        os.environ[_CACHE_ENV] = cache


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``long`` (minutes on one worker) go first, so that under ``pytest -n 2`` a
    worker starts on each while the other works through the rest, instead of one starting
    late and leaving the other idle at the end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable


def pytest_unconfigure(config) -> None:
    if not hasattr(config, "workerinput") and os.environ.pop(_OWNED, None):
        shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)
