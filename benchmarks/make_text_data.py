"""Writes a small biased text data set in a real on-disk layout (CivilComments, MultiNLI, text csv).

  python benchmarks/make_text_data.py --kind civilcomments --out runs/civil --size 600
  python benchmarks/make_text_data.py --kind multinli --out runs/mnli --size 900 --seed 1
  python benchmarks/make_text_data.py --kind text_csv --out runs/texts --size 400 --pairs

The label depends on a few core words; the spurious attribute (an identity mention, a
negation word in the hypothesis, a topic word) agrees with the label's usual partner in
~90% of training examples and ~50% in val and test; every group occurs in every split
(60% train, 20% val, 20% test). The folder also gets a `vocab.txt` of its words, so the
`:cpu` configs tokenise it without a downloaded tokenizer. The `make_*` functions write
given rows in each layout (tests use them with hand-written rows, including bad ones).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dett_jax.data.text import (CIVILCOMMENTS_FILE, IDENTITY_COLUMNS, MNLI_FILES,  # noqa: E402
                                TEXT_ATTR_COLUMN)

# WILDS' all_data_with_identities.csv columns (a leading unnamed pandas index, then these).
CIVILCOMMENTS_COLUMNS = (
    ["", "id", "comment_text", "split", "created_date", "publication_id", "parent_id",
     "article_id", "rating", "funny", "wow", "sad", "likes", "disagree", "toxicity",
     "severe_toxicity", "obscene", "sexual_explicit", "identity_attack", "insult", "threat",
     "transgender", "other_gender", "heterosexual", "homosexual_gay_or_lesbian", "bisexual",
     "jewish", "hindu", "buddhist", "atheist", "asian", "latino"]
    + list(IDENTITY_COLUMNS) + ["identity_any", "y"])
IDENTITY_WORDS = {"male": "men", "female": "women", "LGBTQ": "gay", "christian": "christian",
                  "muslim": "muslim", "other_religions": "buddhist", "black": "black",
                  "white": "white"}
FILLER = ("the city council plan people really think about this vote week tax road school "
          "money article paper today new local story").split()
MNLI_NAMES = {0: "contradiction", 1: "entailment", 2: "neutral"}


def make_civilcomments_csv(folder: str, rows: list[dict]) -> str:
  """Writes `folder/all_data_with_identities.csv` (WILDS' columns); returns its path.

  Each row gives `comment_text`, `split`, `toxicity` and any identity columns (absent
  columns are written as 0.0); values are written as given (str()), so bad ones can be
  tested.
  """
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, CIVILCOMMENTS_FILE)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(CIVILCOMMENTS_COLUMNS)
    for i, row in enumerate(rows):
      values = {column: 0.0 for column in CIVILCOMMENTS_COLUMNS}
      values.update({"": i, "id": 239000 + i, "created_date": "2017-03-01 10:00:00+00",
                     "rating": "approved", "publication_id": 21, "parent_id": "",
                     "article_id": 320000 + i})
      values.update(row)
      if "identity_any" not in row:
        values["identity_any"] = int(max(_number(values[c]) for c in IDENTITY_COLUMNS) >= 0.5)
      if "y" not in row:
        values["y"] = int(_number(values["toxicity"]) >= 0.5)
      writer.writerow([values[c] for c in CIVILCOMMENTS_COLUMNS])
  return path


def _number(value) -> float:
  try:
    return float(value)
  except ValueError:
    return 0.0


def make_multinli_jsonl(folder: str, rows: list[dict]) -> str:
  """Writes `folder/multinli_1.0/` with the three official jsonl files; returns that folder.

  Each row gives `split` (train / val / test: train, dev_matched, dev_mismatched),
  `gold_label`, `sentence1` and `sentence2`; the other official fields are filled in.
  """
  out = os.path.join(folder, "multinli_1.0")
  os.makedirs(out, exist_ok=True)
  lines = {split: [] for split in MNLI_FILES}
  for i, row in enumerate(rows):
    record = {"annotator_labels": [row.get("gold_label", "neutral")], "genre": "fiction",
              "pairID": f"{i}e", "promptID": str(i), "sentence1_binary_parse": "( )",
              "sentence1_parse": "(ROOT)", "sentence2_binary_parse": "( )",
              "sentence2_parse": "(ROOT)"}
    record.update({k: v for k, v in row.items() if k != "split"})
    lines[row["split"]].append(json.dumps(record))
  for split, name in MNLI_FILES.items():
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in lines[split]))
  return out


def make_text_metadata(folder: str, rows: list[dict], pairs: bool = False) -> str:
  """Writes `folder/metadata.csv` (columns text or sentence1, sentence2; y; split; a);
  returns its path. Each row gives those values (split as 0/1/2 or a name)."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, "metadata.csv")
  columns = (["id"] + (["sentence1", "sentence2"] if pairs else ["text"])
             + ["y", "split", TEXT_ATTR_COLUMN])
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for i, row in enumerate(rows):
      writer.writerow([i] + [row[c] for c in columns[1:]])
  return path


def group_plan(size: int, num_classes: int, partner, seed: int,
               correlation: float = 0.9) -> list[tuple[str, int, int]]:
  """`(split, y, a)` per example: 60/20/20% train/val/test, classes balanced, the
  attribute equal to `partner(y)` with probability `correlation` in train and 1/2 in val
  and test, and at least one example of every group in every split."""
  rng = np.random.default_rng(seed)
  if size < 3 * 2 * num_classes * 2:
    raise ValueError(f"--size {size} is too small; give at least {12 * num_classes} so "
                     "every group appears in every split")
  plan = []
  sizes = {"train": size - 2 * (size // 5), "val": size // 5, "test": size // 5}
  for split, n in sizes.items():
    share = correlation if split == "train" else 0.5
    for y in range(num_classes):
      n_class = n // num_classes + (y < n % num_classes)
      n_major = min(n_class - 1, max(1, int(round(share * n_class))))
      for k in range(n_class):
        a = partner(y) if k < n_major else 1 - partner(y)
        plan.append((split, y, a))
  order = rng.permutation(len(plan))
  return [plan[i] for i in order]


def _words(rng: np.random.Generator, n: int) -> list[str]:
  return [FILLER[i] for i in rng.integers(0, len(FILLER), n)]


def civilcomments_rows(size: int, seed: int) -> list[dict]:
  """Comments: toxic ones hold an insult, others a friendly word; the attribute (an
  identity mention) mostly goes with toxicity in train. Some comments span lines."""
  rng = np.random.default_rng(seed + 1)
  toxic = ("idiot", "stupid", "pathetic", "moron", "disgusting")
  friendly = ("thanks", "agree", "helpful", "interesting", "welcome")
  rows = []
  for split, y, a in group_plan(size, 2, lambda y: y, seed):
    words = _words(rng, int(rng.integers(5, 12)))
    words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(toxic if y else friendly)))
    identities = {c: 0.0 for c in IDENTITY_COLUMNS}
    column = IDENTITY_COLUMNS[int(rng.integers(0, len(IDENTITY_COLUMNS)))]
    if a:
      words.insert(int(rng.integers(0, len(words) + 1)), IDENTITY_WORDS[column])
      identities[column] = round(float(rng.uniform(0.5, 1.0)), 6)
    else:  # below the threshold: annotated by few raters
      identities[column] = round(float(rng.uniform(0.0, 0.4)), 6)
    text = " ".join(words).capitalize() + "."
    if rng.random() < 0.1:  # quotes, commas and a line break, as real comments have
      text += '\n"Really," she said, "really."'
    toxicity = rng.uniform(0.5, 1.0) if y else rng.uniform(0.0, 0.45)
    rows.append({"comment_text": text, "split": split, "toxicity": round(float(toxicity), 6),
                 **identities, "y": y})
  return rows


def multinli_rows(size: int, seed: int) -> list[dict]:
  """Premise/hypothesis pairs: the relation word decides the label; a negation word in
  the hypothesis (the attribute) mostly goes with contradiction in train. Val and test
  also hold a few gold_label "-" rows (skipped by the loader, as the official files)."""
  rng = np.random.default_rng(seed + 2)
  subjects = ("The man", "A woman", "The children", "Two dogs", "The old farmer", "A student")
  places = ("in the park", "at the station", "near the river", "in the kitchen", "downtown")
  relation = {0: ("left", "abandoned", "fled"), 1: ("stayed", "remained", "waited"),
              2: ("probably", "perhaps", "maybe")}
  negations = ("No doubt", "Never mind", "Nobody knows why", "Nothing changed")
  rows = []
  for split, y, a in group_plan(size, 3, lambda y: int(y == 0), seed):
    subject, place = rng.choice(subjects), rng.choice(places)
    premise = f"{subject} waited {place} for {rng.choice(FILLER)} {rng.choice(FILLER)}."
    word = rng.choice(relation[y])
    hypothesis = (f"{subject} {word} rested {place}." if y == 2 else
                  f"{subject} {word} {place}.")
    if a:
      hypothesis = f"{rng.choice(negations)}, {hypothesis[0].lower()}{hypothesis[1:]}"
    rows.append({"split": split, "gold_label": MNLI_NAMES[y], "sentence1": premise,
                 "sentence2": hypothesis})
    if split != "train" and rng.random() < 0.02:
      rows.append({"split": split, "gold_label": "-", "sentence1": premise,
                   "sentence2": f"{subject} was {place}."})
  return rows


def text_metadata_rows(size: int, seed: int, pairs: bool = False) -> list[dict]:
  """Short film reviews (pairs: a question and the review): sentiment words decide the
  label, a topic word ("sequel") is the attribute, mostly with positive reviews in train."""
  rng = np.random.default_rng(seed + 3)
  positive, negative = ("great", "wonderful", "moving", "superb"), ("boring", "awful", "dull")
  codes = {"train": 0, "val": 1, "test": 2}
  rows = []
  for split, y, a in group_plan(size, 2, lambda y: y, seed):
    review = (f"The {'sequel' if a else 'film'} was {rng.choice(positive if y else negative)}"
              f" and {' '.join(_words(rng, 4))}.")
    row = {"y": y, "split": codes[split], TEXT_ATTR_COLUMN: a}
    if pairs:
      row.update(sentence1=f"What did you think of the {rng.choice(FILLER)}?", sentence2=review)
    else:
      row["text"] = review
    rows.append(row)
  return rows


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_vocab(folder: str, rows: list[dict]) -> str:
  """Writes `folder/vocab.txt`: a BERT WordPiece vocabulary (special tokens, then every
  lower-cased word and punctuation mark of the rows' texts), so the folder carries its
  own tokenizer (`data.tokenizer` empty: dett-jax reads `data.root`'s vocab.txt)."""
  words = set()
  for row in rows:
    for key in ("comment_text", "text", "sentence1", "sentence2"):
      if isinstance(row.get(key), str):
        words.update(re.findall(r"\w+|[^\w\s]", row[key].lower()))  # as BERT splits
  path = os.path.join(folder, "vocab.txt")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join([*SPECIAL_TOKENS, *sorted(words)]) + "\n")
  return path


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kind", required=True, choices=("civilcomments", "multinli", "text_csv"))
  parser.add_argument("--out", required=True, help="folder to write (its data file must not exist)")
  parser.add_argument("--size", type=int, default=600, help="examples over all splits")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--pairs", action="store_true", help="text_csv: sentence pairs")
  args = parser.parse_args(argv)
  target = {"civilcomments": CIVILCOMMENTS_FILE, "multinli": "multinli_1.0",
            "text_csv": "metadata.csv"}[args.kind]
  if os.path.exists(os.path.join(args.out, target)):
    raise SystemExit(f"{os.path.join(args.out, target)} exists; choose a new --out")
  if args.kind == "civilcomments":
    rows = civilcomments_rows(args.size, args.seed)
    path = make_civilcomments_csv(args.out, rows)
  elif args.kind == "multinli":
    rows = multinli_rows(args.size, args.seed)
    path = make_multinli_jsonl(args.out, rows)
  else:
    rows = text_metadata_rows(args.size, args.seed, args.pairs)
    path = make_text_metadata(args.out, rows, pairs=args.pairs)
  write_vocab(args.out, rows)
  print(f"wrote {args.kind} ({args.size} examples) to {path}, and its vocab.txt")


if __name__ == "__main__":
  main()
