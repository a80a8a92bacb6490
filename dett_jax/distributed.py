"""Multi-process (multi-host) runs: start-up and the few helpers the pipeline needs.

A run of N processes is N copies of the same `train.py` command, one per host (or
several on one host), each with its own process id. JAX's distributed runtime
connects them through a coordinator (process 0's address and a free port); every
process then sees all devices of all processes in `jax.devices()`, the mesh spans
them, and each jitted step runs as one program across processes (collectives over
the network; gloo on CPU).

How the pipeline stays correct with several processes:

- data: every process loads only its slice of each global batch (`data.pipeline`),
  and `sharding.shard_batch` assembles global arrays with
  `jax.make_array_from_process_local_data`;
- metrics: train metrics and evaluation sums come out of the jitted steps already
  reduced over the global batch (replicated on every device); per-example outputs
  are gathered with `process_allgather` (`to_host`);
- files: only process 0 writes `metrics.jsonl`, TensorBoard events, `config.json`,
  `done.json`, `error_set.json`, `results.json` and the report; `sync` makes the
  others wait where they must see one of those files;
- checkpoints: every process calls Orbax's save and restore (each writes and reads
  its own shards; Orbax coordinates the rest), so the workdir must be on a file
  system that all processes share.

`initialize` is called once by `train.py`, after the CPU device count is set and
before any JAX computation.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np

MODES = ("explicit", "auto", "off")
ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, env: Mapping[str, str] | None = None
             ) -> tuple[str, int, int] | None:
  """(coordinator_address, num_processes, process_id) from the arguments, each falling
  back to its environment variable (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID); None when none of the three is set (a single-process run).

  Raises ValueError when only some are set or a value is out of range.
  """
  env = os.environ if env is None else env
  values = [coordinator_address, num_processes, process_id]
  for i, name in enumerate(ENV_VARS):
    if values[i] in (None, "") and env.get(name, "") != "":
      values[i] = env[name]
  if all(v in (None, "") for v in values):
    return None
  names = ("coordinator_address (JAX_COORDINATOR_ADDRESS)", "num_processes (JAX_NUM_PROCESSES)",
           "process_id (JAX_PROCESS_ID)")
  missing = [n for n, v in zip(names, values) if v in (None, "")]
  if missing:
    raise ValueError(f"a multi-process run needs all of coordinator_address, num_processes and "
                     f"process_id; missing: {', '.join(missing)} (flags, or the environment "
                     "variables in brackets; --distributed=auto detects them on SLURM, Open MPI "
                     "and TPU clusters)")
  address = str(values[0])
  try:
    count, index = int(values[1]), int(values[2])
  except ValueError:
    raise ValueError(f"num_processes={values[1]!r} and process_id={values[2]!r} must be "
                     "integers") from None
  if ":" not in address:
    raise ValueError(f"coordinator_address={address!r} must be HOST:PORT (process 0's host and "
                     "a free port)")
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"process_id={index} must be in [0, num_processes={count})")
  return address, count, index


def initialize(mode: str = "explicit", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Starts JAX's distributed runtime; returns whether this is a multi-process run.

  mode "explicit": from the arguments, or the JAX_* environment variables (see
  `settings`); a single process when none is set. "auto": `jax.distributed.initialize()`
  with no arguments, i.e. JAX's cluster auto-detection (SLURM, Open MPI, TPU pods).
  "off": a single process, whatever the environment says.

  Call it before any JAX computation (after `sharding.configure_cpu_devices`, which
  sets the device count of each process).
  """
  if mode not in MODES:
    raise ValueError(f"distributed={mode!r}; choose from {', '.join(MODES)}")
  if mode == "off":
    return False
  if mode == "auto":
    jax.distributed.initialize()
  else:
    found = settings(coordinator_address, num_processes, process_id)
    if found is None:
      return False
    address, count, index = found
    if count == 1:
      return False
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=index)
  return jax.process_count() > 1


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across processes (no-op in a single-process run). Every process must
  call it with the same `name`, at the same point of the program."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def to_host(tree: Any) -> Any:
  """numpy copies of the global values of a tree of arrays, on every process.

  Fully addressable and fully replicated arrays are read locally (no communication);
  arrays sharded across processes (e.g. per-example outputs over `data`) are
  gathered with `process_allgather`, a collective: every process must call it.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return multihost_utils.process_allgather(x, tiled=True)

  return jax.tree.map(one, tree)


def any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process (a collective with several processes: every
  process must call it at the same point; local in a single-process run). Used so that
  all processes take the same decision, e.g. to stop after a SIGTERM one of them got."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.array([int(bool(flag))], np.int32))
  return bool(np.max(flags))
