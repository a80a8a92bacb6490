"""Named mesh and shardings: batch on the `data` axis, parameters replicated."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def configure_cpu_devices(count: int = 0) -> None:
  """Splits a CPU host into `count` XLA devices (0: one per core). Call before jax starts.

  One XLA:CPU device keeps only part of a multi-core host busy; several devices
  run the data-parallel shards concurrently. A count already set through
  XLA_FLAGS wins.
  """
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  jax.config.update("jax_num_cpu_devices", count or os.cpu_count() or 1)


def make_mesh(data: int = -1) -> Mesh:
  """A 1-D mesh with axis `data` over `data` devices (-1: all devices)."""
  devices = jax.devices()
  size = len(devices) if data == -1 else data
  if size < 1 or size > len(devices):
    raise ValueError(f"mesh.data={data} but {len(devices)} devices are available; use -1 for all")
  return Mesh(np.asarray(devices[:size]), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P("data"))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this process's part of a batch into global arrays sharded over `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of `tree` replicated on the mesh."""
  return jax.device_put(tree, replicated(mesh))
