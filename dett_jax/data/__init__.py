"""Data sets: each loader returns {"train", "val", "test"} `Split`s.

`config.data.name` picks the loader: `synthetic` (the built-in benchmark, in memory),
`synthetic_marks` (the second built-in benchmark: a small faint mark on a dominant
colour field), `metadata_csv` (a Waterbirds-layout folder: any data set with a binary
spurious attribute), or `celeba` (CSV layout or TFDS); text: `synthetic_text` (the built-in
text benchmark), `civilcomments` (WILDS CSV), `multinli` (official jsonl) and `text_csv` (a
text metadata.csv folder). `preprocess_for(config)` gives the matching image transforms
(`Preprocess`) or tokenizer (`Tokenize`). The built-in (generated) benchmarks also carry their
own unbiased pretraining task: `pretraining_set(config.data, size)`.
"""

from __future__ import annotations

from typing import Any

import functools
import os

from dett_jax.config_schema import DATA_SETS, TEXT_DATA_SETS, complete_data
from dett_jax.data import celeba, synthetic, synthetic_marks, synthetic_text, text
from dett_jax.data.images import Preprocess
from dett_jax.data.metadata_csv import load_metadata_folder
from dett_jax.data.split import DataError, Split
from dett_jax.data.tokenize import Texts, Tokenize

LOADERS = DATA_SETS  # synthetic, synthetic_marks, metadata_csv, celeba, and TEXT_DATA_SETS
# Built-in benchmarks generated in memory: data.name -> module with `splits_from_config`,
# `split_size`, `pretraining_from_config` and `PRETRAINING_CLASSES`.
GENERATED = {"synthetic": synthetic, "synthetic_marks": synthetic_marks,
             "synthetic_text": synthetic_text}


def load_splits(data_config: Any) -> dict[str, Split]:
  """Loads the train/val/test splits named by `config.data` (a ConfigDict or a dict).

  `name` picks the loader (`synthetic`, `synthetic_marks`, `metadata_csv`, `celeba`); the
  other fields are the loader's. Each data set's fields and their defaults are declared
  in `dett_jax/config_schema.py` (`data_defaults(name)`); fields left out here take those
  defaults (`config_schema.complete_data`), and an undeclared field is a ConfigError.

  Returns:
    {"train", "val", "test"} -> `Split`; the training split of the built-in benchmark is
    95% correlated (Waterbirds' group proportions), val and test are balanced per class.

  Examples:
    >>> from dett_jax import load_splits
    >>> splits = load_splits({"name": "synthetic", "image_size": 16, "train_size": 100,
    ...                       "val_size": 20, "test_size": 20})
    >>> splits["train"].images.shape, splits["train"].group_counts().tolist()
    ((100, 16, 16, 3), [74, 3, 1, 22])
  """
  data_config = complete_data(data_config)
  name = data_config.name
  if name in GENERATED:
    return generated_benchmark(name).splits_from_config(data_config)
  if name == "civilcomments":
    return text.load_civilcomments(data_config.root)
  if name == "multinli":
    return text.load_multinli(data_config.root)
  if name == "text_csv":
    return text.load_text_metadata_folder(data_config.root, attr_column=data_config.attr_column,
                                          num_classes=data_config.num_classes)
  if name == "metadata_csv":
    return load_metadata_folder(data_config.root, attr_column=data_config.attr_column,
                                num_classes=data_config.num_classes,
                                check_images=data_config.check_images)
  if name == "celeba":
    if data_config.source == "csv":
      return celeba.load_celeba_csv(data_config.root, target=data_config.target,
                                    spurious=data_config.spurious,
                                    check_images=data_config.check_images)
    if data_config.source == "tfds":
      return celeba.load_celeba_tfds(data_config.tfds_data_dir, target=data_config.target,
                                     spurious=data_config.spurious)
    raise DataError(f"data.source={data_config.source!r}; choose csv or tfds")
  raise DataError(f"unknown data.name {name!r}; choose from {', '.join(LOADERS)}")


