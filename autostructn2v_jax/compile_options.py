"""XLA compiler options of the jitted functions that run the U-Net (train step, validation, prediction).

XLA:CPU (jax 0.10) hands convolutions to YNNPACK by default. On some CPUs XLA's own (Eigen)
convolution is much faster, on others it may not be: measured on a 2-core Intel Xeon with AVX-512
(2026-12-04), one 64x64, 32-channel 3x3 convolution's weight gradient (batch 16) took 34 ms with
YNNPACK and 10 ms without, and the whole stage-1 train step went from 576 to 311 ms (docs/benchmarks.md,
"Convolution library on CPU"). So on CPU the library is measured once per machine (``"auto"``):
:func:`measure` times a convolution's forward pass and both gradients each way, and the choice
is kept in ``cpu_conv_library.json`` beside the persistent compile cache. Networks under
:data:`EIGEN_MIN_FEATURES` keep YNNPACK (and with it the CPU split of ``parallel``), which trains
them faster.

``AUTOSTRUCTN2V_CPU_CONV`` = ``auto`` (default) | ``ynnpack`` | ``eigen`` overrides it. An
``XLA_FLAGS`` that sets ``xla_cpu_experimental_ynn_fusion_type`` itself is left alone, and so are
GPU/TPU backends and multi-process runs (every process must compile the same program: they keep
XLA's default unless the environment variable says otherwise).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax._src import xla_bridge

from . import files, parallel
from .errors import UserInputError

__all__ = ["CPU_CONV_LIBRARIES", "EIGEN_MIN_FEATURES", "ENV_VAR", "check_environment", "cpu_conv_library",
           "machine_key", "measure", "network_jit", "network_library", "network_options", "stage_library"]

log = logging.getLogger(__name__)

CPU_CONV_LIBRARIES = ("auto", "ynnpack", "eigen")
ENV_VAR = "AUTOSTRUCTN2V_CPU_CONV"
CACHE_FILE = "cpu_conv_library.json"
_FLAG = "xla_cpu_experimental_ynn_fusion_type"
# jax 0.10's default YNNPACK fusions without INDIVIDUAL_CONVOLUTION (read off the compiled HLO:
# REDUCE, INDIVIDUAL_CONVOLUTION, INDIVIDUAL_DOT give the default's fusions exactly).
_WITHOUT_CONV = "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
_OPTIONS = {"ynnpack": None, "eigen": {_FLAG: _WITHOUT_CONV}}
# Eigen is chosen only for a clear win: at most this fraction of YNNPACK's time.
WIN_RATIO = 0.85
# Eigen's lead is in layers of 32+ channels (64x64, batch 16: weight gradient 34 -> 10 ms at 32
# channels, 4.9 -> 4.4 ms at 16). A features-16 U-Net trained faster with YNNPACK on the CPU split
# into one device per core (16 x 64 x 16: 114 ms/step at depth 2, 144 at depth 3) than with Eigen
# (125 / 152-160 ms, one or two devices); features 32: Eigen 307 ms against 351 (Intel Xeon,
# 2026-12-04, docs/benchmarks.md). So "auto" keeps YNNPACK for networks below this many features.
EIGEN_MIN_FEATURES = 32


def network_library(features: int | None = None) -> str:
    """The library for a network of ``features`` base channels (None: unknown): this machine's
    choice, but YNNPACK below :data:`EIGEN_MIN_FEATURES`, where Eigen's lead is gone."""
    if (jax.default_backend() != "cpu" or _FLAG in os.environ.get("XLA_FLAGS", "")
            or jax.process_count() > 1):
        return "ynnpack"
    return stage_library(features)


def stage_library(features: int | None) -> str:
    """:func:`network_library` without looking at JAX's backend (the CLI asks before JAX starts).
    A network below :data:`EIGEN_MIN_FEATURES` needs no measurement: it keeps YNNPACK either way."""
    choice = check_environment()
    if choice != "auto":
        return choice
    if features is not None and int(features) < EIGEN_MIN_FEATURES:
        return "ynnpack"
    return cpu_conv_library()


def network_options(features: int | None = None) -> dict[str, Any] | None:
    """``compiler_options`` for ``jax.jit`` of a function that runs the network (None: XLA's own)."""
    return _OPTIONS[network_library(features)]


