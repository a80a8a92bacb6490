"""The built-in text benchmark (dett_jax/data/synthetic_text.py): groups, the order rule,
the topic shortcut, the tokenizer and the unbiased pretraining task."""

from __future__ import annotations

import doctest
import time

import ml_collections
import numpy as np
import pytest

from dett_jax.data import synthetic_text as st
from dett_jax.data.split import DataError
from dett_jax.data.tokenize import Texts, Tokenize

WATERBIRDS = [3498, 184, 56, 1057]


def _config(**overrides) -> ml_collections.ConfigDict:
  fields = dict(train_size=400, val_size=100, test_size=100, seed=0, class_family=0,
                min_words=6, max_words=14, ambiguous=0.15)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _bag_of_words(texts, words) -> np.ndarray:
  """Counts `[n, len(words)]` of each word in each text."""
  index = {w: i for i, w in enumerate(words)}
  counts = np.zeros((len(texts), len(words)), np.float32)
  for row, text in enumerate(texts):
    for word in text.split():
      if word in index:
        counts[row, index[word]] += 1
  return counts


def _logistic_regression(x: np.ndarray, y: np.ndarray, steps: int = 300, lr: float = 0.5):
  """Full-batch gradient descent on the mean log loss; returns a predict function."""
  mean, std = x.mean(0), x.std(0) + 1e-6
  x = (x - mean) / std
  w, b = np.zeros(x.shape[1]), 0.0
  for _ in range(steps):
    p = 1 / (1 + np.exp(-(x @ w + b)))
    w -= lr * x.T @ (p - y) / len(y)
    b -= lr * np.mean(p - y)
  return lambda z: (((z - mean) / std) @ w + b > 0).astype(int)


def test_train_has_waterbirds_groups_and_95_percent_correlation():
  train = st.make_split("train", 4795, seed=0)
  assert isinstance(train.images, Texts) and len(train.images) == 4795
  assert train.group_counts().tolist() == WATERBIRDS
  assert np.mean(train.labels == train.attrs) == pytest.approx(0.95, abs=0.01)
  assert st.split_size("train", 4795) == 4795


@pytest.mark.parametrize("split", ["val", "test"])
def test_val_and_test_are_balanced_within_each_class(split):
  data = st.make_split(split, 1000, seed=0)
  counts = data.group_counts()
  assert len(data) == counts.sum() == st.split_size(split, 1000) == 1000
  assert abs(counts[0] - counts[1]) <= 1 and abs(counts[2] - counts[3]) <= 1
  assert min(counts) > 0


def test_generation_is_deterministic_and_fast():
  a, b = st.make_split("train", 500, seed=3), st.make_split("train", 500, seed=3)
  assert list(a.images) == list(b.images) and np.array_equal(a.labels, b.labels)
  assert list(st.make_split("train", 500, seed=4).images) != list(a.images)
  assert list(st.make_split("val", 500, seed=3).images) != list(st.make_split(
      "test", 500, seed=3).images)
  p, q = st.make_pretraining_set(300, seed=1), st.make_pretraining_set(300, seed=1)
  assert list(p.images) == list(q.images) and np.array_equal(p.attrs, q.attrs)
  start = time.perf_counter()
  st.make_split("train", 10_000, seed=0)
  assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("family", [0, 2])
def test_the_order_of_the_marker_words_defines_the_label(family):
  data = st.make_split("train", 3000, seed=1, class_family=family, ambiguous=0.2)
  people, objects = st.MARKER_FAMILIES[family]
  ambiguous = 0
  for text, label, attr in zip(data.images, data.labels, data.attrs):
    words = text.split()
    assert st.MIN_WORDS <= len(words) <= st.MAX_WORDS
    # Exactly one person word, at most one object word, one topic word of topic `attr`.
    person = [i for i, w in enumerate(words) if w in people]
    obj = [i for i, w in enumerate(words) if w in objects]
    topic = [w for w in words if any(w in t for t in st.TOPICS)]
    assert len(person) == 1 and len(obj) <= 1 and topic and len(topic) == 1
    assert topic[0] in st.TOPICS[attr]
    if obj:
      assert label == int(person[0] < obj[0]) == st.order_label(text, family)
    else:
      ambiguous += 1
      assert st.order_label(text, family) is None
  assert ambiguous / len(data) == pytest.approx(0.2, abs=0.03)


def test_ambiguous_sentences_do_not_reveal_the_label():
  # Without the object word, the person's place is independent of the class.
  data = st.make_split("test", 20_000, seed=0, ambiguous=1.0)
  people = st.MARKER_FAMILIES[0][0]
  place = np.array([next(i for i, w in enumerate(t.split()) if w in people) / len(t.split())
                    for t in data.images])
  assert abs(place[data.labels == 1].mean() - place[data.labels == 0].mean()) < 0.02


