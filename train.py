"""Runs the DeTT pipeline: `python train.py --config=configs/synthetic.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.distill.methods=dett,kd
--config.distill.lambda_up=20`.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
flags.mark_flags_as_required(["config", "workdir"])
EXIT_INTERRUPTED = 3  # stopped by SIGTERM/SIGINT or stop_after_steps, checkpointed; re-run to resume
EXIT_DATA_ERROR = 4  # the data on disk cannot be used; the message names the file and the fix


def main(argv):
  del argv
  from dett_jax.sharding import configure_cpu_devices
  configure_cpu_devices(FLAGS.config.mesh.cpu_devices)  # before jax starts its backends
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
