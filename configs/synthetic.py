"""The demo: the whole DeTT pipeline on the built-in synthetic benchmark (CPU, ~10 min).

  python train.py --config=configs/synthetic.py --workdir=/tmp/dett_demo

Teacher ResNet-18 and student ResNet-10 (width 1/8, small-image stem), both
pretrained on the unbiased synthetic pretraining task (shapes x backgrounds)
as a stand-in for ImageNet pretraining, then: ERM teacher -> DFR teacher ->
ERM identification model (T_id epochs) -> every student method.

Every field, its default and what it means: `defaults()` in dett_jax/config_schema.py,
which this config is (every other config file starts from it).
"""

import ml_collections

from dett_jax import config_schema


def optim(epochs: int, learning_rate: float, weight_decay: float = 5e-4,
          optimizer: str = "sgd") -> ml_collections.ConfigDict:
  """A training stage's optimizer section (fields: dett_jax/config_schema.py `optim`)."""
  return config_schema.optim(epochs, learning_rate, weight_decay, optimizer)


def get_config() -> ml_collections.ConfigDict:
  # The schema's defaults are the demo: every field, its default and what it means are
  # in dett_jax/config_schema.py `defaults()`, so this file and the schema cannot disagree.
  return config_schema.defaults()
