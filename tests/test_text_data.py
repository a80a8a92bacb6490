"""Text data: CivilComments / MultiNLI / text metadata.csv loaders, `Texts`, `Tokenize`."""

from __future__ import annotations

import doctest
import json
import os
import pickle
import sys

import numpy as np
import pytest

from dett_jax.data import text, tokenize
from dett_jax.data.split import DataError, Split
from dett_jax.data.text import (IDENTITY_COLUMNS, MNLI_FILES, load_civilcomments, load_multinli,
                                load_text_metadata_folder)
from dett_jax.data.tokenize import Texts, Tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import make_text_data  # noqa: E402
from make_text_data import (make_civilcomments_csv, make_multinli_jsonl,  # noqa: E402
                            make_text_metadata)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "man", "dog", "runs", "run",
         "no", "never", "park", "in", "is", "sleep", "##s", "##ing", ".", ",", "'", "cafe",
         "un", "##believ", "##able", "!"]


def civil_rows() -> list[dict]:
  """Two per group in train, one per split of each (y, a) elsewhere; row 2 spans lines."""
  rows = []
  for split, copies in (("train", 2), ("val", 1), ("test", 1)):
    for y in (0, 1):
      for a in (0, 1):
        for k in range(copies):
          identity = {IDENTITY_COLUMNS[(y + a + k) % 8]: 0.5 if a else 0.49}
          rows.append({"comment_text": f"{split} comment y{y} a{a} #{k}", "split": split,
                       "toxicity": 0.5 if y else 0.4999, **identity})
  rows[1]["comment_text"] = 'First line, "quoted"\nsecond line'
  return rows


def mnli_rows() -> list[dict]:
  hypotheses = {0: ["Nobody's here.", "It rains."], 1: ["NEVER again!", "They know it."],
                2: ["Nothing-else matters.", "Don't know, a knot."]}
  rows = []
  for split in ("train", "val", "test"):
    for label, name in ((0, "contradiction"), (1, "entailment"), (2, "neutral")):
      for hypothesis in hypotheses[label]:
        rows.append({"split": split, "gold_label": name, "sentence1": f"{split} premise.",
                     "sentence2": hypothesis})
    rows.append({"split": split, "gold_label": "-", "sentence1": "x.", "sentence2": "y."})
  return rows


def metadata_rows(pairs: bool = False) -> list[dict]:
  rows = []
  for split in (0, "val", "2"):
    for y in (0, 1, 2):
      for a in (0, 1):
        row = {"y": y, "split": split, "a": a}
        if pairs:
          row.update(sentence1=f"q {y}{a}", sentence2=f"answer {y}{a}")
        else:
          row["text"] = f"text {y}{a}, with a comma"
        rows.append(row)
  return rows


# ---------------------------------------------------------------- loaders on good data

def test_civilcomments_labels_attributes_and_multiline(tmp_path):
  path = make_civilcomments_csv(str(tmp_path), civil_rows())
  for root in (str(tmp_path), path):
    splits = load_civilcomments(root)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [8, 4, 4]
    train = splits["train"]
    assert train.groups.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert train.images[1] == 'First line, "quoted"\nsecond line'
    assert splits["test"].group_counts().tolist() == [1, 1, 1, 1]
    assert train.labels.dtype.kind == "i" and isinstance(train.images, Texts)
    assert not train.images.is_pair


def test_civilcomments_empty_identity_cell_counts_as_zero(tmp_path):
  rows = civil_rows()
  rows[0]["male"] = ""  # row 1 is group (0, 0)
  splits = load_civilcomments(make_civilcomments_csv(str(tmp_path), rows))
  assert splits["train"].attrs[0] == 0


def test_multinli_labels_negation_and_skipped_rows(tmp_path):
  folder = make_multinli_jsonl(str(tmp_path), mnli_rows())
  for root in (str(tmp_path), folder):
    splits = load_multinli(root)
    for split in splits.values():
      assert len(split) == 6 and split.num_classes == 3 and split.num_groups == 6
      assert split.labels.tolist() == [0, 0, 1, 1, 2, 2]
      assert split.attrs.tolist() == [1, 0, 1, 0, 1, 0]
      assert split.group_counts().tolist() == [1] * 6
    assert splits["val"].images[0] == ("val premise.", "Nobody's here.")