def network_jit(fn: Callable, *, features: int | None = None, **jit_kwargs) -> Callable:
    """``jax.jit(fn, **jit_kwargs)`` with :func:`network_options` (``features``: the network's base
    channels when known, e.g. ``apply_fn.features`` from ``models.make_apply_fn``)."""
    return jax.jit(fn, compiler_options=network_options(features), **jit_kwargs)


def check_environment() -> str:
    """The :data:`ENV_VAR` setting (``"auto"`` when unset); :class:`UserInputError` if invalid."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in CPU_CONV_LIBRARIES:
        raise UserInputError(f"{ENV_VAR} must be one of {', '.join(CPU_CONV_LIBRARIES)}, got {choice!r}")
    return choice


@functools.cache
def cpu_conv_library() -> str:
    """``"ynnpack"`` or ``"eigen"``: the environment variable's choice, else this machine's
    measured one (read from the cache file, or measured now and written there). Before JAX has
    started its backends (the command line decides the CPU split first) the measurement runs in a
    child process, so this process can still choose its device count."""
    choice = check_environment()
    if choice != "auto":
        return choice
    if parallel.multi_host_requested():
        return "ynnpack"
    path = _cache_path()
    key = machine_key()
    known = _read(path).get(key)
    if isinstance(known, dict) and known.get("library") in _OPTIONS:
        return known["library"]
    result = measure() if xla_bridge.backends_are_initialized() else _measure_in_child()
    log.info("CPU convolutions: %s (YNNPACK %.1f ms, Eigen %.1f ms per probe)", result["library"],
             result["ynnpack_ms"], result["eigen_ms"])
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            files.atomic_write_text(path, json.dumps({**_read(path), key: result}, indent=1) + "\n")
        except OSError as e:  # a read-only cache folder costs a measurement per process, no more
            log.debug("could not write %s: %s", path, e)
    return result["library"]


def _measure_in_child() -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter (a few seconds, once per machine); in this process
    if that fails."""
    code = "import json; from autostructn2v_jax import compile_options as c; print(json.dumps(c.measure()))"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=300, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        if result.get("library") in _OPTIONS:
            return result
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        log.debug("CPU convolution probe in a child process failed: %s", e)
    return measure()


def machine_key() -> str:
    """What the choice depends on: the CPU model, the cores this process may use, jax."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                         model)
    except OSError:
        pass
    return f"{model} | {parallel.available_cores()} cores | jax {jax.__version__}"


def measure(batch: int = 8, repeats: int = 5) -> dict[str, Any]:
    """Time one 3x3 convolution (64x64, 32 -> 32 channels; forward and both gradients) compiled
    with each library; interleaved best-of-``repeats``. About a second on a 2-core CPU."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (batch, 64, 64, 32), jnp.float32)
    w = jax.random.normal(k2, (3, 3, 32, 32), jnp.float32) * 0.1
    g = jax.random.normal(k3, (batch, 64, 64, 32), jnp.float32)

    def probe(x, w, g):
        conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y, vjp = jax.vjp(conv, x, w)
        return y, *vjp(g)

    compiled = {}
    for name, options in _OPTIONS.items():
        try:
            compiled[name] = jax.jit(probe, compiler_options=options).lower(x, w, g).compile()
            jax.block_until_ready(compiled[name](x, w, g))
        except Exception as e:  # noqa: BLE001  (an XLA that does not know the option: keep the default)
            log.debug("CPU convolution probe %s failed: %s", name, e)
            return {"library": "ynnpack", "ynnpack_ms": float("nan"), "eigen_ms": float("nan")}
    best = {name: float("inf") for name in compiled}
    for _ in range(repeats):
        for name, fn in compiled.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(x, w, g))
            best[name] = min(best[name], time.perf_counter() - t)
    library = "eigen" if best["eigen"] <= WIN_RATIO * best["ynnpack"] else "ynnpack"
    return {"library": library, "ynnpack_ms": 1e3 * best["ynnpack"], "eigen_ms": 1e3 * best["eigen"]}


def _cache_path() -> pathlib.Path | None:
    folder = jax.config.jax_compilation_cache_dir or os.environ.get("AUTOSTRUCTN2V_CACHE_DIR")
    return pathlib.Path(folder) / CACHE_FILE if folder else None


def _read(path: pathlib.Path | None) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
