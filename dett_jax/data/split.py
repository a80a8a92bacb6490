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
  """One split of a data set: images, class labels and spurious attributes.

  images: a uint8 array `[n, h, w, 3]`, or an `ImageSource` that decodes on access
    (files, a TFDS data source); the pipeline resizes and crops as configured.
    In-memory arrays are checked on construction (`check`): shape and finite pixels.
  labels, attrs: int `[n]`; groups = labels * num_attrs + attrs.
  name: the split's name in error messages ("train", ...).

  Examples:
    >>> import numpy as np
    >>> from dett_jax import Split
    >>> split = Split(np.zeros((4, 8, 8, 3), np.uint8), labels=np.array([0, 0, 1, 1]),
    ...               attrs=np.array([0, 1, 1, 1]))
    >>> split.groups.tolist(), split.group_counts().tolist()
    ([0, 1, 3, 3], [1, 1, 0, 2])
  """

  images: Any
  labels: np.ndarray
  attrs: np.ndarray
  num_classes: int = 2
  num_attrs: int = 2
  name: str = dataclasses.field(default="", compare=False)  # for error messages

  def __post_init__(self):
    if is_image_array(self.images):  # in memory (e.g. a user's arrays): check now
      self.check(f"the {self.name} split" if self.name else "a Split")

  def check(self, where: str) -> None:
    """DataError (naming `where`, the example and the fix) unless the split is usable.

    Checks that images, labels and attributes have one entry per example, labels are in
    0..num_classes-1, attributes in 0..num_attrs-1, and in-memory images are
    `[n, h, w, 3]` with finite pixels.
    """
    for field, values in (("label", self.labels), ("spurious attribute", self.attrs)):
      if np.ndim(values) != 1:
        raise DataError(f"{where}: {field}s have shape {np.shape(values)}; give one integer "
                        "per example, shape [n]")
    n = len(self.labels)
    if len(self.images) != n or len(self.attrs) != n:
      raise DataError(f"{where} has {len(self.images)} images, {n} labels and "
                      f"{len(self.attrs)} attributes; give one of each per example")
    for field, values, limit in (("label", self.labels, self.num_classes),
                                 ("spurious attribute", self.attrs, self.num_attrs)):
      values = np.asarray(values)
      if values.dtype.kind not in "iub" and not np.array_equal(values, np.round(values)):
        bad = np.flatnonzero(values != np.round(values))
        raise DataError(f"{where}: {field} {float(values[bad[0]])} (example {int(bad[0])}) "
                        "is not an integer; give integer labels and attributes")
      bad = np.flatnonzero((values < 0) | (values >= limit))
      if len(bad):
        kind = "class range" if field == "label" else "range"
        raise DataError(f"{where}: {field} {int(values[bad[0]])} (example {int(bad[0])}, and "
                        f"{len(bad) - 1} more) is outside the {kind} 0..{limit - 1}; fix the "
                        f"data or raise num_{'classes' if field == 'label' else 'attrs'}")
    if is_image_array(self.images):
      check_image_array(self.images, where)

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


def is_image_array(images: Any) -> bool:
  """Whether `images` is one in-memory array (numpy or jax), not an `ImageSource`."""
  return hasattr(images, "shape") and hasattr(images, "dtype")


def check_image_array(images: Any, where: str, chunk: int = 1024) -> None:
  """DataError unless `images` is `[n, h, w, 3]` with finite pixel values."""
  shape = tuple(images.shape)
  if len(shape) != 4 or shape[-1] != 3:
    fix = "give RGB images, shape [n, h, w, 3]"
    if len(shape) == 3 or (len(shape) == 4 and shape[-1] == 1):
      fix = ("grayscale images must be repeated to 3 channels: "
             "np.repeat(images.reshape(*images.shape[:3], 1), 3, axis=-1)")
    elif len(shape) == 4 and shape[1] == 3:
      fix = "move channels last: images.transpose(0, 2, 3, 1)"
    elif len(shape) == 4 and shape[-1] == 4:
      fix = "drop the alpha channel: images[..., :3]"
    raise DataError(f"{where}: images have shape {shape}, not [n, h, w, 3]; {fix}")
  if np.dtype(images.dtype).kind not in "fc":
    return  # integer pixels are always finite
  bad = []
  for start in range(0, shape[0], chunk):  # bounded memory for large arrays
    block = np.asarray(images[start:start + chunk]).reshape(-1, int(np.prod(shape[1:])))
    bad.extend(start + np.flatnonzero(~np.isfinite(block).all(axis=1)))
  if bad:
    raise DataError(f"{where}: {len(bad)} image(s) hold NaN or infinite pixel values, the "
                    f"first is example {int(bad[0])}; fix or drop them (pixels are 0..255)")


def check_splits(splits: dict[str, Split], source: str) -> dict[str, Split]:
  """Checks that train, val and test have examples and every split passes `Split.check`."""
  for name in ("train", "val", "test"):
    if name not in splits or len(splits[name]) == 0:
      raise DataError(f"{source}: the {name} split has no examples; every one of train, val "
                      "and test needs some")
  for name, split in splits.items():
    split.check(f"{source}: the {name} split")
  return splits
