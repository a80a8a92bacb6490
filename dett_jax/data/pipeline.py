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


def find_error_set(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """The error set E: indices of the examples the identification model gets wrong.

  Args:
    predictions: the identification model's predicted classes `[n]` (int), or its logits
      `[n, k]` (argmax taken), on the training set in dataset order.
    labels: the training labels `[n]`.

  Returns:
    int64 `[m]` sorted indices i with prediction_i != label_i.

  Examples:
    >>> import numpy as np
    >>> from dett_jax import find_error_set
    >>> find_error_set(np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]]), np.array([0, 0, 1]))
    array([1, 2])
  """
  predictions = np.asarray(predictions)
  labels = np.asarray(labels)
  if predictions.ndim == 2:
    predictions = predictions.argmax(-1)
  if predictions.shape != labels.shape:
    raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape")
  return np.flatnonzero(predictions != labels).astype(np.int64)


def example_weights(num_examples: int, error_set: np.ndarray | None, lambda_up: float) -> np.ndarray:
  """Per-example weights `[n]`: `lambda_up` for the error set, 1 elsewhere (float32).

  The loss-weight realisation of DeTT's reweighting: put `weights[indices]` in each
  batch as `weight` (see `make_dett_step`).

  Examples:
    >>> import numpy as np
    >>> from dett_jax import example_weights
    >>> example_weights(5, np.array([1, 3]), lambda_up=20.0)
    array([ 1., 20.,  1., 20.,  1.], dtype=float32)
  """
  weights = np.ones(num_examples, np.float32)
  if error_set is not None and len(error_set):
    weights[np.asarray(error_set)] = lambda_up
  return weights


def upsampled_indices(num_examples: int, error_set: np.ndarray | None, lambda_up: int) -> np.ndarray:
  """Index list `[n + (lambda_up - 1) * m]`: each error-set example `lambda_up` times, others once.

  The upsampling realisation of DeTT's reweighting (as JTT): draw each epoch from this
  list, shuffled anew every epoch. `lambda_up` must be an integer >= 1.

  Examples:
    >>> import numpy as np
    >>> from dett_jax import upsampled_indices
    >>> upsampled_indices(4, np.array([2]), lambda_up=3)
    array([0, 1, 2, 2, 2, 3])
  """
  if int(lambda_up) != lambda_up or lambda_up < 1:
    raise ValueError(f"upsampling needs an integer lambda_up >= 1, got {lambda_up}")
  counts = np.ones(num_examples, np.int64)
  if error_set is not None and len(error_set):
    counts[np.asarray(error_set)] = int(lambda_up)
  return np.repeat(np.arange(num_examples), counts)


class _UpsampledMapDataset(grain.MapDataset):
  """`parent[indices[k]]` as element k (the element at epoch e: parent epoch e)."""

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent: grain.MapDataset, indices: np.ndarray):
    super().__init__(parent)
    self._indices = np.asarray(indices, np.int64)
    self._parent_length = len(parent)

  def __len__(self) -> int:
    return len(self._indices)

  def _parent_index(self, index: int) -> int:
    epoch, offset = divmod(int(index), len(self._indices))
    return int(self._indices[offset]) + epoch * self._parent_length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    with self._stats.record_self_time():
      parent_index = self._parent_index(index)
    return self._parent[parent_index]

  def __str__(self) -> str:
    return f"UpsampledMapDataset(len={len(self)})"


