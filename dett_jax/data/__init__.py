"""Data sets: each loader returns {"train", "val", "test"} `Split`s."""

from __future__ import annotations

from typing import Any

from dett_jax.data.synthetic import Split, make_split


def load_splits(data_config: Any) -> dict[str, Split]:
  """Loads the train/val/test splits named by `config.data`."""
  if data_config.name != "synthetic":
    raise ValueError(f"unknown data.name {data_config.name!r}; available: synthetic")
  sizes = {"train": data_config.train_size, "val": data_config.val_size,
           "test": data_config.test_size}
  if data_config.image_size < 16:
    raise ValueError(f"data.image_size={data_config.image_size} is too small for the built-in "
                     "benchmark's shapes; use at least 16")
  for split, size in sizes.items():
    if size < 8:
      raise ValueError(f"data.{split}_size={size} is too small; use at least 8 examples")
  return {split: make_split(split, size, data_config.image_size, data_config.seed,
                            tuple(data_config.class_shapes), data_config.noise,
                            data_config.faint)
          for split, size in sizes.items()}
