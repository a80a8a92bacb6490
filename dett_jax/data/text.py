"""Text data sets on disk: CivilComments (WILDS), MultiNLI, and a text metadata.csv folder.

Each loader returns {"train", "val", "test"} -> `Split` whose `images` field holds a
`Texts` (single texts or sentence pairs); `Tokenize` turns them into token ids. Every
bad value is a DataError naming the file, the row (1-based data row) or line, the
column and the fix. Files must be UTF-8.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from typing import Callable, Iterator

import numpy as np
from absl import logging

from dett_jax.data.split import DataError, Split, check_splits
from dett_jax.data.tokenize import Texts

SPLITS = ("train", "val", "test")
# CivilComments' identity columns for the 4-group setup of JTT and DFR (WILDS' list).
IDENTITY_COLUMNS = ("male", "female", "LGBTQ", "christian", "muslim", "other_religions",
                    "black", "white")
# MultiNLI classes in group DRO's order, and its negation words (the spurious attribute).
MNLI_LABELS = {"contradiction": 0, "entailment": 1, "neutral": 2}
NEGATION_WORDS = frozenset({"nobody", "no", "never", "nothing"})
MNLI_FILES = {"train": "multinli_1.0_train.jsonl", "val": "multinli_1.0_dev_matched.jsonl",
              "test": "multinli_1.0_dev_mismatched.jsonl"}
CIVILCOMMENTS_FILE = "all_data_with_identities.csv"
TEXT_ATTR_COLUMN = "a"  # the text metadata.csv's default attribute column
SPLIT_VALUES = {"0": "train", "1": "val", "2": "test", "train": "train", "val": "val",
                "test": "test"}


def load_civilcomments(root: str) -> dict[str, Split]:
  """CivilComments in the WILDS layout: `root/all_data_with_identities.csv` (or the file).

  Columns used (others are ignored): `comment_text`, `split` (train / val / test),
  `toxicity` in [0, 1] and the identity columns `IDENTITY_COLUMNS` in [0, 1]. Labels
  y = toxicity >= 0.5; attribute a = any identity >= 0.5 (an empty identity cell counts
  as 0, as WILDS' NaN >= 0.5 does); groups g = 2*y + a (JTT, DFR).

  Examples:
    >>> import os, tempfile
    >>> from dett_jax.data.text import CIVILCOMMENTS_FILE, IDENTITY_COLUMNS, load_civilcomments
    >>> root = tempfile.mkdtemp()
    >>> header = "comment_text,split,toxicity," + ",".join(IDENTITY_COLUMNS)
    >>> rows = [f"ok {i},{s},{t},{a},0,0,0,0,0,0,0" for i, (s, t, a) in enumerate(
    ...     [("train", 0.9, 1), ("train", 0, 0), ("val", 0.5, 0), ("test", 0.1, 0.6)])]
    >>> _ = open(os.path.join(root, CIVILCOMMENTS_FILE), "w").write("\\n".join([header] + rows))
    >>> splits = load_civilcomments(root)
    >>> splits["train"].groups.tolist(), splits["test"].images[0]
    ([3, 0], 'ok 3')
  """
  path = root
  if os.path.isdir(root):
    path = os.path.join(root, CIVILCOMMENTS_FILE)
  if not os.path.isfile(path):
    raise DataError(f"{path} does not exist; give the WILDS civilcomments_v1.0 folder holding "
                    f"{CIVILCOMMENTS_FILE} (or the csv file itself)")
  required = ("comment_text", "split", "toxicity") + IDENTITY_COLUMNS
  texts = {name: [] for name in SPLITS}
  labels = {name: [] for name in SPLITS}
  attrs = {name: [] for name in SPLITS}
  for where, row in _csv_records(path, lambda columns: _require(path, columns, required,
                                                                 "a WILDS CivilComments csv")):
    text = row["comment_text"]
    if not text.strip():
      raise DataError(f"{where}: column comment_text is empty; fill in the comment or remove "
                      "the row")
    split = row["split"].strip()
    if split not in SPLITS:
      raise DataError(f"{where}: column split holds {split!r}; use train, val or test")
    toxicity = _fraction(row["toxicity"], where, "toxicity", empty_ok=False)
    identity = max(_fraction(row[c], where, c, empty_ok=True) for c in IDENTITY_COLUMNS)
    texts[split].append(text)
    labels[split].append(toxicity >= 0.5)
    attrs[split].append(identity >= 0.5)
  return _splits(texts, None, labels, attrs, num_classes=2, source=path)


def load_multinli(root: str) -> dict[str, Split]:
  """MultiNLI from the official `multinli_1.0/` jsonl files.

  train = `multinli_1.0_train.jsonl`, val = `multinli_1.0_dev_matched.jsonl`, test =
  `multinli_1.0_dev_mismatched.jsonl`: the official test labels are not public, and
  group DRO's own random re-split of train ships only as pickled tensors, so the two
  official dev sets serve as val and test. `root` is the folder holding the three files
  or its parent holding `multinli_1.0/`.

  Fields: `sentence1`, `sentence2`, `gold_label`. Rows whose gold_label is "-" (no
  annotator consensus; ~185 in dev_matched, ~168 in dev_mismatched, none in train) are
  skipped and counted in the log. y: contradiction 0, entailment 1, neutral 2 (group
  DRO's order); a = 1 when sentence2 holds a negation word (`NEGATION_WORDS`) as a whole
  word, case-insensitive, words being runs of letters; groups g = 2*y + a (6 groups).

  Examples:
    >>> import json, os, tempfile
    >>> from dett_jax.data.text import MNLI_FILES, load_multinli
    >>> root = tempfile.mkdtemp()
    >>> rows = [{"gold_label": g, "sentence1": "A cat sat.", "sentence2": h} for g, h in
    ...         [("entailment", "A cat sat."), ("contradiction", "No cat sat."), ("-", "Hm.")]]
    >>> for name in MNLI_FILES.values():
    ...   _ = open(os.path.join(root, name), "w").write("\\n".join(map(json.dumps, rows)))
    >>> splits = load_multinli(root)
    >>> splits["val"].labels.tolist(), splits["val"].attrs.tolist(), splits["val"].num_groups
    ([1, 0], [0, 1], 6)
  """
  folder = root
  if not os.path.isfile(os.path.join(folder, MNLI_FILES["train"])):
    folder = os.path.join(root, "multinli_1.0")
  missing = [f for f in MNLI_FILES.values() if not os.path.isfile(os.path.join(folder, f))]
  if missing:
    raise DataError(f"{root} holds no {', '.join(missing)} (looked in {root} and "
                    f"{os.path.join(root, 'multinli_1.0')}); give the folder of the official "
                    "MultiNLI 1.0 release (multinli_1.0/ with the jsonl files) or its parent")
  first, second, labels, attrs = {}, {}, {}, {}
  for split, name in MNLI_FILES.items():
    path = os.path.join(folder, name)
    first[split], second[split], labels[split], attrs[split] = [], [], [], []
    skipped = 0
    for where, record in _jsonl_records(path):
      for field in ("gold_label", "sentence1", "sentence2"):
        if field not in record:
          raise DataError(f"{where}: no field {field!r} (it has {', '.join(record) or 'none'}); "
                          "a MultiNLI line needs gold_label, sentence1 and sentence2")
      label = record["gold_label"]
      if label == "-":
        skipped += 1
        continue
      if label not in MNLI_LABELS:
        raise DataError(f"{where}: gold_label {label!r} is not one of "
                        f"{', '.join(MNLI_LABELS)} (or '-', skipped); fix or remove the line")
      for field in ("sentence1", "sentence2"):
        if not isinstance(record[field], str) or not record[field].strip():
          raise DataError(f"{where}: {field} is empty or not a string ({record[field]!r}); "
                          "fill it in or remove the line")
      first[split].append(record["sentence1"])
      second[split].append(record["sentence2"])
      labels[split].append(MNLI_LABELS[label])
      attrs[split].append(has_negation(record["sentence2"]))
    if skipped:
      logging.info("%s: skipped %d example(s) with gold_label '-' (no consensus label)",
                   path, skipped)
    if not labels[split]:
      raise DataError(f"{path} has no labelled examples ({skipped} with gold_label '-'); the "
                      f"{split} split needs some")
  return _splits(first, second, labels, attrs, num_classes=3, source=folder)


def has_negation(sentence: str) -> bool:
  """Whether `sentence` holds one of `NEGATION_WORDS` as a whole word (any case).

  Examples:
    >>> from dett_jax.data.text import has_negation
    >>> has_negation("No, nobody came."), has_negation("Nothing-else"), has_negation("Know it")
    (True, True, False)
  """
  return any(word in NEGATION_WORDS for word in re.findall(r"[^\W\d_]+", sentence.lower()))


def load_text_metadata_folder(root: str, attr_column: str = TEXT_ATTR_COLUMN,
                              num_classes: int = 0) -> dict[str, Split]:
  """The text analogue of the image metadata.csv folder: `root/metadata.csv` (or the file).

  Columns (others are ignored): `text` (or `sentence1` and `sentence2` for pairs), `y`
  (0..num_classes-1), `split` (0/1/2 as the image layout, or train/val/test) and the
  binary attribute column, `a` by default (the image layout's `place` is about images;
  any other name via `attr_column`). Groups g = 2*y + a. num_classes 0: the largest
  label + 1 (at least 2).

  Examples:
    >>> import os, tempfile
    >>> from dett_jax.data.text import load_text_metadata_folder
    >>> root = tempfile.mkdtemp()
    >>> rows = ["text,y,split,a", "good film,1,0,1", "bad film,0,train,0", "fine,1,1,0",
    ...         '"so, so bad",0,test,1']
    >>> _ = open(os.path.join(root, "metadata.csv"), "w").write("\\n".join(rows))
    >>> splits = load_text_metadata_folder(root)
    >>> splits["train"].groups.tolist(), splits["test"].images[0]
    ([3, 0], 'so, so bad')
  """
  path = os.path.join(root, "metadata.csv") if os.path.isdir(root) else root
  if not os.path.isfile(path):
    raise DataError(f"{path} does not exist; give a folder holding metadata.csv (columns text "
                    f"or sentence1 and sentence2, y, split, {attr_column})")
  pairs = False

  def choose(columns: list[str]) -> list[str]:
    nonlocal pairs
    pairs = "text" not in columns and {"sentence1", "sentence2"} <= set(columns)
    if "text" in columns and "sentence1" in columns:
      raise DataError(f"{path} has both a text and a sentence1 column; keep text (single "
                      "texts) or sentence1 and sentence2 (pairs)")
    texts = ["sentence1", "sentence2"] if pairs else ["text"]
    return _require(path, columns, texts + ["y", "split", attr_column],
                    "a text metadata.csv (text, or sentence1 and sentence2 for pairs)")

  texts = {name: [] for name in SPLITS}
  seconds = {name: [] for name in SPLITS}
  labels = {name: [] for name in SPLITS}
  attrs = {name: [] for name in SPLITS}
  for where, row in _csv_records(path, choose):
    for column in (["sentence1", "sentence2"] if pairs else ["text"]):
      if not row[column].strip():
        raise DataError(f"{where}: column {column} is empty; fill in the text or remove the "
                        "row")
    split = SPLIT_VALUES.get(row["split"].strip().lower())
    if split is None:
      raise DataError(f"{where}: column split holds {row['split']!r}; use 0 (train), 1 (val), "
                      "2 (test) or the names train, val, test")
    y = _integer(row["y"], where, "y")
    if y < 0 or (num_classes and y >= num_classes):
      top = f"0..{num_classes - 1} (num_classes)" if num_classes else "0 or more"
      raise DataError(f"{where}: label y={y} is outside {top}; fix the label"
                      f"{' or raise num_classes' if num_classes else ''}")
    a = _integer(row[attr_column], where, attr_column)
    if a not in (0, 1):
      raise DataError(f"{where}: the attribute column {attr_column} holds {a}; it must be "
                      "binary, 0 or 1")
    texts[split].append(row["sentence1"] if pairs else row["text"])
    if pairs:
      seconds[split].append(row["sentence2"])
    labels[split].append(y)
    attrs[split].append(a)
  all_labels = [y for name in SPLITS for y in labels[name]]
  if not all_labels:
    raise DataError(f"{path} has a header but no rows")
  num_classes = num_classes or max(2, max(all_labels) + 1)
  return _splits(texts, seconds if pairs else None, labels, attrs, num_classes, source=path)


def _splits(first: dict[str, list[str]], second: dict[str, list[str]] | None,
            labels: dict[str, list], attrs: dict[str, list], num_classes: int,
            source: str) -> dict[str, Split]:
  splits = {}
  for name in SPLITS:
    texts = Texts(first[name], None if second is None else second[name])
    splits[name] = Split(texts, np.asarray(labels[name], np.int32).reshape(-1),
                         np.asarray(attrs[name], np.int32).reshape(-1),
                         num_classes=num_classes, num_attrs=2, name=name)
  return check_splits(splits, source)


def _require(path: str, columns: list[str], required: tuple[str, ...] | list[str],
             layout: str) -> list[str]:
  missing = [c for c in required if c not in columns]
  if missing:
    raise DataError(f"{path} lacks the column(s) {', '.join(missing)} (it has: "
                    f"{', '.join(columns) or 'no header'}); {layout} needs "
                    f"{', '.join(required)}")
  return list(required)


def _csv_records(path: str, choose: Callable[[list[str]], list[str]]
                 ) -> Iterator[tuple[str, dict[str, str]]]:
  """Yields `(where, {column: value})` per data row of a UTF-8 csv, for the columns that
  `choose(header)` picks; `where` is "PATH row R (line L)", L the line the row starts on
  (quoted values may span lines). Blank lines are skipped."""
  csv.field_size_limit(max(csv.field_size_limit(), 1 << 26))  # long comments
  line = 0
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:  # strict: bad bytes raise
      reader = csv.reader(f)
      header = next(reader, None)
      if header is None:
        raise DataError(f"{path} is empty; it needs a header row and data rows")
      columns = [c.strip() for c in header]
      index = {c: columns.index(c) for c in choose(columns)}
      row_number, line = 0, reader.line_num
      for fields in reader:
        start, line = line + 1, reader.line_num
        if not fields:
          continue
        row_number += 1
        where = f"{path} row {row_number} (line {start})"
        if len(fields) != len(columns):
          raise DataError(f"{where} has {len(fields)} values, the header {len(columns)}; quote "
                          "values that hold commas or line breaks (\"...\", a quote inside "
                          "as \"\")")
        yield where, {c: fields[i] for c, i in index.items()}
  except UnicodeDecodeError:
    raise _utf8_error(path) from None
  except csv.Error as e:
    raise DataError(f"{path} line {line + 1}: unreadable csv ({e}); fix the quoting or remove "
                    "the line") from None


def _jsonl_records(path: str) -> Iterator[tuple[str, dict]]:
  """Yields `(where, record)` per non-blank line of a UTF-8 jsonl file ("PATH line L")."""
  offset = 0
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      where = f"{path} line {number}"
      try:
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{where} (byte {offset + e.start} of the file) is not UTF-8 "
                        f"({raw[e.start:e.start + 4]!r}); re-save the file as UTF-8") from None
      offset += len(raw)
      if not text.strip():
        continue
      try:
        record = json.loads(text)
      except json.JSONDecodeError as e:
        raise DataError(f"{where} is not JSON ({e.msg}, column {e.colno}); each line must be "
                        "one JSON object, fix or remove it") from None
      if not isinstance(record, dict):
        raise DataError(f"{where} holds a JSON {type(record).__name__}, not an object; each "
                        "line must be one JSON object with gold_label, sentence1, sentence2")
      yield where, record


def _utf8_error(path: str) -> DataError:
  """The DataError for a file that is not UTF-8, naming the first bad line and byte."""
  offset = 0
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      try:
        raw.decode("utf-8")
      except UnicodeDecodeError as e:
        return DataError(f"{path} line {number} (byte {offset + e.start} of the file) is not "
                         f"UTF-8 ({raw[e.start:e.start + 4]!r}); re-save the file as UTF-8")
      offset += len(raw)
  return DataError(f"{path} is not UTF-8; re-save it as UTF-8")


def _fraction(value: str, where: str, column: str, empty_ok: bool) -> float:
  """A value in [0, 1] (an empty cell is 0 when `empty_ok`)."""
  if empty_ok and not value.strip():
    return 0.0
  try:
    number = float(value)
  except ValueError:
    number = math.nan
  if not 0.0 <= number <= 1.0:
    raise DataError(f"{where}: column {column} holds {value!r}, not a number in [0, 1]; fix "
                    "the value or remove the row")
  return number


def _integer(value: str, where: str, column: str) -> int:
  try:
    number = float(value)
    if not number.is_integer():
      raise ValueError
    return int(number)
  except (ValueError, OverflowError):
    raise DataError(f"{where}: column {column} holds {value!r}, not an integer; give an "
                    "integer") from None


__all__ = ["CIVILCOMMENTS_FILE", "IDENTITY_COLUMNS", "MNLI_FILES", "MNLI_LABELS",
           "NEGATION_WORDS", "TEXT_ATTR_COLUMN", "has_negation", "load_civilcomments",
           "load_multinli", "load_text_metadata_folder"]
