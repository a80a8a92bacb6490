"""Built-in benchmark: procedurally generated shapes on backgrounds ("synthetic birds").

The class y is the shape of a small foreground object; the spurious attribute a is
the background ("land": warm, blotchy texture; "water": cool, horizontal waves).
The training split is 95% correlated (group sizes proportional to Waterbirds'
3498/184/56/1057 for g = 2*y + a); val and test are balanced within each class.
The background covers most pixels and differs in colour, so it is far easier to
pick up than the object's shape: a network trained by ERM leans on it.

A separate, unbiased pretraining task (8 shapes x 4 backgrounds, uncorrelated,
labelled by shape) stands in for ImageNet pretraining, so that both teacher and
student start with features that encode the object, as in the reference setting.

Everything is generated in memory from a seed; nothing is downloaded.
"""

from __future__ import annotations

import numpy as np

from dett_jax.data.split import DataError, Split

# Waterbirds training group sizes, indexed by g = 2*y + a.
WATERBIRDS_TRAIN_GROUPS = (3498, 184, 56, 1057)
SHAPES = ("ring", "plus", "square", "disk", "cross", "triangle", "bars", "diamond")
BACKGROUNDS = ("land", "water", "sand", "night")


def _shape_masks(shape_ids: np.ndarray, size: int, rng: np.random.Generator,
                 min_radius: float, max_radius: float) -> np.ndarray:
  """Boolean masks `[n, size, size]` of the given shapes at random places and scales."""
  n = len(shape_ids)
  radius = rng.uniform(min_radius, max_radius, n)[:, None, None]
  margin = radius[:, 0, 0] + 1
  cx = rng.uniform(margin, size - 1 - margin)[:, None, None]
  cy = rng.uniform(margin, size - 1 - margin)[:, None, None]
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  dx, dy = (xx[None] - cx) / radius, (yy[None] - cy) / radius
  r = np.sqrt(dx**2 + dy**2)
  t = 0.34  # stroke half-width, relative to the radius
  masks = {
      "ring": (r < 1.0) & (r > 1.0 - 2 * t),
      "plus": ((np.abs(dx) < t) & (np.abs(dy) < 1)) | ((np.abs(dy) < t) & (np.abs(dx) < 1)),
      "square": (np.abs(dx) < 0.85) & (np.abs(dy) < 0.85),
      "disk": r < 1.0,
      "cross": (np.abs(dx - dy) < 1.4 * t) & (r < 1.1) | (np.abs(dx + dy) < 1.4 * t) & (r < 1.1),
      "triangle": (dy < 0.8) & (dy > 1.6 * np.abs(dx) - 1.0),
      "bars": (np.abs(dx) < 0.95) & ((np.abs(dy - 0.5) < t) | (np.abs(dy + 0.5) < t)),
      "diamond": np.abs(dx) + np.abs(dy) < 1.1,
  }
  out = np.zeros((n, size, size), bool)
  for sid, name in enumerate(SHAPES):
    sel = shape_ids == sid
    out[sel] = masks[name][sel]
  return out