def test_bag_of_words_reads_the_topic_but_fails_the_minority_groups():
  train, test = st.make_split("train", 4795, seed=0), st.make_split("test", 2000, seed=0)
  words = st.VOCABULARY
  predict = _logistic_regression(_bag_of_words(train.images, words), train.labels)
  train_acc = np.mean(predict(_bag_of_words(train.images, words)) == train.labels)
  assert train_acc == pytest.approx(0.95, abs=0.015)  # the topic, and no more
  correct = predict(_bag_of_words(test.images, words)) == test.labels
  group_acc = [correct[test.groups == g].mean() for g in range(4)]
  assert group_acc[0] > 0.9 and group_acc[3] > 0.9
  assert group_acc[1] < 0.2 and group_acc[2] < 0.2  # the cue disagrees with the class
  # Without the topic words a bag of words is at chance (per class; 77% of the examples
  # are class 0): the core needs the order.
  core_words = [w for w in words if not any(w in t for t in st.TOPICS)]
  fit, held_out = st.make_split("test", 4000, seed=1), st.make_split("val", 2000, seed=2)
  core_predict = _logistic_regression(_bag_of_words(fit.images, core_words), fit.labels)
  correct = core_predict(_bag_of_words(held_out.images, core_words)) == held_out.labels
  assert np.mean([correct[held_out.labels == y].mean() for y in (0, 1)]) < 0.56


def test_tokenizer_round_trips_the_vocabulary():
  tok = st.tokenizer()
  for i, token in enumerate(st.SPECIAL_TOKENS + st.VOCABULARY):
    assert tok.token_to_id(token) == i and tok.id_to_token(i) == token
  assert tok.token_to_id("[PAD]") == 0
  assert tok.get_vocab_size() == len(st.SPECIAL_TOKENS) + len(st.VOCABULARY)
  assert len(set(st.VOCABULARY)) == len(st.VOCABULARY)
  encoding = tok.encode(" ".join(w.upper() for w in st.VOCABULARY))  # lowercased
  assert encoding.tokens == ["[CLS]", *st.VOCABULARY, "[SEP]"]


@pytest.mark.parametrize("max_words", [st.MAX_WORDS, 9])
def test_tokenize_encodes_every_sentence_without_unk_or_truncation(max_words):
  tokenize = Tokenize(st.tokenizer(), st.max_length(max_words))
  unk, cls, sep = (st.SPECIAL_TOKENS.index(t) for t in ("[UNK]", "[CLS]", "[SEP]"))
  sets = [st.make_split(s, 500, seed=0, max_words=max_words) for s in ("train", "val", "test")]
  sets.append(st.make_pretraining_set(1000, seed=0, max_words=max_words))
  for data in sets:
    texts = list(data.images)
    tokens = tokenize.encode_batch(texts)
    ids, mask = tokens[:, 0], tokens[:, 2]
    lengths = np.array([len(t.split()) for t in texts])
    assert not (ids == unk).any()
    assert np.array_equal(mask.sum(1), lengths + 2)  # nothing cut off
    assert (ids[:, 0] == cls).all() and (ids[np.arange(len(ids)), lengths + 1] == sep).all()
    assert lengths.max() + 2 <= st.max_length(max_words)
  assert any(len(t.split()) == max_words for t in sets[-1].images)  # the bound is reached


def test_pretraining_label_is_the_core_and_independent_of_the_topic():
  data = st.make_pretraining_set(8000, seed=0)
  assert data.num_classes == st.PRETRAINING_CLASSES == 8 and data.num_attrs == 4
  counts = np.bincount(data.labels, minlength=8)
  assert counts.min() > 800
  # Every (label, topic) pair occurs; the topic's distribution given the label is uniform.
  table = data.group_counts().reshape(8, 4)
  assert np.abs(table / table.sum(1, keepdims=True) - 0.25).max() < 0.05
  for text, label in zip(list(data.images)[:2000], data.labels[:2000]):
    assert st.order_label(text, label // 2) in (None, label % 2)
  # A bag of topic words does not predict the order bit.
  topic_words = [w for t in st.TOPICS for w in t]
  order = data.labels % 2
  predict = _logistic_regression(_bag_of_words(data.images, topic_words), order, steps=100)
  assert np.mean(predict(_bag_of_words(data.images, topic_words)) == order) < 0.55


def test_from_config_builds_the_splits_and_names_bad_fields():
  config = _config()
  splits = st.splits_from_config(config)
  assert {k: len(v) for k, v in splits.items()} == {"train": 400, "val": 100, "test": 100}
  assert list(splits["train"].images) == list(st.make_split("train", 400, seed=0).images)
  pretraining = st.pretraining_from_config(config, 64)
  assert len(pretraining) == 64 and pretraining.num_classes == st.PRETRAINING_CLASSES
  for field, value in (("class_family", 4), ("min_words", 2), ("max_words", 5),
                       ("ambiguous", 1.5), ("val_size", 3)):
    with pytest.raises(DataError, match=f"data.{field}"):
      st.splits_from_config(_config(**{field: value}))


def test_docstring_examples_pass():
  result = doctest.testmod(st, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 6 and result.failed == 0