def upsample(dataset: grain.MapDataset, error_set: np.ndarray | None,
             lambda_up: int) -> grain.MapDataset:
  """The grain upsampling transform: `dataset` with each error-set element `lambda_up` times.

  Element order is the index order of `upsampled_indices`; shuffle after it
  (`.shuffle(seed)`: grain reshuffles every epoch when the result is `.repeat()`-ed) and
  batch as usual. Random-access and lazy: elements are read from `dataset` on access.

  Args:
    dataset: a `grain.MapDataset` of n training examples, in the order the error set
      indexes (dataset order).
    error_set: int `[m]` indices into `dataset` (e.g. from `find_error_set`), or None.
    lambda_up: integer >= 1, how many times each error-set example appears.

  Returns:
    A `grain.MapDataset` of `n + (lambda_up - 1) * m` elements.

  Examples:
    >>> import grain, numpy as np
    >>> from dett_jax import upsample
    >>> ds = grain.MapDataset.range(10, 13)                     # examples 0, 1, 2
    >>> list(upsample(ds, np.array([1]), lambda_up=3))
    [10, 11, 11, 11, 12]
    >>> epoch = upsample(ds, np.array([1]), lambda_up=3).shuffle(seed=0).batch(5)
    >>> sorted(epoch[0].tolist())
    [10, 11, 11, 11, 12]
  """
  return _UpsampledMapDataset(dataset, upsampled_indices(len(dataset), error_set, lambda_up))


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
  float32 `[b, s, s, 3]` (b = global_batch_size / process_count; for text, `tokens` int32
  `[b, 3, t]` under `preprocess.key`, see `dett_jax.data.tokenize.Tokenize`), `label`,
  `group`, `index` int32 `[b]`, `weight` and `mask` float32 `[b]`, and for each
  `cached[key]` (per-example arrays `[n, ...]`, e.g. memory-mapped teacher outputs)
  its rows of this batch. The last incomplete batch is dropped. Each example's augmentation is drawn from
  `(seed, epoch, position in the epoch)`, so it does not depend on the number of
  processes or workers.

  Examples:
    >>> import numpy as np
    >>> from dett_jax import load_splits, train_epoch, upsampled_indices
    >>> train = load_splits({"name": "synthetic", "image_size": 16, "train_size": 40,
    ...                      "val_size": 8, "test_size": 8})["train"]
    >>> index_list = upsampled_indices(len(train), np.array([3, 7]), lambda_up=5)   # 48 indices
    >>> epoch = train_epoch(train, index_list, global_batch_size=16, epoch=0, seed=0)
    >>> len(epoch), epoch[0]["image"].shape, sorted(epoch[0])
    (3, (16, 16, 16, 3), ['group', 'image', 'index', 'label', 'mask', 'weight'])
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
    batch[preprocess.key] = preprocess.normalize(np.stack(images))
    return batch

  return ds.map_with_index(load)


def epoch_batches(split: Split, *, batch_size: int, epoch: int, seed: int,
                  error_set: np.ndarray | None = None, lambda_up: int = 1,
                  preprocess: Preprocess | None = None, augment: bool = True) -> grain.MapDataset:
  """One epoch of DeTT's training batches: the error set upsampled, shuffled by `(seed, epoch)`.

  `train_epoch` over `upsampled_indices(len(split), error_set, lambda_up)`: each error-set
  example appears `lambda_up` times, the others once, in an order drawn from `(seed,
  epoch)`; the last incomplete batch is dropped. Batches are dicts of numpy arrays:
  `image` float32 `[batch_size, s, s, 3]` (augmented when `augment`, normalised),
  `label`, `group`, `index` int32 and `weight`, `mask` float32 (all 1) `[batch_size]`.
  With train.py's data seed these are the batches train.py trains on.

  Examples:
    >>> import numpy as np
    >>> from dett_jax import epoch_batches, load_splits
    >>> train = load_splits({"name": "synthetic", "image_size": 16, "train_size": 40,
    ...                      "val_size": 8, "test_size": 8})["train"]
    >>> batches = epoch_batches(train, batch_size=16, epoch=0, seed=0,
    ...                         error_set=np.array([3, 7]), lambda_up=5)   # 48 examples
    >>> len(batches), batches[0]["image"].shape
    (3, (16, 16, 16, 3))
    >>> for batch in batches:      # a training loop's epoch
    ...   pass
  """
  return train_epoch(split, upsampled_indices(len(split), error_set, lambda_up),
                     global_batch_size=batch_size, epoch=epoch, seed=seed, preprocess=preprocess,
                     augment_images=augment)


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
    batch[preprocess.key] = preprocess.normalize(
        np.stack([preprocess.eval(split.images[int(i)]) for i in indices]))
    return batch

  return grain.MapDataset.range(-(-n // global_batch_size)).map(load)


def eval_batches(split: Split, *, global_batch_size: int, preprocess: Preprocess | None = None,
                 process_index: int = 0, process_count: int = 1, workers: int = 0) -> Iterator[Batch]:
  """Yields the batches of `eval_dataset`, loaded by `workers` processes (0: in this one).

  Every example of `split` once, in order, in batches of `global_batch_size` (this
  process's part of it); the last batch is padded to full size with `mask` 0. Each
  batch holds `image` (not augmented), `label`, `group`, `index`, `weight` and `mask`.

  Examples:
    >>> from dett_jax import eval_batches, load_splits
    >>> val = load_splits({"name": "synthetic", "image_size": 16, "train_size": 8,
    ...                    "val_size": 40, "test_size": 8})["val"]
    >>> batches = list(eval_batches(val, global_batch_size=16))
    >>> len(batches), batches[-1]["image"].shape, int(batches[-1]["mask"].sum())
    (3, (16, 16, 16, 3), 8)
  """
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
