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

A lost peer: every process writes a heartbeat to the coordinator's key-value store each
second (`PeerWatch`); a process that sees a peer silent for `peer_timeout` seconds prints
one line (`peer_lost_message`: which process, at which stage and step, the last
checkpoint, re-run every process to resume) and exits with `train.py`'s EXIT_PEER_LOST.
JAX's own heartbeat timeout is set to twice `peer_timeout`, so that this happens before
JAX aborts the survivors (SIGABRT and a core-dump trace). When process 0 itself dies, the
coordinator dies with it and JAX terminates the others at once (its own message, "...
the leader task was preempted/died ...", exit code 134).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable, Mapping

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
               num_processes: int | None = None, process_id: int | None = None,
               peer_timeout: float = 60.0) -> bool:
  """Starts JAX's distributed runtime; returns whether this is a multi-process run.

  mode "explicit": from the arguments, or the JAX_* environment variables (see
  `settings`); a single process when none is set. "auto": `jax.distributed.initialize()`
  with no arguments, i.e. JAX's cluster auto-detection (SLURM, Open MPI, TPU pods).
  "off": a single process, whatever the environment says.

  `peer_timeout`: seconds without a heartbeat after which `PeerWatch` takes a process for
  dead; JAX's coordination service gets twice as long (its verdict aborts the process).

  Call it before any JAX computation (after `sharding.configure_cpu_devices`, which
  sets the device count of each process).
  """
  if mode not in MODES:
    raise ValueError(f"distributed={mode!r}; choose from {', '.join(MODES)}")
  if not peer_timeout > 0:
    raise ValueError(f"peer_timeout={peer_timeout} must be > 0 seconds")
  if mode == "off":
    return False
  heartbeat = max(2, int(np.ceil(2 * peer_timeout)))  # PeerWatch speaks first
  if mode == "auto":
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
  else:
    found = settings(coordinator_address, num_processes, process_id)
    if found is None:
      return False
    address, count, index = found
    if count == 1:
      return False
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=index, heartbeat_timeout_seconds=heartbeat)
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


# ---------------------------------------------------------------------------
# Where this process is (for the message when a peer is lost).
# ---------------------------------------------------------------------------

_progress: dict[str, Any] = {"stage": None, "step": None, "total": None, "checkpoint": None}


def note_progress(**fields: Any) -> None:
  """Records where the run is: `stage` (resets step, total and checkpoint), `step`,
  `total`, `checkpoint` (the directory of the stage's newest checkpoint)."""
  if "stage" in fields and fields["stage"] != _progress["stage"]:
    _progress.update(step=None, total=None, checkpoint=None)
  _progress.update(fields)


def progress() -> dict[str, Any]:
  """A copy of what `note_progress` recorded."""
  return dict(_progress)


def peer_lost_message(lost: list[int], count: int, silent_for: float) -> str:
  """The one line a surviving process prints when peers are lost."""
  where = _progress
  names = ", ".join(str(i) for i in lost)
  what = (f"process{'es' if len(lost) > 1 else ''} {names} of {count} stopped responding "
          f"(no heartbeat for {silent_for:.0f} s)")
  if where["stage"] is None:
    at = "before the first stage"
  elif where["step"] is None:
    at = f"during stage {where['stage']}"
  else:
    of = f" of {where['total']}" if where["total"] else ""
    at = f"during stage {where['stage']} at step {where['step']}{of}"
  checkpoint = where["checkpoint"] or (
      "none in this stage (it restarts from its beginning; finished stages are kept)")
  return (f"peer lost: {what} {at}; last checkpoint: {checkpoint}; re-run every process with "
          "the same command to resume")


class PeerWatch:
  """Heartbeats through the coordinator's key-value store, and the verdict on peers.

  A daemon thread writes this process's heartbeat every `interval` seconds and reads the
  others'. A peer whose heartbeat has not changed for `timeout` seconds, and that has
  not said it finished (`finish`), is lost: `on_lost(lost, silent_for)` is called once,
  from the thread (`train.py` prints `peer_lost_message` and exits). `wait_for_loss`
  lets the main thread ask, after a failed step, whether a peer is gone.
  """

  PREFIX = "dett_jax/heartbeat/"
  DONE = "dett_jax/finished/"

  def __init__(self, timeout: float, on_lost: Callable[[list[int], float], None],
               interval: float = 1.0):
    from jax._src import distributed as jax_distributed  # the client of jax.distributed
    self.client = jax_distributed.global_state.client
    if self.client is None:
      raise RuntimeError("PeerWatch needs jax.distributed.initialize first")
    self.timeout, self.on_lost, self.interval = float(timeout), on_lost, float(interval)
    self.index, self.count = jax.process_index(), jax.process_count()
    self._seen: dict[int, tuple[str, float]] = {}  # peer -> (last heartbeat, when it changed)
    self._lost: list[int] = []
    self._stop = threading.Event()
    self._beat = 0
    self._thread = threading.Thread(target=self._run, name="dett_jax-peer-watch", daemon=True)

  def start(self) -> "PeerWatch":
    self._thread.start()
    return self

  def _run(self) -> None:
    start = time.monotonic()
    while not self._stop.is_set():
      try:
        self._beat += 1
        self.client.key_value_set(f"{self.PREFIX}{self.index}", str(self._beat), True)
        beats = dict(self.client.key_value_dir_get(self.PREFIX))
        finished = {k.rsplit("/", 1)[-1] for k, _ in self.client.key_value_dir_get(self.DONE)}
      except Exception:  # pylint: disable=broad-except  # the coordinator is unreachable
        beats, finished = {}, set()
      now = time.monotonic()
      lost = []
      for peer in range(self.count):
        if peer == self.index or str(peer) in finished:
          continue
        beat = beats.get(f"{self.PREFIX}{peer}")
        last, since = self._seen.get(peer, (None, start))
        if beat is not None and beat != last:
          self._seen[peer] = (beat, now)
        elif now - since >= self.timeout:
          lost.append(peer)
      if lost and not self._stop.is_set():
        self._lost = lost
        silent = now - min(self._seen.get(p, (None, start))[1] for p in lost)
        self.on_lost(lost, silent)
        return
      self._stop.wait(self.interval)

  @property
  def lost(self) -> list[int]:
    return list(self._lost)

  def wait_for_loss(self, seconds: float | None = None) -> list[int]:
    """Blocks until a peer is found lost or `seconds` (default: the timeout plus two
    heartbeats) pass; the lost peers (empty: none)."""
    deadline = time.monotonic() + (self.timeout + 2 * self.interval if seconds is None
                                   else seconds)
    while not self._lost and self._thread.is_alive() and time.monotonic() < deadline:
      time.sleep(0.1)
    return self.lost

  def finish(self) -> None:
    """Says this process ends normally (its peers will not take its silence for a loss)
    and stops the thread."""
    self._stop.set()
    try:
      self.client.key_value_set(f"{self.DONE}{self.index}", "1", True)
    except Exception:  # pylint: disable=broad-except  # the coordinator is gone: nothing to tell
      pass
    self._thread.join(timeout=5 * self.interval)


def exit_on_peer_loss(code: int) -> Callable[[list[int], float], None]:
  """An `on_lost` for `PeerWatch` that prints `peer_lost_message` and exits with `code`
  at once (no clean-up that could wait on the lost peer)."""
  def on_lost(lost: list[int], silent_for: float) -> None:
    print(peer_lost_message(lost, jax.process_count(), silent_for), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access
  return on_lost
