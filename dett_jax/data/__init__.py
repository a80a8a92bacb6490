"""Data sets: each loader returns {"train", "val", "test"} `Split`s.

`config.data.name` picks the loader: `synthetic` (the built-in benchmark, in memory),
`metadata_csv` (a Waterbirds-layout folder: any data set with a binary spurious
attribute), or `celeba` (CSV layout or TFDS). `Preprocess.from_config(config.data)`
gives the matching image transforms.
"""

from __future__ import annotations

from typing import Any

from dett_jax.data.images import Preprocess
from dett_jax.data.split import DataError, Split

LOADERS = ("synthetic", "metadata_csv", "celeba")


def load_splits(data_config: Any) -> dict[str, Split]:
  """Loads the train/val/test splits named by `config.data` (a ConfigDict or a dict).

  `name` picks the loader (`synthetic`, `metadata_csv`, `celeba`); the other fields are
  the loader's (see `configs/synthetic.py`, `configs/waterbirds.py`, `configs/celeba.py`).
  For the built-in benchmark: `image_size`, `train_size`, `val_size`, `test_size`, and
  optionally `seed` (0), `class_shapes` ((3, 2)), `noise` (0.05), `faint` (0.15).

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
  if isinstance(data_config, dict):
    import ml_collections
    data_config = ml_collections.ConfigDict(data_config)
  name = data_config.name
  if name == "synthetic":
    return _synthetic(data_config)
  if name == "metadata_csv":
    from dett_jax.data.metadata_csv import load_metadata_folder
    return load_metadata_folder(data_config.root, attr_column=data_config.attr_column,
                                num_classes=data_config.num_classes,
                                check_images=data_config.check_images)
  if name == "celeba":
    from dett_jax.data import celeba
    if data_config.source == "csv":
      return celeba.load_celeba_csv(data_config.root, target=data_config.target,
                                    spurious=data_config.spurious,
                                    check_images=data_config.check_images)
    if data_config.source == "tfds":
      return celeba.load_celeba_tfds(data_config.tfds_data_dir, target=data_config.target,
                                     spurious=data_config.spurious)
    raise DataError(f"data.source={data_config.source!r}; choose csv or tfds")
  raise DataError(f"unknown data.name {name!r}; choose from {', '.join(LOADERS)}")


def _synthetic(data_config: Any) -> dict[str, Split]:
  from dett_jax.data.synthetic import make_split
  sizes = {"train": data_config.train_size, "val": data_config.val_size,
           "test": data_config.test_size}
  if data_config.image_size < 16:
    raise DataError(f"data.image_size={data_config.image_size} is too small for the built-in "
                    "benchmark's shapes; use at least 16")
  for split, size in sizes.items():
    if size < 8:
      raise DataError(f"data.{split}_size={size} is too small; use at least 8 examples")
  return {split: make_split(split, size, data_config.image_size, data_config.get("seed", 0),
                            tuple(data_config.get("class_shapes", (3, 2))),
                            data_config.get("noise", 0.05), data_config.get("faint", 0.15))
          for split, size in sizes.items()}


__all__ = ["DataError", "LOADERS", "Preprocess", "Split", "load_splits"]