def test_text_metadata_single_and_pairs(tmp_path):
  splits = load_text_metadata_folder(make_text_metadata(str(tmp_path / "one"), metadata_rows()))
  assert splits["train"].num_classes == 3 and splits["val"].images[0] == "text 00, with a comma"
  assert splits["test"].groups.tolist() == [0, 1, 2, 3, 4, 5]
  path = make_text_metadata(str(tmp_path / "two"), metadata_rows(pairs=True), pairs=True)
  splits = load_text_metadata_folder(os.path.dirname(path), num_classes=4)
  assert splits["train"].num_classes == 4 and splits["train"].images[5] == ("q 21", "answer 21")
  lines = open(path).read().replace(",a\n", ",topic\n", 1)
  open(path, "w").write(lines)
  assert len(load_text_metadata_folder(path, attr_column="topic")["val"]) == 6


@pytest.mark.parametrize("kind", ["civilcomments", "multinli", "text_csv", "pairs"])
def test_generated_data_sets_are_biased_with_every_group_everywhere(tmp_path, kind, capsys):
  argv = ["--kind", "text_csv" if kind == "pairs" else kind, "--out", str(tmp_path),
          "--size", "240", "--seed", "3"] + (["--pairs"] if kind == "pairs" else [])
  make_text_data.main(argv)
  assert "wrote" in capsys.readouterr().out
  loader = {"civilcomments": load_civilcomments, "multinli": load_multinli}.get(
      kind, load_text_metadata_folder)
  splits = loader(str(tmp_path))
  assert sum(map(len, splits.values())) == 240
  for split in splits.values():
    assert (split.group_counts() > 0).all(), split.name
  train = splits["train"]
  partner = (train.labels == 0) if kind == "multinli" else train.labels
  assert 0.85 <= np.mean(train.attrs == partner) <= 0.95
  assert 0.4 <= np.mean(splits["test"].attrs == (splits["test"].labels == 0
                                                  if kind == "multinli" else
                                                  splits["test"].labels)) <= 0.6
  with pytest.raises(SystemExit, match="exists"):
    make_text_data.main(argv)


# ---------------------------------------------------------------- Texts and Tokenize

