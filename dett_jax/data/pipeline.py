"""grain input pipelines: upsampled index lists, per-epoch shuffles, per-process shards.

A training epoch is a `grain.MapDataset` of global batches built from the index
list (error-set examples repeated `lambda_up` times when upsampling), shuffled by
`(seed, epoch)`. Every process loads only its slice of each global batch, so the
global batch at a given step is the same for any number of processes, and a run
resumes exactly from `(epoch, batch)` without further iterator state.

Examples are decoded, augmented and normalised per example inside the grain map
(see `dett_jax.data.images`); `iterate` runs that in worker processes
(`mp_prefetch`) so decoding keeps up with the accelerator.
"""

from __future__ import annotations

from typing import Iterator

import grain
import numpy as np
from absl import flags

from dett_jax.data.images import Preprocess
from dett_jax.data.split import Split

Batch = dict[str, np.ndarray]


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


def _gather(split: Split, indices: np.ndarray, weights: np.ndarray | None,
            cached: dict[str, np.ndarray] | None = None) -> Batch:
  batch = {
      "index": indices.astype(np.int32),
      "label": split.labels[indices],
      "group": split.groups[indices],
      "weight": (np.ones(len(indices), np.float32) if weights is None
                 else weights[indices].astype(np.float32)),
      "mask": np.ones(len(indices), np.float32),
  }
  for key, values in (cached or {}).items():  # per-example arrays, e.g. a memory map
    batch[key] = np.asarray(values[np.sort(indices)])[np.argsort(np.argsort(indices))]
  return batch


def train_epoch(split: Split, index_list: np.ndarray, *, global_batch_size: int, epoch: int,
                seed: int, preprocess: Preprocess | None = None, augment_images: bool = True,
                weights: np.ndarray | None = None, process_index: int = 0,
                process_count: int = 1,
                cached: dict[str, np.ndarray] | None = None) -> grain.MapDataset:
  """The batches of one training epoch, as a random-access `grain.MapDataset`.

  Element k is this process's part of global batch k: a dict with `image`
  float32 `[b, s, s, 3]` (b = global_batch_size / process_count), `label`,
  `group`, `index` int32 `[b]`, `weight` and `mask` float32 `[b]`, and for each
  `cached[key]` (per-example arrays `[n, ...]`, e.g. memory-mapped teacher outputs)
  its rows of this batch. The last incomplete batch is dropped. Each example's augmentation is drawn from
  `(seed, epoch, position in the epoch)`, so it does not depend on the number of
  processes or workers.
  """
  if global_batch_size % process_count:
    raise ValueError(f"batch size {global_batch_size} is not divisible by {process_count} processes")
  preprocess = preprocess or default_preprocess(split)
  local = global_batch_size // process_count
  lo, hi = process_index * local, (process_index + 1) * local
  ds = grain.MapDataset.source(np.asarray(index_list)).shuffle(seed=_epoch_seed(seed, epoch))
  ds = ds.batch(global_batch_size, drop_remainder=True)

  def load(batch_index: int, global_indices: np.ndarray) -> Batch:
    indices = np.asarray(global_indices)[lo:hi]
    batch = _gather(split, indices, weights, cached)
    images = []
    for j, i in enumerate(indices):
      image = split.images[int(i)]
      if augment_images:
        position = batch_index * global_batch_size + lo + j
        image = preprocess.train(image, np.random.default_rng([seed, epoch, position, 17]))
      else:
        image = preprocess.eval(image)
      images.append(image)
    batch["image"] = preprocess.normalize(np.stack(images))
    return batch

  return ds.map_with_index(load)


def train_batches(split: Split, index_list: np.ndarray, *, num_epochs: int, global_batch_size: int,
                  seed: int, **kwargs) -> grain.MapDataset:
  """Every batch of `num_epochs` epochs (see `train_epoch`) as one `grain.MapDataset`:
  element `step` is batch `step % steps_per_epoch` of epoch `step // steps_per_epoch`."""
  per_epoch = steps_per_epoch(len(index_list), global_batch_size)
  cache: dict[int, grain.MapDataset] = {}

  def load(step: int) -> Batch:
    epoch, index = divmod(int(step), per_epoch)
    if epoch not in cache:
      cache.clear()
      cache[epoch] = train_epoch(split, index_list, global_batch_size=global_batch_size,
                                 epoch=epoch, seed=seed, **kwargs)
    return cache[epoch][index]

  return grain.MapDataset.range(num_epochs * per_epoch).map(load)


def eval_dataset(split: Split, *, global_batch_size: int, preprocess: Preprocess | None = None,
                 process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Every example of `split` once, in order, in batches padded to full size (`mask` 0)."""
  preprocess = preprocess or default_preprocess(split)
  local = global_batch_size // process_count
  n = len(split)

  def load(k: int) -> Batch:
    start = int(k) * global_batch_size + process_index * local
    indices = np.arange(start, start + local)
    mask = (indices < n).astype(np.float32)
    indices = np.minimum(indices, n - 1)
    batch = _gather(split, indices, None)
    batch["mask"] = mask
    batch["image"] = preprocess.normalize(
        np.stack([preprocess.eval(split.images[int(i)]) for i in indices]))
    return batch

  return grain.MapDataset.range(-(-n // global_batch_size)).map(load)


def eval_batches(split: Split, *, global_batch_size: int, preprocess: Preprocess | None = None,
                 process_index: int = 0, process_count: int = 1, workers: int = 0) -> Iterator[Batch]:
  """Yields the batches of `eval_dataset`, loaded by `workers` processes (0: in this one)."""
  return iterate(eval_dataset(split, global_batch_size=global_batch_size, preprocess=preprocess,
                              process_index=process_index, process_count=process_count),
                 workers=workers)


def iterate(ds: grain.MapDataset, start: int = 0, workers: int = 0) -> Iterator[Batch]:
  """Elements `start`, `start + 1`, ... of `ds`; with `workers` > 0 they are loaded
  ahead by that many worker processes (grain's `mp_prefetch`), in the same order."""
  if start:
    ds = ds[start:]
  if workers <= 0:
    for i in range(len(ds)):
      yield ds[i]
    return
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
    flags.FLAGS.mark_as_parsed()
  it = iter(ds.to_iter_dataset().mp_prefetch(
      grain.multiprocessing.MultiprocessingOptions(num_workers=workers)))
  try:
    for batch in it:  # copy out of grain's shared memory, which is freed with the iterator
      yield {k: np.array(v) for k, v in batch.items()}
  finally:
    it.close()


def default_preprocess(split: Split) -> Preprocess:
  """Pad-crop augmentation at the split's own (square) image size, for in-memory images."""
  shape = np.shape(split.images)
  if len(shape) != 4 or shape[1] != shape[2]:
    raise ValueError("give a Preprocess for images that are not one square in-memory array")
  return Preprocess(image_size=shape[1])


def steps_per_epoch(num_indices: int, global_batch_size: int) -> int:
  return num_indices // global_batch_size


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.default_rng([seed, epoch, 3]).integers(0, 2**31 - 1))
