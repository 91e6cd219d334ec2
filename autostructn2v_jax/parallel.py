"""Data parallelism through `jax.sharding`: a 1-D mesh over the batch axis.

The train state and the image bank are replicated; each step's batch of patches is constrained to
be split over the `data` axis, and XLA (GSPMD) partitions the rest, including the BatchNorm
statistics, which are reduced over the global batch. Multi-host: call `initialize_distributed()`
(`jax.distributed.initialize`) in every process before anything else; every process reads the same
images and draws the same keys, so the global batch is identical everywhere; only the main
process (`is_main_process`) writes host-side files.
"""

from __future__ import annotations

import logging
import os

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)


def multi_host_requested() -> bool:
    """Whether the launcher asked for a multi-host run (the usual environment variables)."""
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("AUTOSTRUCTN2V_DISTRIBUTED"))


def initialize_distributed() -> None:
    """Join a multi-host run when the launcher set the usual environment variables."""
    if multi_host_requested():
        kwargs = {}
        if os.environ.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if os.environ.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(**kwargs)  # the address comes from JAX_COORDINATOR_ADDRESS
        log.info("process %d of %d, %d global devices", jax.process_index(), jax.process_count(),
                 jax.device_count())


# A CPU split into one JAX device per core trains larger layers faster: XLA:CPU keeps the cores
# busier with one program per core than with one program threaded over all of them (2 cores,
# benchmarks/cpu_devices.py: 1.39x per step at features 16 / patch 64 / batch 16, 1.48x at
# 32 / 64 / 16, 1.05x at 64 / 32 / 4), while a tiny network loses a little to the cross-device
# reduction (0.94x at 8 / 32 / 8). The rule is per first-level layer, 2 * 9 * batch * patch^2 *
# features^2 FLOPs, with the threshold between the measured points (docs/benchmarks.md).
CPU_SPLIT_MIN_FLOPS = 2e8


def stage_layer_flops(batch_size: int, patch_size: int, features: int) -> float:
    """Forward FLOPs of one first-level 3x3 convolution of a training step (the U-Net's levels
    all do about this much work: maps halve while channels double)."""
    return 2.0 * 9 * int(batch_size) * int(patch_size) ** 2 * int(features) ** 2


def cpu_device_count(requested: int, stages: list[tuple[int, int, int]], cores: int,
                     libraries: list[str] | None = None) -> int:
    """How many CPU devices to train on: ``requested`` when > 0; else (auto) ``cores`` when a
    stage ``(batch_size, patch_size, features)`` on YNNPACK convolutions reaches
    :data:`CPU_SPLIT_MIN_FLOPS` per layer and every stage's batch splits evenly over the cores,
    otherwise 1.

    ``libraries``: each stage's CPU convolution library (``compile_options.stage_library``; default
    YNNPACK for all). The split makes up for YNNPACK's convolutions, which keep the cores busy only
    one program per core. XLA's own (Eigen) convolutions already use every core from one program,
    and the split lost up to 0.68x with them (2-core Intel Xeon, 2026-12-04, docs/benchmarks.md):
    their stages do not ask for it."""
    if requested > 0:
        return int(requested)
    libraries = libraries or ["ynnpack"] * len(stages)
    if cores < 2 or not stages:
        return 1
    big = any(stage_layer_flops(*s) >= CPU_SPLIT_MIN_FLOPS
              for s, lib in zip(stages, libraries) if lib != "eigen")
    even = all(s[0] % cores == 0 for s in stages)
    return cores if big and even else 1


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def split_cpu(count: int) -> bool:
    """Make the CPU backend ``count`` devices (``jax_num_cpu_devices``); True if it was applied.

    Only possible before JAX's backends start, and left alone when ``XLA_FLAGS`` already sets a
    host device count or the run is multi-host; otherwise a no-op that says why (debug log).
    """
    if count <= 1:
        return False
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        log.debug("cpu_devices: XLA_FLAGS sets the host device count; keeping it")
        return False
    if multi_host_requested():
        log.debug("cpu_devices: multi-host run; not splitting the CPU")
        return False
    try:
        jax.config.update("jax_num_cpu_devices", int(count))  # the CPU backend only
    except RuntimeError:  # JAX refuses once its backends have started
        log.debug("cpu_devices: JAX has started; keeping its %d device(s)", jax.device_count())
        return False
    log.debug("cpu_devices: the CPU backend gets %d devices", count)
    return True


def is_main_process() -> bool:
    """True in the process that writes host-side files (metrics, TIFFs, JSON, report, masks).

    Every process computes the same results (same images, same keys); only process 0 writes them,
    so a shared run folder gets each file once. Orbax coordinates checkpoint writes itself.
    """
    return jax.process_index() == 0


def data_mesh(batch_size: int) -> Mesh:
    """A ('data',) mesh over the largest number of devices that divides the batch size."""
    devices = jax.devices()
    count = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0)
    if count < len(devices):
        log.warning("batch_size %d is not divisible by the %d devices: using %d of them",
                    batch_size, len(devices), count)
    elif count > 1:
        log.info("data parallel over %d %s devices", count, devices[0].platform)
    return jax.make_mesh((count,), ("data",), axis_types=(AxisType.Auto,), devices=devices[:count])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))