def generated_benchmark(name: str) -> Any | None:
  """The module of the built-in benchmark `name` (see `GENERATED`), or None for data on disk."""
  return GENERATED.get(name)


def pretraining_classes(data_config: Any) -> int:
  """Number of classes of `config.data`'s pretraining task (its head is replaced before
  fine-tuning). Data on disk has none: 8, a placeholder head for a backbone that comes
  from `teacher.init`/`student.init` or starts random."""
  module = generated_benchmark(data_config.name)
  return module.PRETRAINING_CLASSES if module is not None else 8


def pretraining_set(data_config: Any, size: int) -> Split:
  """The unbiased pretraining task (`size` examples) of the built-in benchmark that
  `config.data` names: shapes x backgrounds for `synthetic`, marks x colour fields for
  `synthetic_marks`, each labelled by the core feature. Fields `config.data` lacks take
  the schema's defaults (`config_schema.complete_data`)."""
  data_config = complete_data(data_config)
  module = generated_benchmark(data_config.name)
  if module is None:
    raise DataError(f"data.name={data_config.name!r} has no built-in pretraining task; choose "
                    f"from {', '.join(GENERATED)} or set pretrain.enabled=False")
  return module.pretraining_from_config(data_config, size)


def is_text(data_config: Any) -> bool:
  """Whether `config.data` is a text data set (token inputs; see TEXT_DATA_SETS)."""
  return data_config.name in TEXT_DATA_SETS


def preprocess_for(config: Any) -> Preprocess | Tokenize:
  """How a run's examples become model inputs: `Preprocess` (images) or `Tokenize` (text,
  `tokenizer_for(config)` at `text_max_length(config.data)` tokens)."""
  if not is_text(config.data):
    return Preprocess.from_config(config.data)
  return tokenizer_for(config)


def text_max_length(data_config: Any) -> int:
  """Tokens per example of a text data set: `data.max_length` (for the built-in text
  benchmark, 0 means its longest sentence)."""
  if data_config.name == "synthetic_text" and not data_config.max_length:
    return synthetic_text.max_length(data_config.max_words)
  return int(data_config.max_length)


def tokenizer_path(config: Any) -> str:
  """The tokenizer a text run reads: `data.tokenizer`, else `teacher.init`'s folder when it
  has one, else `data.root`'s own `tokenizer.json` / `vocab.txt`; "" for the built-in
  benchmark's word-level tokenizer."""
  data = config.data
  if data.tokenizer:
    return data.tokenizer
  if data.name == "synthetic_text":
    return ""
  for folder in (config.teacher.init, data.root):
    if folder and any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
      return folder
  raise DataError(f"data.name={data.name}: no tokenizer: give data.tokenizer (a Hugging Face "
                  f"folder or file: {', '.join(TOKENIZER_FILES)}), or a teacher.init folder "
                  f"or data.root holding one (looked in {config.teacher.init or '-'} and "
                  f"{data.root or '-'})")


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def tokenizer_for(config: Any) -> Tokenize:
  """The run's `Tokenize` (see `tokenizer_path`); one per path and length in a process."""
  return _tokenize(tokenizer_path(config), text_max_length(config.data),
                   bool(config.data.lowercase))


@functools.lru_cache(maxsize=8)
def _tokenize(path: str, max_length: int, lowercase: bool) -> Tokenize:
  if not path:
    return Tokenize(synthetic_text.tokenizer(), max_length)
  return Tokenize.from_path(path, max_length, lowercase=lowercase)


def vocab_size(config: Any) -> int:
  """The vocabulary size of a text run's tokenizer (the text encoders' embedding rows)."""
  return tokenizer_for(config).vocab_size


__all__ = ["DataError", "GENERATED", "LOADERS", "Preprocess", "Split", "Texts", "Tokenize",
           "generated_benchmark", "is_text", "load_splits", "preprocess_for", "pretraining_classes",
           "pretraining_set", "text_max_length", "tokenizer_for", "vocab_size"]