@pytest.fixture
def vocab_dir(tmp_path):
  folder = tmp_path / "bert"
  folder.mkdir()
  (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  return str(folder)


def test_texts_in_a_split():
  texts = Texts(["a", "b", "c"], ["x", "y", "z"])
  split = Split(texts, labels=np.array([0, 1, 1]), attrs=np.array([1, 0, 1]), name="train")
  assert len(split) == 3 and split.images[2] == ("c", "z")
  assert texts.subset([2, 0])[1] == ("a", "x") and list(Texts(["q"])) == ["q"]
  with pytest.raises(ValueError, match="one second sentence per first"):
    Texts(["a"], ["x", "y"])


def test_tokenize_single_pair_padding_truncation_and_pickle(vocab_dir):
  tokenize = Tokenize.from_path(vocab_dir, max_length=8)
  ids = {w: i for i, w in enumerate(VOCAB)}
  single = tokenize.eval("The DOG runs")
  assert single.dtype == np.int32 and single.shape == (3, 8)
  assert single[0].tolist() == [2, ids["the"], ids["dog"], ids["runs"], 3, 0, 0, 0]
  assert single[1].tolist() == [0] * 8 and single[2].tolist() == [1] * 5 + [0] * 3
  pair = tokenize.eval(("a man", "sleeps"))
  assert pair[0].tolist() == [2, ids["a"], ids["man"], 3, ids["sleep"], ids["##s"], 3, 0]
  assert pair[1].tolist() == [0, 0, 0, 0, 1, 1, 1, 0]
  long = tokenize.eval(("the man runs in the park", "no"))  # longest first: a shrinks
  assert long[0].tolist() == [2, 5, 7, 9, 14, 3, ids["no"], 3] and long[2].all()
  assert (tokenize.train("the dog", np.random.default_rng(0)) == tokenize.eval("the dog")).all()
  batch = tokenize.encode_batch(["the dog", ("a man", "sleeps")])
  assert batch.shape == (2, 3, 8) and (batch[1] == pair).all()
  assert (tokenize.normalize(batch) == batch).all() and tokenize.key == "tokens"
  assert tokenize.vocab_size == len(VOCAB)
  restored = pickle.loads(pickle.dumps(tokenize))
  assert (restored.eval(("a man", "sleeps")) == pair).all()


def test_tokenize_prefers_tokenizer_json_and_ignores_its_settings(vocab_dir, tmp_path):
  reference = Tokenize.from_path(os.path.join(vocab_dir, "vocab.txt"), max_length=6)
  from tokenizers.implementations import BertWordPieceTokenizer
  saved = BertWordPieceTokenizer(os.path.join(vocab_dir, "vocab.txt"))._tokenizer
  saved.enable_padding(length=40, pad_id=4)  # a json's own padding must not matter
  saved.save(os.path.join(vocab_dir, "tokenizer.json"))
  from_json = Tokenize.from_path(vocab_dir, max_length=6)
  for example in ("the man runs in the park", ("no", "never")):
    assert (from_json.eval(example) == reference.eval(example)).all()
  assert saved.padding["length"] == 40  # the caller's tokenizer is not changed
  Tokenize(saved, max_length=6)
  assert saved.padding["length"] == 40


def test_tokenize_matches_transformers_bert_tokenizer(vocab_dir):
  transformers = pytest.importorskip("transformers")
  reference = transformers.BertTokenizerFast.from_pretrained(vocab_dir, do_lower_case=True)
  assert len(reference.get_vocab()) == len(VOCAB)
  examples = [("The man runs in the park.", None), ("A DOG, sleeping", "no man runs!"),
              ("Café unbelievable!", "the dog never runs in the park, the man runs."),
              ("the the the the the the the the the the the", "a"), ("x y z", "the")]
  for max_length in (6, 9, 16):
    tokenize = Tokenize.from_path(vocab_dir, max_length=max_length)
    for first, second in examples:
      want = reference(first, second, max_length=max_length, padding="max_length",
                       truncation=True)
      got = tokenize.eval(first if second is None else (first, second))
      assert got[0].tolist() == want["input_ids"], (first, second, max_length)
      assert got[1].tolist() == want["token_type_ids"]
      assert got[2].tolist() == want["attention_mask"]


def test_tokenize_errors(tmp_path, vocab_dir):
  with pytest.raises(DataError, match="neither tokenizer.json nor vocab.txt"):
    Tokenize.from_path(str(tmp_path), 8)
  with pytest.raises(DataError, match="does not exist"):
    Tokenize.from_path(str(tmp_path / "nope.txt"), 8)
  with pytest.raises(DataError, match=r"no '<s>' \(cls_token\)"):
    Tokenize.from_path(vocab_dir, 8, cls_token="<s>")
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(DataError, match="not a readable tokenizer"):
    Tokenize.from_path(str(tmp_path), 8)
  with pytest.raises(ValueError, match="at least 4"):
    Tokenize.from_path(vocab_dir, 3)


def test_public_doctests():
  finder = doctest.DocTestFinder(recurse=False)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  attempted = 0
  for module in (text, tokenize):
    for name in module.__all__:
      for test in finder.find(getattr(module, name), name, globs={}):
        attempted += runner.run(test).attempted
  assert runner.failures == 0 and attempted >= 30


# ---------------------------------------------------------------- bad input

def _civil(tmp_path, edit):
  rows = civil_rows()
  edit(rows)
  return make_civilcomments_csv(str(tmp_path), rows)


@pytest.mark.parametrize("edit, match", [
    (lambda r: r[2].update(comment_text="  "), r"row 3 \(line 5\): column comment_text is empty"),
    (lambda r: r[3].update(split="validation"), r"row 4 \(line 6\): column split holds "
                                                r"'validation'; use train, val or test"),
    (lambda r: r[0].update(toxicity=1.5), r"row 1 \(line 2\): column toxicity holds '1.5'"),
    (lambda r: r[0].update(toxicity=""), r"row 1 \(line 2\): column toxicity holds ''"),
    (lambda r: r[4].update(muslim="lots"), r"row 5 \(line 7\): column muslim holds 'lots', "
                                           r"not a number in \[0, 1\]"),
    (lambda r: r[4].update(black="nan"), r"row 5 \(line 7\): column black"),
    (lambda r: [x.update(split="train") for x in r if x["split"] == "test"],
     "the test split has no examples"),
])
def test_civilcomments_bad_values(tmp_path, edit, match):
  with pytest.raises(DataError, match=match):
    load_civilcomments(_civil(tmp_path, edit))


def test_civilcomments_bad_files(tmp_path):
  with pytest.raises(DataError, match="all_data_with_identities.csv does not exist"):
    load_civilcomments(str(tmp_path))
  path = _civil(tmp_path, lambda r: None)
  lines = open(path, encoding="utf-8").read().split("\n")
  header = lines[0].split(",")
  open(path, "w").write("\n".join([",".join(c for c in header if c != "toxicity")] + lines[1:]))
  with pytest.raises(DataError, match=r"lacks the column\(s\) toxicity \(it has: , id, "):
    load_civilcomments(path)
  open(path, "w").write("\n".join(lines[:4] + ["1,2,3"] + lines[4:]))
  with pytest.raises(DataError, match=r"row 3 \(line 5\) has 3 values, the header"):
    load_civilcomments(path)
  data = "\n".join(lines).encode()
  at = data.index(b"train comment y1")
  open(path, "wb").write(data[:at] + b"\xff\xfe" + data[at:])
  line = data[:at].count(b"\n") + 1
  with pytest.raises(DataError, match=rf"line {line} \(byte {at} of the file\) is not UTF-8"):
    load_civilcomments(path)
  open(path, "w").write("")
  with pytest.raises(DataError, match="is empty"):
    load_civilcomments(path)


def _mnli_files(tmp_path) -> str:
  return make_multinli_jsonl(str(tmp_path), mnli_rows())


def _edit_line(path: str, number: int, new: bytes) -> None:
  lines = open(path, "rb").read().split(b"\n")
  lines[number - 1] = new
  open(path, "wb").write(b"\n".join(lines))


@pytest.mark.parametrize("line, match", [
    (b'{"gold_label": "neutral", "sentence1": "a"', r"dev_matched.jsonl line 3 is not JSON"),
    (b'["neutral", "a", "b"]', r"line 3 holds a JSON list, not an object"),
    (b'{"gold_label": "unsure", "sentence1": "a", "sentence2": "b"}',
     r"line 3: gold_label 'unsure' is not one of contradiction, entailment, neutral"),
    (b'{"gold_label": "neutral", "sentence1": "a"}',
     r"line 3: no field 'sentence2' \(it has gold_label, sentence1\)"),
    (b'{"gold_label": "neutral", "sentence1": "a", "sentence2": " "}',
     r"line 3: sentence2 is empty"),
    (b'{"gold_label": "neutral", "sentence1": null, "sentence2": "b"}',
     r"line 3: sentence1 is empty or not a string \(None\)"),
    (b'{"gold_label": "neutral", "sentence1": "caf\xe9", "sentence2": "b"}',
     r"line 3 \(byte \d+ of the file\) is not UTF-8"),
])
def test_multinli_bad_lines(tmp_path, line, match):
  folder = _mnli_files(tmp_path)
  _edit_line(os.path.join(folder, MNLI_FILES["val"]), 3, line)
  with pytest.raises(DataError, match=match):
    load_multinli(str(tmp_path))


def test_multinli_bad_files(tmp_path):
  with pytest.raises(DataError, match="holds no multinli_1.0_train.jsonl, "):
    load_multinli(str(tmp_path))
  folder = _mnli_files(tmp_path)
  os.remove(os.path.join(folder, MNLI_FILES["test"]))
  with pytest.raises(DataError, match="holds no multinli_1.0_dev_mismatched.jsonl "):
    load_multinli(str(tmp_path))
  with open(os.path.join(folder, MNLI_FILES["test"]), "w") as f:
    f.write(json.dumps({"gold_label": "-", "sentence1": "a", "sentence2": "b"}) + "\n")
  with pytest.raises(DataError, match=r"dev_mismatched.jsonl has no labelled examples \(1 "
                                      r"with gold_label '-'\); the test split needs some"):
    load_multinli(str(tmp_path))


@pytest.mark.parametrize("edit, match", [
    (lambda r: r[1].update(text=""), r"row 2 \(line 3\): column text is empty"),
    (lambda r: r[2].update(y="1.5"), r"row 3 \(line 4\): column y holds '1.5', not an integer"),
    (lambda r: r[2].update(y="one"), r"row 3 \(line 4\): column y holds 'one'"),
    (lambda r: r[3].update(y=-1), r"row 4 \(line 5\): label y=-1 is outside 0 or more"),
    (lambda r: r[4].update(a=2), r"row 5 \(line 6\): the attribute column a holds 2; it must "
                                 "be binary"),
    (lambda r: r[5].update(split=5), r"row 6 \(line 7\): column split holds '5'; use 0 "
                                     r"\(train\), 1 \(val\), 2 \(test\)"),
    (lambda r: r[5].update(split="valid"), r"row 6 \(line 7\): column split holds 'valid'"),
    (lambda r: [x.update(split=0) for x in r if x["split"] == "val"],
     "metadata.csv: the val split has no examples"),
])
def test_text_metadata_bad_values(tmp_path, edit, match):
  rows = metadata_rows()
  edit(rows)
  with pytest.raises(DataError, match=match):
    load_text_metadata_folder(make_text_metadata(str(tmp_path), rows))


def test_text_metadata_bad_files(tmp_path):
  with pytest.raises(DataError, match="metadata.csv does not exist"):
    load_text_metadata_folder(str(tmp_path))
  path = make_text_metadata(str(tmp_path), metadata_rows())
  with pytest.raises(DataError, match=r"row 5 \(line 6\): label y=2 is outside 0..1 "
                                      r"\(num_classes\); fix the label or raise num_classes"):
    load_text_metadata_folder(str(tmp_path), num_classes=2)
  with pytest.raises(DataError, match=r"lacks the column\(s\) place \(it has: id, text, y, "
                                      r"split, a\)"):
    load_text_metadata_folder(str(tmp_path), attr_column="place")
  pairs = make_text_metadata(str(tmp_path / "pairs"), metadata_rows(pairs=True), pairs=True)
  rows = open(pairs).read().split("\n")
  open(pairs, "w").write("\n".join([rows[0].replace("sentence2", "answer")] + rows[1:]))
  with pytest.raises(DataError, match=r"lacks the column\(s\) text \(it has: id, sentence1, "
                                      "answer, y, split, a\\); a text metadata.csv"):
    load_text_metadata_folder(pairs)
  open(pairs, "w").write("\n".join([rows[0].replace("sentence2", "text")] + rows[1:]))
  with pytest.raises(DataError, match="both a text and a sentence1 column"):
    load_text_metadata_folder(pairs)
  _edit_line(path, 4, b"3,t\xc3\x28xt,1,0,1")
  with pytest.raises(DataError, match=r"metadata.csv line 4 \(byte \d+ of the file\) is not "
                                      r"UTF-8 \(b'\\xc3\(xt"):
    load_text_metadata_folder(str(tmp_path))
  open(path, "w").write("id,text,y,split,a\n")
  with pytest.raises(DataError, match="has a header but no rows"):
    load_text_metadata_folder(path)
  open(path, "w").write('id,text,y,split,a\n1,"unclosed,0,0,0\n')
  with pytest.raises(DataError, match=r"row 1 \(line 2\) has 2 values|unreadable csv"):
    load_text_metadata_folder(path)
