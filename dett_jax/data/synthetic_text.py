"""Built-in text benchmark: generated sentences whose class is the order of two words.

Every sentence is random filler words with three content words at random places: a
"person" word of a marker family (e.g. king, queen, prince), an "object" word of the same
family (sword, shield, crown) and one topic word. The class y is the ORDER of the two
marker words: y = 1 iff the person comes before the object. Both words are in every
sentence whatever the class, so a bag of words cannot read y; a model must compare two
positions (a tiny 2-layer transformer learns it in a few epochs). The spurious attribute a
is the topic word: a land word (forest, meadow, hill) for a = 0, a water word (ocean,
lake, river) for a = 1, one token anywhere, so far easier to pick up than the order. The
training split is 95% correlated (group sizes proportional to Waterbirds' 3498/184/56/1057
for g = 2*y + a); val and test are balanced within each class, as in `synthetic`. A
fraction `ambiguous` of sentences lacks the object word, so their order (and class) cannot
be read from the markers: there the core predicts the class less reliably than the topic
does on the correlated training split (as `synthetic`'s faint objects), and a network
trained by ERM leans on the topic.

A separate, unbiased pretraining task (4 marker families x 2 orders = 8 classes, the 4
topic families at random and uncorrelated, labelled by family and order) stands in for
BERT pretraining, so that both teacher and student start with features that encode the
order of marker words.

`tokenizer()` is a word-level tokenizer over `VOCABULARY` (BERT's special tokens first,
[PAD] = 0) that encodes every generated sentence without [UNK]; `max_length(max_words)`
is the longest sentence in tokens with [CLS] and [SEP]. Everything is generated in memory
from a seed; nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dett_jax.data.split import DataError, Split
from dett_jax.data.synthetic import _split_group_sizes
from dett_jax.data.tokenize import Texts

# Marker families: (person words, object words). The class is their order in the sentence.
MARKER_FAMILIES = (
    (("king", "queen", "prince"), ("sword", "shield", "crown")),
    (("doctor", "nurse", "surgeon"), ("needle", "scalpel", "bandage")),
    (("farmer", "miller", "baker"), ("wheat", "barley", "flour")),
    (("pilot", "sailor", "driver"), ("engine", "rudder", "wheel")),
)
# Topic families: the spurious attribute (0 land and 1 water in the benchmark; all four
# in the pretraining task).
TOPICS = (
    ("forest", "meadow", "hill"),
    ("ocean", "lake", "river"),
    ("desert", "dune", "canyon"),
    ("moon", "star", "midnight"),
)
FILLER = (
    "the", "a", "one", "some", "that", "this", "it", "was", "is", "very", "quite", "then",
    "again", "near", "over", "under", "with", "from", "and", "but", "so", "saw", "made",
    "took", "gave", "found", "left", "kept", "told", "said", "small", "big", "old", "new",
    "red", "green", "long", "short", "man", "woman", "child", "dog", "cat", "book", "house",
    "day", "road", "door", "window", "table", "letter", "song", "friend", "stone")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCABULARY = (FILLER + tuple(w for people, objects in MARKER_FAMILIES for w in people + objects)
              + tuple(w for topic in TOPICS for w in topic))  # 90 words, all distinct
PRETRAINING_CLASSES = 2 * len(MARKER_FAMILIES)
MIN_WORDS, MAX_WORDS = 6, 14  # default sentence lengths in words


def max_length(max_words: int = MAX_WORDS) -> int:
  """Tokens in the longest generated sentence, [CLS] and [SEP] included: max_words + 2."""
  return max_words + 2


def tokenizer() -> Any:
  """A fresh word-level `tokenizers.Tokenizer` for the generated sentences.

  Vocabulary: `SPECIAL_TOKENS` (ids 0..4: [PAD], [UNK], [CLS], [SEP], [MASK]) then
  `VOCABULARY`; lowercase normaliser, whitespace pre-tokenizer, BERT's post-processor
  ([CLS] A [SEP], pairs [CLS] A [SEP] B [SEP] with token type 1 for B).

  Examples:
    >>> from dett_jax.data.synthetic_text import tokenizer
    >>> tok = tokenizer()
    >>> tok.encode("The king saw a river").tokens
    ['[CLS]', 'the', 'king', 'saw', 'a', 'river', '[SEP]']
    >>> tok.token_to_id("[PAD]"), tok.token_to_id("dragon")
    (0, None)
  """
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

  vocab = {word: i for i, word in enumerate(SPECIAL_TOKENS + VOCABULARY)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
  return tok


def sentences(families: np.ndarray, orders: np.ndarray, topics: np.ndarray,
              rng: np.random.Generator, min_words: int = MIN_WORDS,
              max_words: int = MAX_WORDS, ambiguous: float = 0.15) -> list[str]:
  """Generates one sentence per example (all arguments int `[n]`).

  Each sentence has min_words..max_words words: filler, one person and one object word of
  marker family `families[i]` (the person first iff `orders[i]` is 1) and one word of
  topic `topics[i]`, at random distinct places. A fraction `ambiguous` of sentences has
  filler in place of the object word (their order cannot be read).
  """
  if not 3 <= min_words <= max_words:
    raise DataError(f"sentence lengths min_words={min_words}, max_words={max_words}; give "
                    "3 <= min_words <= max_words (three content words per sentence)")
  if not 0.0 <= ambiguous <= 1.0:
    raise DataError(f"ambiguous={ambiguous}; give a fraction in [0, 1]")
  n = len(families)
  words = np.asarray(FILLER, dtype=object)[rng.integers(0, len(FILLER), (n, max_words))]
  lengths = rng.integers(min_words, max_words + 1, n)
  # Three distinct places within each sentence: the first columns of a random
  # permutation of its positions.
  keys = rng.random((n, max_words))
  keys[np.arange(max_words)[None] >= lengths[:, None]] = np.inf
  places = np.argsort(keys, axis=1)[:, :3]
  first, second = places[:, :2].min(axis=1), places[:, :2].max(axis=1)
  person_at = np.where(orders == 1, first, second)
  object_at = np.where(orders == 1, second, first)
  keep = rng.random(n) >= ambiguous
  # Without the object word, the person stands at a uniformly random place: its
  # position must not reveal the order either.
  person_at = np.where(keep, person_at, places[:, 0])
  rows = np.arange(n)
  people = np.asarray([f[0] for f in MARKER_FAMILIES], dtype=object)
  objects = np.asarray([f[1] for f in MARKER_FAMILIES], dtype=object)
  topic_words = np.asarray(TOPICS, dtype=object)
  words[rows, person_at] = people[families, rng.integers(0, 3, n)]
  words[rows[keep], object_at[keep]] = objects[families[keep], rng.integers(0, 3, n)[keep]]
  words[rows, places[:, 2]] = topic_words[topics, rng.integers(0, 3, n)]
  return [" ".join(row[:length]) for row, length in zip(words.tolist(), lengths.tolist())]


def order_label(sentence: str, family: int = 0) -> int | None:
  """The core rule read from the words: 1 if the person word of marker `family` comes
  before its object word, 0 if after, None if either is missing (an ambiguous sentence)."""
  people, objects = MARKER_FAMILIES[family]
  words = sentence.lower().split()
  person = next((i for i, w in enumerate(words) if w in people), None)
  obj = next((i for i, w in enumerate(words) if w in objects), None)
  if person is None or obj is None:
    return None
  return int(person < obj)


def split_size(split: str, size: int) -> int:
  """How many examples `make_split(split, size, ...)` generates (as `synthetic.split_size`)."""
  return int(sum(_split_group_sizes(split, size)))


def make_split(split: str, size: int, seed: int, class_family: int = 0,
               min_words: int = MIN_WORDS, max_words: int = MAX_WORDS,
               ambiguous: float = 0.15) -> Split:
  """Generates the `split` ("train", "val" or "test") of the text benchmark.

  The sentences use marker family `class_family` (index into `MARKER_FAMILIES`); labels are
  the order (1: person before object), attributes the topic (0 land, 1 water). `images`
  holds the sentences as `Texts`.

  Examples:
    >>> from dett_jax.data.synthetic_text import make_split, order_label
    >>> train = make_split("train", 4795, seed=0)
    >>> train.group_counts().tolist()
    [3498, 184, 56, 1057]
    >>> train.images[1], int(train.labels[1]), int(train.attrs[1])
    ('made lake prince this it took letter song sword one', 1, 1)
    >>> order_label(train.images[1])
    1
  """
  sizes = _split_group_sizes(split, size)
  rng = np.random.default_rng([seed, ("train", "val", "test").index(split)])
  groups = np.concatenate([np.full(s, g) for g, s in enumerate(sizes)])
  groups = groups[rng.permutation(len(groups))]
  labels, attrs = groups // 2, groups % 2
  texts = sentences(np.full(len(groups), class_family), labels, attrs, rng, min_words,
                    max_words, ambiguous)
  return Split(Texts(texts), labels.astype(np.int32), attrs.astype(np.int32), name=split)


def make_pretraining_set(size: int, seed: int, min_words: int = MIN_WORDS,
                         max_words: int = MAX_WORDS, ambiguous: float = 0.15) -> Split:
  """Unbiased pretraining task: every marker family in both orders with every topic.

  Labels are 2 * family + order (`PRETRAINING_CLASSES` = 8); `attrs` holds the topic
  (4 values, independent of the label), so `groups` is (label, topic).
  """
  rng = np.random.default_rng([seed, 7])
  families = rng.integers(0, len(MARKER_FAMILIES), size)
  orders = rng.integers(0, 2, size)
  topics = rng.integers(0, len(TOPICS), size)
  texts = sentences(families, orders, topics, rng, min_words, max_words, ambiguous)
  return Split(Texts(texts), (2 * families + orders).astype(np.int32), topics.astype(np.int32),
               num_classes=PRETRAINING_CLASSES, num_attrs=len(TOPICS), name="pretraining")


def _sentence_args(data_config: Any) -> dict:
  return dict(min_words=data_config.min_words, max_words=data_config.max_words,
              ambiguous=data_config.ambiguous)


def splits_from_config(data_config: Any) -> dict[str, Split]:
  """{"train", "val", "test"} from a completed `config.data`: fields train_size, val_size,
  test_size, seed, class_family, min_words, max_words, ambiguous (`make_split`)."""
  sizes = {"train": data_config.train_size, "val": data_config.val_size,
           "test": data_config.test_size}
  for split, size in sizes.items():
    if size < 8:
      raise DataError(f"data.{split}_size={size} is too small; use at least 8 examples")
  family = data_config.class_family
  if not 0 <= family < len(MARKER_FAMILIES):
    raise DataError(f"data.class_family={family}; give a marker family index in "
                    f"0..{len(MARKER_FAMILIES) - 1}")
  if not 3 <= data_config.min_words <= data_config.max_words:
    raise DataError(f"data.min_words={data_config.min_words}, data.max_words="
                    f"{data_config.max_words}; give 3 <= min_words <= max_words (three content "
                    "words per sentence)")
  if not 0.0 <= data_config.ambiguous <= 1.0:
    raise DataError(f"data.ambiguous={data_config.ambiguous}; give a fraction in [0, 1]")
  return {split: make_split(split, size, data_config.seed, family,
                            **_sentence_args(data_config))
          for split, size in sizes.items()}


def pretraining_from_config(data_config: Any, size: int) -> Split:
  """The pretraining set of `size` examples for a completed `config.data`."""
  return make_pretraining_set(size, data_config.seed, **_sentence_args(data_config))
