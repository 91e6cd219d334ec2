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


def initialize_distributed() -> None:
    """Join a multi-host run when the launcher set the usual environment variables."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("AUTOSTRUCTN2V_DISTRIBUTED"):
        kwargs = {}
        if os.environ.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if os.environ.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(**kwargs)  # the address comes from JAX_COORDINATOR_ADDRESS
        log.info("process %d of %d, %d global devices", jax.process_index(), jax.process_count(),
                 jax.device_count())


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
    return jax.make_mesh((count,), ("data",), axis_types=(AxisType.Auto,), devices=devices[:count])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))
