"""`Split`: one data split's labels, spurious attributes and images (in memory or on disk)."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np


class DataError(ValueError):
  """Data on disk (or in memory) that cannot be used; the message names the file and the fix."""


class ImageSource(Protocol):
  """Random access to images: `source[i]` is a uint8 `[h, w, 3]` array (sizes may differ)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Split:
  """One split.

  images: a uint8 array `[n, h, w, 3]`, or an `ImageSource` that decodes on access
    (files, a TFDS data source); the pipeline resizes and crops as configured.
  labels, attrs: int `[n]`; groups = labels * num_attrs + attrs.
  """

  images: Any
  labels: np.ndarray
  attrs: np.ndarray
  num_classes: int = 2
  num_attrs: int = 2

  @property
  def groups(self) -> np.ndarray:
    return (self.labels * self.num_attrs + self.attrs).astype(np.int32)

  @property
  def num_groups(self) -> int:
    return self.num_classes * self.num_attrs

  def __len__(self) -> int:
    return len(self.labels)

  def group_counts(self) -> np.ndarray:
    return np.bincount(self.groups, minlength=self.num_groups)


def check_splits(splits: dict[str, Split], source: str) -> dict[str, Split]:
  """Checks that every split has examples and labels/attributes in range; returns `splits`."""
  for name in ("train", "val", "test"):
    if name not in splits or len(splits[name]) == 0:
      raise DataError(f"{source}: the {name} split has no examples; every one of train, val "
                      "and test needs some")
  for name, split in splits.items():
    if len(split.images) != len(split.labels) or len(split.attrs) != len(split.labels):
      raise DataError(f"{source}: the {name} split has {len(split.images)} images, "
                      f"{len(split.labels)} labels and {len(split.attrs)} attributes")
    bad = np.flatnonzero((split.labels < 0) | (split.labels >= split.num_classes))
    if len(bad):
      raise DataError(f"{source}: {name} label {int(split.labels[bad[0]])} (example {int(bad[0])}, "
                      f"and {len(bad) - 1} more) is outside the class range 0..{split.num_classes - 1}")
    bad = np.flatnonzero((split.attrs < 0) | (split.attrs >= split.num_attrs))
    if len(bad):
      raise DataError(f"{source}: {name} spurious attribute {int(split.attrs[bad[0]])} (example "
                      f"{int(bad[0])}) is outside 0..{split.num_attrs - 1}")
  return splits
