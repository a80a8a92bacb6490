"""DeTT ablation sweep on the built-in benchmark (`dett_jax.sweep`):

  python train.py --config=configs/ablation.py --workdir=runs/ablation          # projectors x 3 seeds
  python train.py --config=configs/ablation.py:full --workdir=runs/ablation_full
  python train.py --config=configs/ablation.py:tiny --workdir=/tmp/ablation     # seconds (tests)

Restrict a sweep with `--config.sweep.subset="projector=linear,simkd;seed=0"`. The
teacher stages are those of configs/synthetic.py (or configs/tiny.py for "tiny"); the
student variants are DeTT with `distill.reweight="loss_weight"`, so lambda_up and T_id
variants share the data and train stacked with the seeds.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import synthetic  # noqa: E402
import tiny  # noqa: E402

from dett_jax import config_schema  # noqa: E402

DEFAULT_AXES = dict(projector=("identity", "linear", "simkd", "simkd_dw"), seed=(0, 1, 2))
FULL_AXES = dict(projector=("identity", "linear", "simkd", "simkd_dw"), lambda_up=(1, 5, 20, 50),
                 T_id=(1, 2, 4), match=("map", "pooled"), transplant=(True, False),
                 seed=(0, 1, 2, 3, 4))


def get_config(setting: str = "default"):
  if setting not in ("default", "full", "tiny"):
    raise ValueError(f"configs/ablation.py: unknown setting {setting!r}; use default, full or tiny")
  config = tiny.get_config() if setting == "tiny" else synthetic.get_config()
  config.distill.methods = ""  # the sweep trains its own students
  config.distill.reweight = "loss_weight"
  config.distill.select = "last"  # sweep students keep their last epoch
  axes = FULL_AXES if setting == "full" else DEFAULT_AXES
  if setting == "tiny":
    axes = dict(projector=("linear", "simkd"), lambda_up=(1, 5), seed=(0, 1))
  # subset, method, stack, execution, conv, mesh_axis: the schema's defaults (every field
  # and what it means: dett_jax/config_schema.py `sweep_defaults`)
  config.sweep = config_schema.sweep_defaults()
  config.sweep.axes = ml_collections.ConfigDict({k: tuple(v) for k, v in axes.items()})
  return config
