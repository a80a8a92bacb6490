"""Second built-in benchmark: a small tinted mark on a dominant colour field ("synthetic marks").

The class y is the colour tint of a small square mark (8x8 pixels at 32x32, 6% of the
image) at a random place: green vs magenta, opposite colour shifts of the same size
that leave the brightness unchanged. The spurious attribute a is a high-contrast
colour field covering every pixel ("warm": red-orange, "cool": blue-cyan, 0.5 apart in
the red and blue channels, with large random brightness blotches and tints). The
training split is 95% correlated (Waterbirds' group proportions, g = 2*y + a); val and
test are balanced within each class, as in `synthetic`.

How it differs from the first benchmark (`synthetic`, shapes on backgrounds), and why:
there the class is the shape of a large foreground object (about a quarter of the
image), so the core feature carries much of the pixel variance. Here the core feature is
a few pixels with a small contrast, while the attribute changes every pixel: the label
explains well under 1% of the pixel variance and the attribute most of it, so the
attribute dominates the variance of the input and of a network's features, and a
debiased last layer must read a low-variance direction. That is the case where DeTT's
feature MSE (which weighs directions by their variance) can match the dominant,
spurious directions well and the core direction poorly, so the student disagrees with
the transplanted head even at a small relative feature error (docs/design.md, "Why feature
matching can miss the head").

A tint is unchanged by the pipeline's horizontal flip, and marks keep a margin from the
border so that the pad-and-crop augmentation does not cut them off. A fraction `faint`
of marks is nearly invisible, so that the mark predicts the class less reliably than
the colour field does on the correlated training split (as birds in real photos).

A separate, unbiased pretraining task (8 mark tints x 4 colour fields, uncorrelated,
labelled by the mark) stands in for ImageNet pretraining, so that both teacher and
student start with features that encode the small mark.

Everything is generated in memory from a seed; nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dett_jax.data.split import DataError, Split
from dett_jax.data.synthetic import _split_group_sizes

# Mark types: the colour each adds to its patch (max |component| = 1, scaled by the
# mark's contrast). The benchmark's classes are "green" and "magenta": opposite tints that
# leave the brightness unchanged.
_TINTS = {
    "green": (-0.5, 1.0, -0.5),
    "magenta": (0.5, -1.0, 0.5),
    "red": (1.0, -0.5, -0.5),
    "cyan": (-1.0, 0.5, 0.5),
    "blue": (-0.5, -0.5, 1.0),
    "yellow": (0.5, 0.5, -1.0),
    "white": (1.0, 1.0, 1.0),
    "black": (-1.0, -1.0, -1.0),
}
MARKS = tuple(_TINTS)
TINTS = np.array([_TINTS[m] for m in MARKS], np.float32)


def mark_side(size: int) -> int:
  """Side of the square mark in pixels: size // 4 (8 at 32x32: 6.25% of the pixels)."""
  return max(3, size // 4)


FIELDS = ("warm", "cool", "green", "violet")
# Base colour of each field; "warm" and "cool" (the benchmark's attribute 0 and 1)
# differ by 0.5 in the red and blue channels of every pixel.
PALETTE = np.array([
    [0.75, 0.45, 0.25],  # warm: red-orange
    [0.25, 0.45, 0.75],  # cool: blue-cyan
    [0.30, 0.70, 0.30],  # green
    [0.65, 0.30, 0.70],  # violet
], np.float32)
PRETRAINING_CLASSES = len(MARKS)


def _blotches(n: int, size: int, rng: np.random.Generator, cells: int = 4) -> np.ndarray:
  """Smooth random fields `[n, size, size]` in [-1, 1]: a coarse grid, bilinearly upsampled."""
  coarse = rng.uniform(-1, 1, (n, cells + 1, cells + 1))
  idx = np.linspace(0, cells, size)
  i0 = np.floor(idx).astype(int).clip(0, cells - 1)
  f = (idx - i0)[None, :]
  rows = coarse[:, i0, :] * (1 - f[..., None]) + coarse[:, i0 + 1, :] * f[..., None]
  return rows[:, :, i0] * (1 - f[:, None, :]) + rows[:, :, i0 + 1] * f[:, None, :]


def _fields(field_ids: np.ndarray, size: int, rng: np.random.Generator,
            contrast: float) -> np.ndarray:
  """Float images `[n, size, size, 3]`: each field's colour, a random brightness and
  high-contrast blotches (amplitude `contrast`) in brightness and in a random tint."""
  n = len(field_ids)
  base = PALETTE[field_ids][:, None, None, :] + rng.normal(0, 0.05, (n, 1, 1, 3))
  brightness = rng.uniform(-0.1, 0.1, (n, 1, 1, 1))
  blotch = contrast * _blotches(n, size, rng)[..., None]
  tint = rng.normal(0, 1, (n, 1, 1, 3))
  tint = 0.3 * contrast * _blotches(n, size, rng)[..., None] * tint / np.linalg.norm(
      tint, axis=-1, keepdims=True)
  return base + brightness + blotch + tint


def render(mark_ids: np.ndarray, field_ids: np.ndarray, size: int, rng: np.random.Generator,
           noise: float = 0.04, faint: float = 0.15, mark_contrast=(0.25, 0.45),
           field_contrast: float = 0.2) -> np.ndarray:
  """Renders uint8 images `[n, size, size, 3]` of small tinted marks on colour fields.

  A mark is a `mark_side(size)`-pixel square whose pixels shift by its tint times a
  random contrast in `mark_contrast` (a fraction `faint` of marks: in [0, 0.03], barely
  visible), at a random place at least `size // 8` pixels from the border.
  """
  n = len(mark_ids)
  img = _fields(field_ids, size, rng, field_contrast)
  side = mark_side(size)
  margin = max(1, size // 8)
  high = size - margin - side
  if high < margin:
    raise DataError(f"image size {size} is too small for the {side}-pixel marks; use >= 16")
  top = rng.integers(margin, high + 1, n)
  left = rng.integers(margin, high + 1, n)
  lo, hi = mark_contrast
  amount = np.where(rng.random(n) < faint, rng.uniform(0.0, 0.03, n), rng.uniform(lo, hi, n))
  rows = top[:, None] + np.arange(side)[None]
  cols = left[:, None] + np.arange(side)[None]
  tint = (TINTS[mark_ids] * amount[:, None].astype(np.float32))[:, None, None, :]
  img[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] += tint
  img = img + rng.normal(0, noise, img.shape)
  return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def split_size(split: str, size: int) -> int:
  """How many examples `make_split(split, size, ...)` generates (as `synthetic.split_size`)."""
  return int(sum(_split_group_sizes(split, size)))


def make_split(split: str, size: int, image_size: int, seed: int, class_marks=(0, 1),
               **render_args: Any) -> Split:
  """Generates the `split` ("train", "val" or "test") of the marks benchmark.

  Labels are the marks `class_marks[y]` (indices into `MARKS`; default: green vs magenta);
  attributes are the colour fields warm (0) and cool (1). `render_args` go to `render`.
  """
  sizes = _split_group_sizes(split, size)
  rng = np.random.default_rng([seed, ("train", "val", "test").index(split), 11])
  groups = np.concatenate([np.full(s, g) for g, s in enumerate(sizes)])
  groups = groups[rng.permutation(len(groups))]
  labels, attrs = groups // 2, groups % 2
  images = render(np.asarray(class_marks)[labels], attrs, image_size, rng, **render_args)
  return Split(images, labels.astype(np.int32), attrs.astype(np.int32), name=split)


def make_pretraining_set(size: int, image_size: int, seed: int, **render_args: Any) -> Split:
  """Unbiased pretraining task: every mark on every colour field, labelled by mark.

  `attrs` holds the field id (4 values), so `groups` is (mark, field).
  """
  rng = np.random.default_rng([seed, 7, 11])
  marks = rng.integers(0, len(MARKS), size)
  fields = rng.integers(0, len(FIELDS), size)
  images = render(marks, fields, image_size, rng, **render_args)
  return Split(images, marks.astype(np.int32), fields.astype(np.int32),
               num_classes=len(MARKS), num_attrs=len(FIELDS), name="pretraining")


def _render_args(data_config: Any) -> dict:
  return dict(noise=data_config.noise, faint=data_config.faint,
              mark_contrast=tuple(data_config.mark_contrast),
              field_contrast=data_config.field_contrast)


def splits_from_config(data_config: Any) -> dict[str, Split]:
  """{"train", "val", "test"} from a completed `config.data` (every field of
  `config_schema.data_defaults("synthetic_marks")`; `load_splits` completes it)."""
  if data_config.image_size < 16:
    raise DataError(f"data.image_size={data_config.image_size} is too small for the marks "
                    "benchmark's 5-pixel marks; use at least 16")
  sizes = {"train": data_config.train_size, "val": data_config.val_size,
           "test": data_config.test_size}
  for split, size in sizes.items():
    if size < 8:
      raise DataError(f"data.{split}_size={size} is too small; use at least 8 examples")
  marks = tuple(data_config.class_marks)
  if len(marks) != 2 or len(set(marks)) != 2 or not all(0 <= m < len(MARKS) for m in marks):
    raise DataError(f"data.class_marks={marks}; give two different mark indices in "
                    f"0..{len(MARKS) - 1} ({', '.join(MARKS)})")
  return {split: make_split(split, size, data_config.image_size, data_config.seed,
                            marks, **_render_args(data_config))
          for split, size in sizes.items()}


def pretraining_from_config(data_config: Any, size: int) -> Split:
  """The pretraining set of `size` examples for a completed `config.data`."""
  return make_pretraining_set(size, data_config.image_size, data_config.seed,
                              **_render_args(data_config))
