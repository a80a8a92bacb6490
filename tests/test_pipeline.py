import collections

import numpy as np
import pytest

from dett_jax.data.pipeline import (eval_batches, example_weights, train_epoch,
                                    upsampled_indices)
from dett_jax.data.synthetic import WATERBIRDS_TRAIN_GROUPS, make_split


@pytest.fixture(scope="module")
def train():
  return make_split("train", 200, 16, seed=0)


def test_split_group_proportions_follow_waterbirds():
  split = make_split("train", 4795, 16, seed=1)
  np.testing.assert_allclose(split.group_counts(), WATERBIRDS_TRAIN_GROUPS, atol=2)
  val = make_split("val", 400, 16, seed=1).group_counts()
  assert val[0] == pytest.approx(val[1], abs=1) and val[2] == pytest.approx(val[3], abs=1)


def test_generation_is_deterministic():
  a, b = make_split("test", 40, 16, seed=3), make_split("test", 40, 16, seed=3)
  np.testing.assert_array_equal(a.images, b.images)
  assert not np.array_equal(a.images, make_split("test", 40, 16, seed=4).images)


def test_upsampling_counts_in_the_pipeline(train):
  error_set = np.array([3, 17, 42])
  index_list = upsampled_indices(len(train), error_set, 5)
  assert len(index_list) == len(train) + 3 * 4
  ds = train_epoch(train, index_list, global_batch_size=4, epoch=0, seed=0)
  seen = collections.Counter(np.concatenate([ds[k]["index"] for k in range(len(ds))]).tolist())
  assert len(ds) == len(index_list) // 4
  for i in error_set:
    assert seen[i] == 5
  assert seen[0] == 1 and seen[1] == 1


def test_per_epoch_reshuffle_is_seeded(train):
  index_list = np.arange(len(train))
  order = lambda epoch, seed=0: train_epoch(train, index_list, global_batch_size=8, epoch=epoch,
                                             seed=seed)[0]["index"]
  assert not np.array_equal(order(0), order(1))
  np.testing.assert_array_equal(order(1), order(1))
  assert not np.array_equal(order(1, seed=0), order(1, seed=1))


def test_process_shards_partition_the_global_batch(train):
  index_list = np.arange(len(train))
  whole = train_epoch(train, index_list, global_batch_size=8, epoch=2, seed=0)[3]
  parts = [train_epoch(train, index_list, global_batch_size=8, epoch=2, seed=0, process_index=p,
                       process_count=2)[3] for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([p["index"] for p in parts]), whole["index"])
  assert parts[0]["image"].shape == (4, 16, 16, 3)


def test_augmentation_is_shared_by_index_and_deterministic(train):
  index_list = np.arange(len(train))
  a = train_epoch(train, index_list, global_batch_size=8, epoch=0, seed=0)[0]
  b = train_epoch(train, index_list, global_batch_size=8, epoch=0, seed=0)[0]
  np.testing.assert_array_equal(a["image"], b["image"])
  plain = train_epoch(train, index_list, global_batch_size=8, epoch=0, seed=0, augment_images=False)[0]
  assert not np.array_equal(a["image"], plain["image"])


def test_loss_weights(train):
  w = example_weights(10, np.array([2, 5]), 7.0)
  assert w.tolist() == [1, 1, 7, 1, 1, 7, 1, 1, 1, 1]
  batch = train_epoch(train, np.arange(10), global_batch_size=10, epoch=0, seed=0, weights=w)[0]
  np.testing.assert_array_equal(batch["weight"], w[batch["index"]])


def test_eval_batches_cover_every_example_once(train):
  batches = list(eval_batches(train, global_batch_size=64))
  idx = np.concatenate([b["index"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(idx, np.arange(len(train)))
  assert all(b["image"].shape[0] == 64 for b in batches)


def test_upsampling_rejects_fractional_lambda():
  with pytest.raises(ValueError, match="integer lambda_up"):
    upsampled_indices(5, np.array([1]), 2.5)
