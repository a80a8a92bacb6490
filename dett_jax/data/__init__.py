"""Data sets: each loader returns {"train", "val", "test"} `Split`s.

`config.data.name` picks the loader: `synthetic` (the built-in benchmark, in memory),
`synthetic_marks` (the second built-in benchmark: a small faint mark on a dominant
colour field), `metadata_csv` (a Waterbirds-layout folder: any data set with a binary
spurious attribute), or `celeba` (CSV layout or TFDS). `Preprocess.from_config(config.data)`
gives the matching image transforms. The built-in (generated) benchmarks also carry their
own unbiased pretraining task: `pretraining_set(config.data, size)`.
"""

from __future__ import annotations

from typing import Any

from dett_jax.config_schema import DATA_SETS, complete_data
from dett_jax.data import celeba, synthetic, synthetic_marks
from dett_jax.data.images import Preprocess
from dett_jax.data.metadata_csv import load_metadata_folder
from dett_jax.data.split import DataError, Split

LOADERS = DATA_SETS  # synthetic, synthetic_marks, metadata_csv, celeba
# Built-in benchmarks generated in memory: data.name -> module with `splits_from_config`,
# `split_size`, `pretraining_from_config` and `PRETRAINING_CLASSES`.
GENERATED = {"synthetic": synthetic, "synthetic_marks": synthetic_marks}


def load_splits(data_config: Any) -> dict[str, Split]:
  """Loads the train/val/test splits named by `config.data` (a ConfigDict or a dict).

  `name` picks the loader (`synthetic`, `synthetic_marks`, `metadata_csv`, `celeba`); the
  other fields are the loader's. Each data set's fields and their defaults are declared
  in `dett_jax/config_schema.py` (`data_defaults(name)`); fields left out here take those
  defaults (`config_schema.complete_data`), and an undeclared field is a ConfigError.

  Returns:
    {"train", "val", "test"} -> `Split`; the training split of the built-in benchmark is
    95% correlated (Waterbirds' group proportions), val and test are balanced per class.

  Examples:
    >>> from dett_jax import load_splits
    >>> splits = load_splits({"name": "synthetic", "image_size": 16, "train_size": 100,
    ...                       "val_size": 20, "test_size": 20})
    >>> splits["train"].images.shape, splits["train"].group_counts().tolist()
    ((100, 16, 16, 3), [74, 3, 1, 22])
  """
  data_config = complete_data(data_config)
  name = data_config.name
  if name in GENERATED:
    return generated_benchmark(name).splits_from_config(data_config)
  if name == "metadata_csv":
    return load_metadata_folder(data_config.root, attr_column=data_config.attr_column,
                                num_classes=data_config.num_classes,
                                check_images=data_config.check_images)
  if name == "celeba":
    if data_config.source == "csv":
      return celeba.load_celeba_csv(data_config.root, target=data_config.target,
                                    spurious=data_config.spurious,
                                    check_images=data_config.check_images)
    if data_config.source == "tfds":
      return celeba.load_celeba_tfds(data_config.tfds_data_dir, target=data_config.target,
                                     spurious=data_config.spurious)
    raise DataError(f"data.source={data_config.source!r}; choose csv or tfds")
  raise DataError(f"unknown data.name {name!r}; choose from {', '.join(LOADERS)}")


def generated_benchmark(name: str) -> Any | None:
  """The module of the built-in benchmark `name` (see `GENERATED`), or None for data on disk."""
  return GENERATED.get(name)


def pretraining_classes(data_config: Any) -> int:
  """Number of classes of `config.data`'s pretraining task (its head is replaced before
  fine-tuning). Data on disk has none: 8, a placeholder head for a backbone that comes
  from `teacher.init`/`student.init` or starts random."""
  module = generated_benchmark(data_config.name)
  return module.PRETRAINING_CLASSES if module is not None else 8


def pretraining_set(data_config: Any, size: int) -> Split:
  """The unbiased pretraining task (`size` examples) of the built-in benchmark that
  `config.data` names: shapes x backgrounds for `synthetic`, marks x colour fields for
  `synthetic_marks`, each labelled by the core feature. Fields `config.data` lacks take
  the schema's defaults (`config_schema.complete_data`)."""
  data_config = complete_data(data_config)
  module = generated_benchmark(data_config.name)
  if module is None:
    raise DataError(f"data.name={data_config.name!r} has no built-in pretraining task; choose "
                    f"from {', '.join(GENERATED)} or set pretrain.enabled=False")
  return module.pretraining_from_config(data_config, size)


__all__ = ["DataError", "GENERATED", "LOADERS", "Preprocess", "Split", "generated_benchmark",
           "load_splits", "pretraining_classes", "pretraining_set"]
