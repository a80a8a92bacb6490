"""Runs the DeTT pipeline: `python train.py --config=configs/synthetic.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.distill.methods=dett,kd
--config.distill.lambda_up=20`.

Several processes (hosts): start the same command once per process with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or with
`--distributed=auto` on a cluster JAX detects (SLURM, Open MPI, TPU); see
`dett_jax/distributed.py`.
"""

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
flags.mark_flags_as_required(["config", "workdir"])
EXIT_INTERRUPTED = 3  # stopped by SIGTERM/SIGINT or stop_after_steps, checkpointed; re-run to resume
EXIT_DATA_ERROR = 4  # the data on disk cannot be used; the message names the file and the fix


def main(argv):
  del argv
  from dett_jax.sharding import configure_cpu_devices
  configure_cpu_devices(FLAGS.config.mesh.cpu_devices)  # before jax starts its backends
  from dett_jax import distributed
  try:  # before any JAX computation
    distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  from dett_jax.data import DataError
  from dett_jax.experiment import train_and_evaluate
  from dett_jax.training.loop import Interrupted
  from dett_jax.validation import ConfigError
  logging.set_verbosity(logging.INFO)
  try:
    train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  except DataError as e:
    print(f"data error: {e}", file=sys.stderr)
    sys.exit(EXIT_DATA_ERROR)
  except Interrupted as e:
    print(f"interrupted: {e}", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
  app.run(main)
