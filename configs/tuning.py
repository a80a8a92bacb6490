"""Equal tuning for every student method (`dett_jax.sweep`): the same small grid of
learning rate x distillation epochs for each method, each method's best grid point chosen
on validation worst-group accuracy only (the study's "Best per method" table):

  python train.py --config=configs/tuning.py --workdir=runs/tuning
  python train.py --config=configs/tuning.py:marks --workdir=runs/tuning_marks  # 2nd benchmark
  python train.py --config=configs/tuning.py:tiny --workdir=/tmp/tuning         # seconds (tests)

The teacher stages are those of configs/synthetic.py (configs/synthetic_marks.py for
"marks", configs/tiny.py for "tiny"). The students keep their last epoch (the grid's
epochs axis is the choice of training length), and reweighting is by per-example loss
weights, so every method's grid points train stacked. The demo's AdamW schedule drives
KD and ERM to 0% worst group; a comparison is fair only when each had the same chance.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import synthetic  # noqa: E402
import tiny  # noqa: E402

from dett_jax import config_schema  # noqa: E402

METHODS = ("dett", "dett_head", "dett_std", "kd", "kd_up", "jtt", "erm")
GRID = dict(learning_rate=(1e-3, 3e-3), epochs=(3, 6))


def get_config(setting: str = "default"):
  if setting not in ("default", "marks", "tiny"):
    raise ValueError(f"configs/tuning.py: unknown setting {setting!r}; use default, marks or tiny")
  if setting == "tiny":
    config = tiny.get_config()
    axes = dict(method=("dett", "kd_up"), learning_rate=(1e-3, 3e-3), epochs=(1,))
  else:
    if setting == "marks":
      import synthetic_marks  # noqa: E402  # pylint: disable=import-outside-toplevel
      config = synthetic_marks.get_config()
    else:
      config = synthetic.get_config()
    axes = dict(method=METHODS, **GRID)
  config.distill.methods = ""  # the sweep trains its own students
  config.distill.reweight = "loss_weight"
  config.distill.select = "last"
  config.sweep = config_schema.sweep_defaults()  # fields: dett_jax/config_schema.py
  config.sweep.axes = ml_collections.ConfigDict({k: tuple(v) for k, v in axes.items()})
  return config
