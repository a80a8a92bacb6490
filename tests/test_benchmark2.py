"""The second built-in benchmark ("synthetic marks"): splits, signal sizes, pretraining
task, its dispatch, and a tiny end-to-end run."""

import json
import os

import numpy as np
import pytest

from conftest import load_config, override
from dett_jax.data import DataError, load_splits, pretraining_classes, pretraining_set
from dett_jax.data import synthetic, synthetic_marks
from dett_jax.validation import known_train_size, validate_config

pytestmark = pytest.mark.slow  # left out of ./run.sh test-fast (the full suite runs it)

WATERBIRDS = np.array(synthetic.WATERBIRDS_TRAIN_GROUPS, float)


def _config(**data):
  return {"name": "synthetic_marks", "image_size": 32, "train_size": 1000, "val_size": 400,
          "test_size": 400, **data}


@pytest.fixture(scope="module")
def splits():
  return load_splits(_config())


def test_training_split_has_waterbirds_proportions(splits):
  train = splits["train"]
  counts = train.group_counts()
  assert counts.sum() == 1000 == synthetic_marks.split_size("train", 1000)
  np.testing.assert_allclose(counts / counts.sum(), WATERBIRDS / WATERBIRDS.sum(), atol=2e-3)
  correlated = np.mean(train.labels == train.attrs)
  assert 0.94 <= correlated <= 0.96
  assert set(np.unique(train.groups)) == {0, 1, 2, 3}


@pytest.mark.parametrize("name", ["val", "test"])
def test_val_and_test_are_balanced_within_each_class(splits, name):
  counts = splits[name].group_counts()
  assert counts.sum() == 400
  for y in (0, 1):
    assert abs(int(counts[2 * y]) - int(counts[2 * y + 1])) <= 1
  # Class sizes as in training (landbird-like class 0 is the larger one).
  class1 = (WATERBIRDS[2] + WATERBIRDS[3]) / WATERBIRDS.sum()
  assert abs((counts[2] + counts[3]) / 400 - class1) < 0.01


def test_deterministic_by_seed():
  a, b = load_splits(_config(seed=3)), load_splits(_config(seed=3))
  c = load_splits(_config(seed=4))
  for name in ("train", "val", "test"):
    np.testing.assert_array_equal(a[name].images, b[name].images)
    np.testing.assert_array_equal(a[name].labels, b[name].labels)
    np.testing.assert_array_equal(a[name].attrs, b[name].attrs)
    assert not np.array_equal(a[name].images, c[name].images)
  p = pretraining_set(load_config("synthetic_marks").data, 64)
  np.testing.assert_array_equal(p.images, pretraining_set(load_config("synthetic_marks").data,
                                                          64).images)


def test_class_signal_is_a_few_pixels():
  """The same fields rendered with the other class's mark: at most 7% of the pixels differ
  (an 8x8 mark in a 32x32 image: 6.25%), each by at most the mark's contrast."""
  n, size = 200, 32
  fields = np.arange(n) % 2
  ones = np.ones(n, int)
  kwargs = dict(faint=0.0, noise=0.0)
  green = synthetic_marks.render(0 * ones, fields, size, np.random.default_rng(0), **kwargs)
  magenta = synthetic_marks.render(1 * ones, fields, size, np.random.default_rng(0), **kwargs)
  differ = np.any(green != magenta, axis=-1)  # [n, size, size]
  assert 0.03 < differ.mean() <= 0.07
  assert differ.reshape(n, -1).sum(1).max() <= synthetic_marks.mark_side(size) ** 2 == 64
  # A channel moves by at most twice the largest contrast (0.45: one tint up, one down).
  assert np.abs(green.astype(int) - magenta.astype(int)).max() <= 2 * 0.45 * 255 + 1


def test_label_explains_little_pixel_variance_and_the_attribute_most(splits):
  """Between-group share of the total pixel variance (R^2) on the balanced test split:
  the class explains < 1%, the spurious attribute > 30%."""
  test = splits["test"]
  x = test.images.reshape(len(test.images), -1).astype(np.float64) / 255
  total = x.var(0).sum()

  def explained(v):
    mean = x.mean(0)
    return sum(np.mean(v == k) * ((x[v == k].mean(0) - mean) ** 2).sum()
               for k in np.unique(v)) / total

  by_label, by_attr = explained(test.labels), explained(test.attrs)
  assert by_label < 0.01, by_label
  assert by_attr > 0.3, by_attr
  assert by_attr > 30 * by_label


def test_class_tints_are_opposite_and_distinct():
  tints = synthetic_marks.TINTS
  green, magenta = (synthetic_marks.MARKS.index(m) for m in ("green", "magenta"))
  assert (green, magenta) == tuple(load_config("synthetic_marks").data.class_marks)
  np.testing.assert_array_equal(tints[green], -tints[magenta])
  assert np.abs(tints).max() == 1.0
  assert len({t.tobytes() for t in tints}) == len(tints)


def test_pretraining_set_is_unbiased_and_labelled_by_mark():
  data = load_config("synthetic_marks").data
  p = pretraining_set(data, 4000)
  assert p.num_classes == len(synthetic_marks.MARKS) == pretraining_classes(data) == 8
  assert p.num_attrs == len(synthetic_marks.FIELDS) == 4
  counts = np.zeros((8, 4))
  np.add.at(counts, (p.labels, p.attrs), 1)
  assert counts.min() > 0
  # Independence: a chi-square statistic well within its 21 degrees of freedom (p ~ 1e-4 at 50).
  expected = counts.sum(1, keepdims=True) * counts.sum(0, keepdims=True) / counts.sum()
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 50, chi2
  # The field predicts the mark no better than chance: P(mark | field) near 1/8.
  np.testing.assert_allclose(counts / counts.sum(0, keepdims=True), 1 / 8, atol=0.04)


def test_pretraining_dispatch_by_data_name():
  marks = load_config("synthetic_marks").data
  birds = load_config("synthetic").data
  assert pretraining_set(birds, 16).num_classes == len(synthetic.SHAPES) == pretraining_classes(birds)
  assert pretraining_set(marks, 16).images.shape == (16, 32, 32, 3)
  with pytest.raises(DataError, match="no built-in pretraining task"):
    pretraining_set(load_config("waterbirds").data, 16)


def test_config_validates_and_tiny_setting():
  config = load_config("synthetic_marks")
  validate_config(config)
  assert config.data.name == "synthetic_marks" and config.pretrain.enabled
  assert known_train_size(config) == config.data.train_size
  tiny = load_config("synthetic_marks", "tiny")
  validate_config(tiny)
  assert tiny.data.image_size == 16
  with pytest.raises(DataError, match="too small"):
    load_splits(_config(image_size=8))
  with pytest.raises(DataError, match="class_marks"):
    load_splits(_config(class_marks=(1, 1)))


def test_tiny_pipeline_runs_end_to_end(tmp_path):
  from dett_jax.experiment import train_and_evaluate
  config = override(load_config("synthetic_marks", "tiny"), **{"distill.methods": "dett"})
  workdir = str(tmp_path / "marks")
  results = train_and_evaluate(config, workdir)
  assert set(results["models"]) == {"teacher_erm", "teacher_dfr", "student_dett"}
  for entry in results["models"].values():
    assert 0.0 <= entry["metrics"]["test/worst_group_acc"] <= 1.0
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["config"]["data"]["name"] == "synthetic_marks"
  assert os.path.exists(os.path.join(workdir, "pretrain_teacher", "done.json"))
