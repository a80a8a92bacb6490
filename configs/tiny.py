"""The demo config shrunk to seconds, for tests and smoke runs (16-pixel images, tiny
networks, one epoch per stage, 8 or fewer devices):

  python train.py --config=configs/tiny.py --workdir=/tmp/dett_tiny
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import synthetic  # noqa: E402


def get_config():
  config = shrink(synthetic.get_config())
  # The paper's seven methods (the demo adds dett_head, whose step is dett's with one
  # more loss term; tests/test_fidelity.py and test_end_to_end.py run it on this config).
  config.distill.methods = "dett,kd,kd_up,simkd,dett_no_transplant,erm,jtt"
  return config


def shrink(config):
  """`config` (a built-in benchmark's) shrunk to seconds: 16-pixel images, tiny networks,
  one epoch per stage. Also used by configs/synthetic_marks.py:tiny."""
  config.batch_size = 16
  config.eval_batch_size = 32
  config.log_every_steps = 2
  config.checkpoint_every_steps = 0  # epoch ends only
  config.data.update(image_size=16, train_size=96, val_size=48, test_size=48)
  config.pretrain.size = 32
  for optim in (config.pretrain.teacher, config.pretrain.student, config.teacher.optim,
                config.identification, config.distill.optim):
    optim.epochs = 1
  config.teacher.update(depth=10, width=0.0625, dfr_num_refits=2, dfr_c_grid=(1.0, 0.1))
  config.student.update(depth=10, width=0.0625)
  config.distill.lambda_up = 3.0
  return config
