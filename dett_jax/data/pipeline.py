"""grain input pipelines: upsampled index lists, per-epoch shuffles, per-process shards.

A training epoch is a `grain.MapDataset` of global batches built from the index
list (error-set examples repeated `lambda_up` times when upsampling), shuffled by
`(seed, epoch)`. Every process loads only its slice of each global batch, so the
global batch at a given step is the same for any number of processes, and a run
resumes exactly from `(epoch, batch)` without further iterator state.
"""

from __future__ import annotations

from typing import Iterator

import grain
import numpy as np

from dett_jax.data.synthetic import Split

Batch = dict[str, np.ndarray]
PIXEL_MEAN, PIXEL_STD = 127.5, 64.0


def example_weights(num_examples: int, error_set: np.ndarray | None, lambda_up: float) -> np.ndarray:
  """Per-example weights `[n]`: `lambda_up` for the error set, 1 elsewhere."""
  weights = np.ones(num_examples, np.float32)
  if error_set is not None and len(error_set):
    weights[np.asarray(error_set)] = lambda_up
  return weights


def upsampled_indices(num_examples: int, error_set: np.ndarray | None, lambda_up: int) -> np.ndarray:
  """Index list where each error-set example appears `lambda_up` times (others once)."""
  if int(lambda_up) != lambda_up or lambda_up < 1:
    raise ValueError(f"upsampling needs an integer lambda_up >= 1, got {lambda_up}")
  counts = np.ones(num_examples, np.int64)
  if error_set is not None and len(error_set):
    counts[np.asarray(error_set)] = int(lambda_up)
  return np.repeat(np.arange(num_examples), counts)


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 `[b, h, w, 3]` -> float32 roughly in [-2, 2]."""
  return (images.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD


def augment(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
  """Random crop (edge-padded by `pad` pixels) and horizontal flip, per example."""
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
  dy = rng.integers(0, 2 * pad + 1, b)
  dx = rng.integers(0, 2 * pad + 1, b)
  flip = rng.random(b) < 0.5
  out = np.empty_like(images)
  for i in range(b):
    crop = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    out[i] = crop[:, ::-1] if flip[i] else crop
  return out


def _gather(split: Split, indices: np.ndarray, weights: np.ndarray | None) -> Batch:
  return {
      "index": indices.astype(np.int32),
      "label": split.labels[indices],
      "group": split.groups[indices],
      "weight": (np.ones(len(indices), np.float32) if weights is None
                 else weights[indices].astype(np.float32)),
      "mask": np.ones(len(indices), np.float32),
  }


def train_epoch(split: Split, index_list: np.ndarray, *, global_batch_size: int, epoch: int,
                seed: int, augment_images: bool = True, weights: np.ndarray | None = None,
                process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """The batches of one training epoch, as a random-access `grain.MapDataset`.

  Element k is this process's part of global batch k: a dict with `image`
  float32 `[b, h, w, 3]` (b = global_batch_size / process_count), `label`,
  `group`, `index` int32 `[b]`, `weight` and `mask` float32 `[b]`. The last
  incomplete batch is dropped.
  """
  if global_batch_size % process_count:
    raise ValueError(f"batch size {global_batch_size} is not divisible by {process_count} processes")
  local = global_batch_size // process_count
  lo, hi = process_index * local, (process_index + 1) * local
  ds = grain.MapDataset.source(np.asarray(index_list)).shuffle(seed=_epoch_seed(seed, epoch))
  ds = ds.batch(global_batch_size, drop_remainder=True)

  def load(batch_index: int, global_indices: np.ndarray) -> Batch:
    indices = np.asarray(global_indices)[lo:hi]
    batch = _gather(split, indices, weights)
    images = split.images[indices]
    if augment_images:
      rng = np.random.default_rng([seed, epoch, batch_index, process_index, 17])
      images = augment(images, rng)
    batch["image"] = normalize(images)
    return batch

  return ds.map_with_index(load)


def eval_batches(split: Split, *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """Yields every example of `split` once, in order, padded to full batches (`mask` 0)."""
  local = global_batch_size // process_count
  n = len(split)
  num_batches = -(-n // global_batch_size)
  for k in range(num_batches):
    start = k * global_batch_size + process_index * local
    indices = np.arange(start, start + local)
    mask = (indices < n).astype(np.float32)
    indices = np.minimum(indices, n - 1)
    batch = _gather(split, indices, None)
    batch["mask"] = mask
    batch["image"] = normalize(split.images[indices])
    yield batch


def steps_per_epoch(num_indices: int, global_batch_size: int) -> int:
  return num_indices // global_batch_size


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.default_rng([seed, epoch, 3]).integers(0, 2**31 - 1))
