"""Runs the DeTT pipeline: `python train.py --config=configs/synthetic.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.distill.methods=dett,kd
--config.distill.lambda_up=20`.

Several processes (hosts): start the same command once per process with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or with
`--distributed=auto` on a cluster JAX detects (SLURM, Open MPI, TPU); see
`dett_jax/distributed.py`.

The console (process 0): progress bars, one line per finished stage (its time and
headline metric), warnings, and at the end the results table (report.md's) and the
paths of the report, the plots and the TensorBoard logs; a sweep prints one line per
group and the study's paths. Library INFO records (Orbax's checkpointing, absl, JAX) are
hidden by default (WARNING and above show). absl's `-v/--verbosity` flag shows them:
`--verbosity=0` (`-v 0`) every INFO record, `--verbosity=1` DEBUG as well
(`--logger_levels=NAME:LEVEL` sets single Python loggers, e.g. `jax:DEBUG`).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
flags.DEFINE_enum("distributed", "explicit", ["explicit", "auto", "off"],
                  "Multi-process start-up: 'explicit' uses --coordinator_address, --num_processes "
                  "and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; "
                  "a single process when none is set); 'auto' lets jax.distributed.initialize() "
                  "detect the cluster (SLURM, Open MPI, TPU); 'off' always runs one process.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator service.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's id, 0 .. num_processes - 1.")
flags.DEFINE_float("peer_timeout", 60.0,
                   "Multi-process runs: seconds without a heartbeat after which a process is "
                   "taken for dead; the others then stop with one line and exit code 7.")
flags.mark_flags_as_required(["config", "workdir"])
EXIT_INTERRUPTED = 3  # stopped by SIGTERM/SIGINT or stop_after_steps, checkpointed; re-run to resume
EXIT_DATA_ERROR = 4  # the data on disk cannot be used; the message names the file and the fix
EXIT_DIVERGED = 5  # a non-finite loss or gradient (on_nonfinite=stop); names the last good checkpoint
EXIT_STORAGE = 6  # the workdir or a checkpoint in it cannot be used; the message names the path
EXIT_PEER_LOST = 7  # another process of a multi-process run died; re-run every process to resume


def main(argv):
  del argv
  configure_console()  # before anything logs (the distributed start-up does)
  from dett_jax.config_schema import ConfigError, complete
  try:  # every field the run reads (dett_jax/config_schema.py); an undeclared one refused
    config = complete(FLAGS.config)
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  from dett_jax.sharding import configure_cpu_devices
  configure_cpu_devices(config.mesh.cpu_devices)  # before jax starts its backends
  from dett_jax import distributed
  try:  # before any JAX computation
    several = distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address,
                                     FLAGS.num_processes, FLAGS.process_id, FLAGS.peer_timeout)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  watch = None
  if several:
    watch = distributed.PeerWatch(FLAGS.peer_timeout,
                                  distributed.exit_on_peer_loss(EXIT_PEER_LOST)).start()
  try:
    run(config)
  except (SystemExit, app.UsageError, KeyboardInterrupt):
    raise
  except BaseException:
    # A step that failed because a peer vanished ("Gloo all-reduce failed ... Connection
    # reset by peer"): the watch names the peer and exits with EXIT_PEER_LOST.
    if watch is not None:
      watch.wait_for_loss()
    raise
  finally:
    if watch is not None:
      watch.finish()


def run(config) -> None:
  """The pipeline or sweep of `config` (FLAGS.config, completed by the schema); known
  failures become one line and an exit code."""
  from dett_jax.checkpoints import CheckpointMismatch
  from dett_jax.data import DataError
  from dett_jax.experiment import train_and_evaluate
  from dett_jax.training.loop import Diverged, Interrupted
  from dett_jax.workdir import WorkdirError
  from dett_jax.validation import ConfigError
  from dett_jax import console
  try:
    if "sweep" in config:  # an ablation config (configs/ablation.py)
      from dett_jax.sweep import run_sweep
      console.study(run_sweep(config, FLAGS.workdir)["study"], FLAGS.workdir)
    else:
      console.results(train_and_evaluate(config, FLAGS.workdir), FLAGS.workdir)
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  except DataError as e:
    print(f"data error: {e}", file=sys.stderr)
    sys.exit(EXIT_DATA_ERROR)
  except Interrupted as e:
    print(f"interrupted: {e}", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  except Diverged as e:
    print(f"diverged: {e}", file=sys.stderr)
    sys.exit(EXIT_DIVERGED)
  except (CheckpointMismatch, WorkdirError) as e:
    print(f"storage error: {e}", file=sys.stderr)
    sys.exit(EXIT_STORAGE)


def configure_console() -> None:
  """Quiet unless `-v/--verbosity` is given: absl (and with it Orbax, which logs through
  absl) and every Python logger (JAX, grain, ...) at WARNING; with the flag, absl's own
  handling of its value (0: INFO, 1: DEBUG). Stage lines and the results go to stdout
  through `dett_jax.console` either way."""
  from dett_jax import console
  if not FLAGS["verbosity"].present:  # absl raises its default to INFO after parsing
    logging.set_verbosity(logging.WARNING)
  console.enable()


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a --config that cannot be loaded or overridden is reported in
  one line (ml_collections raises a long traceback for those) and exits with code 1."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.keys()  # ml_collections defers a missing file's error to the first access
    return rest
  except Exception as e:  # pylint: disable=broad-except  # anything the config file raised
    config_flag = not isinstance(e, flags.Error) or "config file" in str(e)
    message = config_error(argv, e) if config_flag else str(e)
    print(f"FATAL Flags parsing error: {message}\nPass --helpshort or --helpfull to see help "
          "on flags.", file=sys.stderr)
    sys.exit(1)


def config_error(argv: list[str], error: Exception) -> str:
  """What is wrong with --config (or a --config.FIELD override), and the fix, in one line."""
  import difflib
  import importlib.machinery
  import importlib.util
  import ml_collections
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith(("--config=", "-config="))), "")
  for flag, value in zip(argv, argv[1:]):  # the `--config PATH` form
    spec = value if flag in ("--config", "-config") else spec
  path, _, arg = spec.partition(":")
  example = "e.g. --config=configs/synthetic.py"
  if not os.path.isfile(path):
    return f"--config={spec}: no such file; give a Python file that defines get_config(), {example}"
  try:  # load it again to see which step fails
    loader = importlib.machinery.SourceFileLoader("config_check", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    what = (f"line {e.lineno}: {e.msg}" if isinstance(e, SyntaxError)
            else (str(e).splitlines() or [""])[0])
    return (f"--config={spec} is not a Python config file ({type(e).__name__}, {what}); "
            f"give a .py file that defines get_config(), {example}")
  if not callable(getattr(module, "get_config", None)):
    return (f"--config={spec} defines no get_config() function; a config file is a .py "
            f"file whose get_config() returns a ConfigDict, {example}")
  try:
    config = module.get_config(*([arg] if arg else []))
  except Exception as e:  # pylint: disable=broad-except
    return f"--config={spec}: get_config({repr(arg) if arg else ''}) raised {type(e).__name__}: {e}"
  if not isinstance(config, ml_collections.ConfigDict):
    return (f"--config={spec}: get_config() returned {type(config).__name__}, not a "
            "ml_collections.ConfigDict")
  for a in argv:  # the first override naming a field the config does not have
    if not a.startswith(("--config.", "-config.")):
      continue
    field = a.split("=", 1)[0].split(".", 1)[1]
    node, parts = config, field.split(".")
    for i, part in enumerate(parts):
      parent = ".".join(parts[:i]) or "the config"
      if not isinstance(node, ml_collections.ConfigDict):
        return (f"--config.{field}: {parent} is a value, not a group of fields; set it "
                f"with --config.{parent}=VALUE")
      if part not in node:
        close = difflib.get_close_matches(part, list(node.keys()), n=1)
        hint = f"did you mean {'.'.join(parts[:i] + close)}? " if close else ""
        return (f"--config.{field}: {parent} has no field {part!r}; {hint}fields of "
                f"{parent}: {', '.join(node.keys())}")
      node = node[part]
  return f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error) else ''}"


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