def _backgrounds(bg_ids: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """Float images `[n, size, size, 3]` in [0, 1] of the given background types."""
  n = len(bg_ids)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
  freq = rng.uniform(2.5, 4.5, (n, 1, 1))
  waves = np.sin(2 * np.pi * freq * yy[None] + phase + 0.8 * np.sin(2 * np.pi * xx[None]))
  # Low-frequency blotches: bilinear upsampling of a coarse random grid.
  coarse = rng.uniform(-1, 1, (n, 5, 5))
  idx = np.linspace(0, 4, size)
  i0 = np.floor(idx).astype(int).clip(0, 3)
  f = (idx - i0)[None, :]
  rows = coarse[:, i0, :] * (1 - f[..., None]) + coarse[:, i0 + 1, :] * f[..., None]
  blotch = rows[:, :, i0] * (1 - f[:, None, :]) + rows[:, :, i0 + 1] * f[:, None, :]
  palette = np.array([
      [0.45, 0.55, 0.25],  # land: green-brown
      [0.20, 0.40, 0.70],  # water: blue
      [0.75, 0.65, 0.45],  # sand
      [0.15, 0.15, 0.25],  # night
  ], np.float32)
  base = palette[bg_ids][:, None, None, :] + rng.normal(0, 0.04, (n, 1, 1, 3))
  texture = np.where((bg_ids == 1)[:, None, None], 0.12 * waves, 0.12 * blotch)
  texture = np.where((bg_ids == 3)[:, None, None], 0.05 * blotch, texture)
  return base + texture[..., None]


def render(shape_ids: np.ndarray, bg_ids: np.ndarray, size: int, rng: np.random.Generator,
           noise: float = 0.05, faint: float = 0.15) -> np.ndarray:
  """Renders uint8 images `[n, size, size, 3]` of shapes on backgrounds."""
  n = len(shape_ids)
  img = _backgrounds(bg_ids, size, rng)
  masks = _shape_masks(shape_ids, size, rng, min_radius=size * 0.25, max_radius=size * 0.35)
  # Object colour is random, bright and independent of class and background. A
  # fraction `faint` of objects is blended almost into the background: there the
  # shape is barely visible, so the object predicts the class less reliably than
  # the background does on the correlated training split (as birds in real photos).
  colour = rng.uniform(0.6, 1.0, (n, 1, 1, 3)).astype(np.float32)
  opacity = np.where(rng.random(n) < faint, rng.uniform(0.0, 0.15, n), rng.uniform(0.6, 1.0, n))
  opacity = opacity[:, None, None, None].astype(np.float32)
  img = np.where(masks[..., None], opacity * colour + (1 - opacity) * img, img)
  img = img + rng.normal(0, noise, img.shape)
  return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _group_sizes(total: int, proportions) -> list[int]:
  proportions = np.asarray(proportions, np.float64) / np.sum(proportions)
  sizes = np.floor(proportions * total).astype(int)
  sizes[np.argmax(proportions)] += total - sizes.sum()
  return [max(1, int(s)) for s in sizes]


def _split_group_sizes(split: str, size: int) -> list[int]:
  train = np.asarray(WATERBIRDS_TRAIN_GROUPS, np.float64)
  if split == "train":
    return _group_sizes(size, train)
  if split in ("val", "test"):
    # Class sizes as in training; the attribute balanced within each class.
    class_sizes = _group_sizes(size, [train[0] + train[1], train[2] + train[3]])
    return [n for c in class_sizes for n in (c - c // 2, c // 2)]
  raise ValueError(f"unknown split {split!r}; expected train, val or test")


def split_size(split: str, size: int) -> int:
  """How many examples `make_split(split, size, ...)` generates, without generating them:
  `size`, or a little more for a tiny `size` (every group gets at least one example)."""
  return int(sum(_split_group_sizes(split, size)))


def make_split(split: str, size: int, image_size: int, seed: int, class_shapes=(0, 1),
               noise: float = 0.05, faint: float = 0.15) -> Split:
  """Generates the `split` ("train", "val" or "test") of the built-in benchmark."""
  sizes = _split_group_sizes(split, size)
  rng = np.random.default_rng([seed, ("train", "val", "test").index(split)])
  groups = np.concatenate([np.full(s, g) for g, s in enumerate(sizes)])
  groups = groups[rng.permutation(len(groups))]
  labels, attrs = groups // 2, groups % 2
  images = render(np.asarray(class_shapes)[labels], attrs, image_size, rng, noise, faint)
  return Split(images, labels.astype(np.int32), attrs.astype(np.int32), name=split)


def make_pretraining_set(size: int, image_size: int, seed: int, noise: float = 0.05,
                         faint: float = 0.15) -> Split:
  """Unbiased pretraining task: every shape on every background, labelled by shape.

  `attrs` holds the background id (4 values), so `groups` is (shape, background).
  """
  rng = np.random.default_rng([seed, 7])
  shapes = rng.integers(0, len(SHAPES), size)
  bgs = rng.integers(0, len(BACKGROUNDS), size)
  images = render(shapes, bgs, image_size, rng, noise, faint)
  return Split(images, shapes.astype(np.int32), bgs.astype(np.int32),
               num_classes=len(SHAPES), num_attrs=len(BACKGROUNDS), name="pretraining")


PRETRAINING_CLASSES = len(SHAPES)


def splits_from_config(data_config) -> dict[str, Split]:
  """{"train", "val", "test"} from a completed `config.data` (every field of
  `config_schema.data_defaults("synthetic")`; `load_splits` completes it)."""
  sizes = {"train": data_config.train_size, "val": data_config.val_size,
           "test": data_config.test_size}
  if data_config.image_size < 16:
    raise DataError(f"data.image_size={data_config.image_size} is too small for the built-in "
                    "benchmark's shapes; use at least 16")
  for split, size in sizes.items():
    if size < 8:
      raise DataError(f"data.{split}_size={size} is too small; use at least 8 examples")
  return {split: make_split(split, size, data_config.image_size, data_config.seed,
                            tuple(data_config.class_shapes), data_config.noise,
                            data_config.faint)
          for split, size in sizes.items()}


def pretraining_from_config(data_config, size: int) -> Split:
  """The pretraining set of `size` examples for a completed `config.data` (as
  `splits_from_config`; `pretraining_set` completes it)."""
  return make_pretraining_set(size, data_config.image_size, data_config.seed, data_config.noise,
                              data_config.faint)
