"""Named mesh and shardings: the batch on the `data` axis; parameters (and their optimizer
state) replicated or sharded by rules over their paths.

The mesh has axes (`data`, `model`); `model` is 1 unless configured. Strategies:

  replicated  data-parallel: every parameter on every device.
  fsdp        fully sharded data-parallel: each kernel's largest dimension divisible by
              the `data` axis is split over it (parameters, optimizer state and the
              frozen teacher alike); XLA gathers them for the computation.

With `model` > 1, kernels' output dimension is also split over `model` (a transformer's
attention-output and MLP-output kernels: their input dimension, `model_in`/`fsdp_in`, so
attention heads and the MLP width are split). Rules are
`"regex=kind"` strings matched in order against a leaf's path (e.g.
`opt_state/0/mu/student/BasicBlock_0/Conv_0/kernel`); kinds are `replicated`, `fsdp`,
`model` (only the `model` split), `model_in` and `fsdp_in` (the same with `model` on the
first axis). The first match wins.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

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


def make_mesh(data: int = -1, model: int = 1) -> Mesh:
  """A mesh with axes (`data`, `model`) of shape (data, model); data=-1 uses every device
  (divided by `model`)."""
  devices = jax.devices()
  if model < 1 or len(devices) % model:
    raise ValueError(f"mesh.model={model} must be >= 1 and divide the {len(devices)} devices")
  size = len(devices) // model if data == -1 else data
  if size < 1 or size * model > len(devices):
    raise ValueError(f"mesh.data={data} x mesh.model={model} but {len(devices)} devices are "
                     "available; use mesh.data=-1 for all")
  return Mesh(np.asarray(devices[:size * model]).reshape(size, model), ("data", "model"))


STRATEGIES = ("replicated", "fsdp")
KINDS = ("replicated", "fsdp", "model", "model_in", "fsdp_in")
# Transformer layers whose kernel reads the split width (attention output, MLP output):
# split over `model` on their input axis (Megatron-style), so q/k/v (heads) and the MLP's
# first Dense (width) are split on their output axis and nothing is gathered in between.
TRANSFORMER_IN = r"(attention/output/dense|/output/dense|out_lin|ffn/lin2)/kernel$"
DEFAULT_RULES = {
    "replicated": (f"{TRANSFORMER_IN}=model_in", ".*kernel=model", ".*=replicated"),
    "fsdp": ("batch_stats=replicated", f"{TRANSFORMER_IN}=fsdp_in", ".*kernel=fsdp",
             "embedding$=fsdp", ".*=replicated"),
}


def parse_rules(strategy: str, rules: Sequence[str] = ()) -> list[tuple[re.Pattern, str]]:
  """The strategy's rules, preceded by the user's `regex=kind` rules."""
  if strategy not in STRATEGIES:
    raise ValueError(f"mesh.strategy={strategy!r}; choose from {', '.join(STRATEGIES)}")
  parsed = []
  for rule in (*rules, *DEFAULT_RULES[strategy]):
    pattern, sep, kind = str(rule).rpartition("=")
    if not sep or kind not in KINDS:
      raise ValueError(f"mesh rule {rule!r} must be 'regex=kind' with kind in {', '.join(KINDS)}")
    try:
      parsed.append((re.compile(pattern), kind))
    except re.error as e:
      raise ValueError(f"mesh rule {rule!r}: bad regular expression ({e})") from None
  return parsed


def leaf_spec(shape: tuple[int, ...], kind: str, mesh: Mesh) -> P:
  """The PartitionSpec of one leaf of `shape` for a rule `kind`."""
  spec: list[Any] = [None] * len(shape)
  model, data = mesh.shape["model"], mesh.shape["data"]
  axis = 0 if kind in ("model_in", "fsdp_in") else -1  # the axis split over `model`
  if kind != "replicated" and model > 1 and shape and shape[axis] % model == 0:
    spec[axis] = "model"
  if kind in ("fsdp", "fsdp_in") and data > 1:
    free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % data == 0]
    if free:
      spec[max(free, key=lambda i: shape[i])] = "data"
  return P(*spec)


def path_name(path: tuple) -> str:
  """'a/b/c' for a pytree key path (dict keys, attributes and indices)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def tree_shardings(tree: Any, mesh: Mesh, strategy: str = "replicated",
                   rules: Sequence[str] = ()) -> Any:
  """A NamedSharding for every leaf of `tree` (params, a TrainState, frozen variables)."""
  parsed = parse_rules(strategy, rules)

  def sharding(path, leaf):
    name = path_name(path)
    kind = next(k for pattern, k in parsed if pattern.search(name))
    return NamedSharding(mesh, leaf_spec(tuple(np.shape(leaf)), kind, mesh))

  return jax.tree_util.tree_map_with_path(sharding, tree)


def put(tree: Any, shardings: Any) -> Any:
  """`jax.device_put(tree, shardings)` that is also correct when the shardings span other
  processes' devices (a multi-process mesh).

  Every process must pass the same values. A leaf held by this process alone (numpy, or
  a jax.Array on this process's devices, e.g. from `jnp.asarray` or an initialiser) goes
  through the host: JAX 0.10's `device_put` of such an array onto a mesh of one device per
  process returns an array whose local buffer claims every process's shard, which
  `jit` accepts but Orbax's save and `addressable_shards` reject. Arrays that already span
  the mesh are resharded by `device_put` as usual.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def host_if_local(x, sharding):
    local = not isinstance(x, jax.Array) or x.is_fully_addressable
    return np.asarray(x) if local and not sharding.is_fully_addressable else x

  tree = jax.tree.map(host_if_local, tree, shardings)
  return jax.device_put(tree, shardings)


def place(tree: Any, mesh: Mesh, strategy: str = "replicated", rules: Sequence[str] = ()) -> Any:
  """Puts every leaf of `tree` on the mesh with `tree_shardings`."""
  return put(tree, tree_shardings(tree, mesh, strategy, rules))


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
  return put(tree, jax.tree.map(lambda _: replicated(mesh), tree))
