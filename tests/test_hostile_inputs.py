"""Hostile and malformed inputs: each gets a DataError (or CLI line) naming the problem,
where it is, and the fix; property-based tests over the metadata parser and group metrics."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dett_jax import metrics, report
from dett_jax.data.celeba import load_celeba_csv
from dett_jax.data.images import TfdsImages, decode_file
from dett_jax.data.metadata_csv import read_metadata
from dett_jax.data.split import DataError, Split, check_splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def images(n: int = 6, dtype=np.float32) -> np.ndarray:
  return np.full((n, 4, 4, 3), 100, dtype)


def labels(n: int = 6) -> np.ndarray:
  return np.arange(n, dtype=np.int32) % 2


# ---------------------------------------------------------------------------
# 1, 2. In-memory images: non-finite pixels, wrong rank or channels.
# ---------------------------------------------------------------------------

def test_nan_or_infinite_pixels_are_refused_with_split_index_and_count():
  x = images(8)
  x[2, 1, 1, 0] = np.nan
  x[5, 0, 0, 2] = -np.inf
  with pytest.raises(DataError, match=r"the train split: 2 image\(s\) hold NaN or infinite "
                     r"pixel values, the first is example 2; fix or drop"):
    Split(x, labels(8), labels(8), name="train")
  with pytest.raises(DataError, match="a Split: 1 image"):
    Split(x[3:], labels(5), labels(5))
  Split(x[3:5], labels(2), labels(2))  # finite float images are fine
  Split(images(4, np.uint8), labels(4), labels(4))


@pytest.mark.parametrize("shape, fix", [
    ((6, 4, 4), "grayscale images must be repeated to 3 channels"),
    ((6, 4, 4, 1), "grayscale images must be repeated to 3 channels"),
    ((6, 4, 4, 4), r"drop the alpha channel: images\[..., :3\]"),
    ((6, 3, 4, 4), "move channels last"),
    ((6, 4, 4, 2), r"give RGB images, shape \[n, h, w, 3\]"),
])
def test_wrong_image_rank_or_channels_are_refused(shape, fix):
  with pytest.raises(DataError, match=rf"the val split: images have shape \({shape[0]}.*; {fix}"):
    Split(np.zeros(shape, np.uint8), labels(), labels(), name="val")


def test_grayscale_palette_rgba_and_16_bit_files_decode_to_rgb(tmp_path):
  gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
  files = {
      "l.png": Image.fromarray(gray, "L"), "l.jpg": Image.fromarray(gray, "L"),
      "rgba.png": Image.fromarray(np.dstack([gray] * 3 + [np.zeros_like(gray)]), "RGBA"),
      "la.png": Image.fromarray(np.dstack([gray, gray]), "LA"),
      "p.png": Image.fromarray(gray, "L").convert("P"),
      "cmyk.jpg": Image.fromarray(np.dstack([gray] * 3), "RGB").convert("CMYK"),
      "i16.png": Image.fromarray(gray.astype(np.uint16) * 257),  # PIL's own convert clips it
  }
  for name, image in files.items():
    image.save(tmp_path / name)
    out = decode_file(str(tmp_path / name))
    assert out.shape == (12, 10, 3) and out.dtype == np.uint8, name
    tolerance = 3 if name.endswith(".jpg") else 0
    np.testing.assert_allclose(out[..., 1], gray, atol=tolerance, err_msg=name)


def test_tfds_grayscale_and_rgba_examples_become_rgb():
  source = [{"image": np.full((5, 4, 1), 7, np.uint8)}, {"image": np.full((5, 4, 4), 9, np.uint8)},
            {"image": np.zeros((5, 4, 2), np.uint8)}]
  tfds = TfdsImages(source, "celeb_a/test")
  assert tfds[0].shape == tfds[1].shape == (5, 4, 3) and tfds[0].max() == 7
  with pytest.raises(DataError, match=r"celeb_a/test example 2: image of shape \(5, 4, 2\)"):
    tfds[2]  # pylint: disable=pointless-statement


# ---------------------------------------------------------------------------
# 3, 5. Empty splits, labels out of range, duplicate ids.
# ---------------------------------------------------------------------------

def test_empty_split_is_refused():
  splits = {name: Split(images(n, np.uint8), labels(n), labels(n), name=name)
            for name, n in (("train", 4), ("val", 2), ("test", 0))}
  with pytest.raises(DataError, match="mine: the test split has no examples; every one of"):
    check_splits(splits, "mine")


@pytest.mark.parametrize("y, a, message", [
    ([0, 1, 2, 0], [0, 1, 0, 1], r"label 2 \(example 2, and 0 more\) is outside the class range "
     "0..1; fix the data or raise num_classes"),
    ([0, 1, 0, 1], [0, -1, 0, 5], r"spurious attribute -1 \(example 1, and 1 more\) is outside "
     "the range 0..1; fix the data or raise num_attrs"),
    ([0, 0.5, 1, 1], [0, 1, 0, 1], r"label 0.5 \(example 1\) is not an integer"),
    ([[0, 1], [1, 0]], [0, 1], r"labels have shape \(2, 2\); give one integer per example"),
    ([0, 1, 1], [0, 1, 0, 1], "has 4 images, 3 labels and 4 attributes"),
])
def test_in_memory_labels_out_of_range_are_refused(y, a, message):
  with pytest.raises(DataError, match="the train split.*" + message):
    Split(images(4, np.uint8), np.asarray(y), np.asarray(a), name="train")


def write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


HEADER = ["img_id", "img_filename", "y", "split", "place"]


@pytest.mark.parametrize("rows, message", [
    ([(1, "a.jpg", 0, 0, 0), (2, "b.jpg", 1, 0, 1), (1, "c.jpg", 0, 1, 0)],
     "img_id '1' appears on line 2 and again on line 4; each example must be listed once"),
    ([(1, "a.jpg", 0, 0, 0), (2, "x/b.jpg", 1, 0, 1), (3, "x/./b.jpg", 0, 0, 0)],
     r"img_filename 'x/b.jpg' appears on line 3 and again on line 4; each example"),
    ([(1, "a.jpg", 0, 0, 0), (2, "b.jpg", 1, 2, 1), (3, "b.jpg", 0, 0, 0)],
     "line 3 and again on line 4 \\(in the test and the train split: an example would be "
     "both trained and evaluated on\\)"),
])
def test_duplicate_ids_and_files_name_both_lines(tmp_path, rows, message):
  with pytest.raises(DataError, match=message):
    read_metadata(write_csv(tmp_path / "metadata.csv", HEADER, rows))


def test_celeba_duplicate_image_id_names_both_lines(tmp_path):
  write_csv(tmp_path / "list_attr_celeba.csv", ["image_id", "Blond_Hair", "Male"],
            [("1.jpg", 1, -1), ("2.jpg", -1, 1), ("1.jpg", 1, 1)])
  write_csv(tmp_path / "list_eval_partition.csv", ["image_id", "partition"],
            [("1.jpg", 0), ("2.jpg", 1)])
  with pytest.raises(DataError, match="list_attr_celeba.csv: image_id '1.jpg' appears on line 2 "
                     "and again on line 4"):
    load_celeba_csv(str(tmp_path))


# ---------------------------------------------------------------------------
# 4. A split missing a group: warned, absent (never 0 or 1), worst over present groups.
# ---------------------------------------------------------------------------

def test_absent_group_is_warned_about_and_reported_as_missing(tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    out = metrics.group_accuracy_metrics(np.array([3.0, 0.0, 1.0, 2.0]),
                                         np.array([4.0, 0.0, 2.0, 2.0]), np.ones(4),
                                         split="hostile_val")
  assert "hostile_val/acc/group_0_1" not in out
  assert out["hostile_val/worst_group_acc"] == 0.5
  warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert "The hostile_val split has no examples of group_0_1" in warning
  assert "worst_group_acc and adj_avg_acc are over the 3 groups present only" in warning
  full = {"test/acc/group_0_0": 0.9, "test/acc/group_0_1": 0.8, "test/worst_group_acc": 0.8}
  partial = {"test/acc/group_0_0": 0.7, "test/worst_group_acc": 0.7, "test/avg_acc": None}
  report.write_report({"models": {"a": {"role": "teacher", "method": "erm", "metrics": full},
                                  "b": {"role": "student", "method": "kd", "metrics": partial}}},
                      str(tmp_path))
  row = next(l for l in (tmp_path / "report.md").read_text().splitlines() if l.startswith("| b "))
  assert row.split(" | ")[1:] == ["student", "kd", "70.0", "—", "—", "70.0", "—", "— |"]
  assert "minimum over the groups present" in (tmp_path / "report.md").read_text()


# ---------------------------------------------------------------------------
# 7. The command line: a file that is not a config, unknown fields.
# ---------------------------------------------------------------------------

def test_cli_refuses_non_config_files_and_unknown_fields_in_one_line(tmp_path):
  no_get_config = tmp_path / "not_a_config.py"
  no_get_config.write_text("x = 1\n")
  cases = [
      (["--config=README.md"], "--config=README.md is not a Python config file (SyntaxError, "
       "line"),
      ([f"--config={no_get_config}"], "defines no get_config() function"),
      (["--config=configs/synthetic.py", "--config.no_such_field=1"],
       "--config.no_such_field: the config has no field 'no_such_field'; fields of the config: "),
      (["--config=configs/synthetic.py", "--config.distill.lamda_up=2"],
       "distill has no field 'lamda_up'; did you mean distill.lambda_up?"),
  ]
  for args, message in cases:  # fails in flag parsing, before JAX is imported: fast
    workdir = tmp_path / "w"
    proc = subprocess.run([sys.executable, "train.py", *args, f"--workdir={workdir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("FATAL Flags parsing error: ") and message in lines[0], lines
    assert len(lines) == 2 and "Traceback" not in proc.stderr
    assert not workdir.exists()


# ---------------------------------------------------------------------------
# 8a. Property-based: the metadata.csv parser.
# ---------------------------------------------------------------------------

@st.composite
def tables(draw):
  """A well-formed metadata.csv table: (header, rows, num_classes, attr column)."""
  n = draw(st.integers(1, 12))
  num_classes = draw(st.integers(2, 4))
  ids = draw(st.lists(st.integers(0, 10**6), min_size=n, max_size=n, unique=True))
  names = draw(st.lists(st.text("abcxyz019_-", min_size=1, max_size=8), min_size=n,
                        max_size=n, unique=True))
  attr_column = draw(st.sampled_from(["place", "background"]))
  header = ["img_id", "img_filename", "y", "split", attr_column, "place_filename"]
  order = draw(st.permutations(range(len(header))))
  rows = [[i, f"{name}.jpg", draw(st.integers(0, num_classes - 1)), draw(st.integers(0, 2)),
           draw(st.integers(0, 1)), ""] for i, name in zip(ids, names)]
  return [header[k] for k in order], [[r[k] for k in order] for r in rows], num_classes, attr_column


def parse(header, rows, **kwargs):
  with tempfile.TemporaryDirectory() as d:
    return read_metadata(write_csv(os.path.join(d, "metadata.csv"), header, rows), **kwargs)


@settings(max_examples=30, deadline=None, database=None)
@given(tables())
def test_well_formed_tables_parse_to_their_arrays(table):
  header, rows, num_classes, attr_column = table
  out = parse(header, rows, attr_column=attr_column, num_classes=num_classes)
  column = {name: [row[header.index(name)] for row in rows] for name in header}
  assert list(out["filename"]) == column["img_filename"]
  np.testing.assert_array_equal(out["y"], column["y"])
  np.testing.assert_array_equal(out["split"], column["split"])
  np.testing.assert_array_equal(out["attr"], column[attr_column])


MALFORMATIONS = {  # name: (column to edit, new value or None to drop the column, message)
    "non_integer": ("y", "text", "column y holds"),
    "fraction": ("split", "1.5", "column split holds '1.5', not an integer"),
    "label_out_of_range": ("y", "9", "label y=9 is outside the class range"),
    "negative_label": ("y", "-1", "label y=-1 is negative"),
    "bad_split": ("split", "3", "split 3 is not 0 (train), 1 (val) or 2 (test)"),
    "non_binary_attr": ("place", "2", "the attribute column place holds 2"),
    "missing_column": ("split", None, "lacks the column(s) split"),
    "duplicate_id": ("img_id", "dup", "img_id"),
}


@settings(max_examples=30, deadline=None, database=None)
@given(tables(), st.sampled_from(sorted(MALFORMATIONS)), st.data())
def test_malformed_tables_name_the_line_or_column(table, kind, data):
  header, rows, num_classes, _ = table
  header = ["place" if h == "background" else h for h in header]
  column, value, message = MALFORMATIONS[kind]
  k = header.index(column)
  row = data.draw(st.integers(0, len(rows) - 1))
  if value is None:
    header = header[:k] + header[k + 1:]
    rows = [r[:k] + r[k + 1:] for r in rows]
  elif kind == "duplicate_id":
    other = data.draw(st.integers(0, len(rows)))  # may be a new row at the end
    if other == row:
      other = len(rows)
    if other == len(rows):
      rows = rows + [list(rows[0])]
      rows[-1][header.index("img_filename")] = "another.jpg"
    rows[other][k] = rows[row][k]
    first, second = sorted((row, other))
    message = f"img_id '{rows[row][k]}' appears on line {first + 2} and again on line {second + 2}"
  else:
    if value == "text":
      value = data.draw(st.text("abcdefinty.+- ", min_size=0, max_size=6).filter(
          lambda s: not _is_integer(s)))
    rows[row][k] = value
    message = f"line {row + 2}: {message}"
  with pytest.raises(DataError) as error:
    parse(header, rows, num_classes=num_classes)
  assert message in str(error.value), (kind, str(error.value))


def _is_integer(text: str) -> bool:
  try:
    return float(text).is_integer()
  except (ValueError, OverflowError):
    return False


# ---------------------------------------------------------------------------
# 8b. Property-based: group metrics (fixed shapes: one compilation).
# ---------------------------------------------------------------------------

BATCH, GROUPS = 48, 4
_group_sums = jax.jit(metrics.group_sums, static_argnums=3)


@settings(max_examples=30, deadline=None, database=None)
@given(seed=st.integers(0, 2**31 - 1),
       present=st.sets(st.integers(0, GROUPS - 1), min_size=1),
       padding=st.integers(0, BATCH - 1), p_correct=st.floats(0, 1))
def test_group_metrics_match_numpy_and_skip_absent_groups(seed, present, padding, p_correct):
  rng = np.random.default_rng(seed)
  groups = rng.choice(sorted(present), BATCH)
  correct = (rng.random(BATCH) < p_correct).astype(np.float32)
  mask = (np.arange(BATCH) < BATCH - padding).astype(np.float32)
  train_counts = rng.integers(0, 50, GROUPS).astype(np.float64)
  sums = [np.asarray(_group_sums(v, groups, mask, GROUPS)) for v in (correct, np.ones(BATCH))]
  out = metrics.group_accuracy_metrics(sums[0], sums[1], train_counts, split="prop")
  real = mask > 0
  accs = {g: correct[real & (groups == g)].mean() for g in range(GROUPS)
          if (real & (groups == g)).any()}
  for g in range(GROUPS):
    key = f"prop/acc/{metrics.group_name(g)}"
    if g in accs:
      assert out[key] == pytest.approx(accs[g])
    else:
      assert key not in out  # never reported as 0 or 1
  assert out["prop/worst_group_acc"] == pytest.approx(min(accs.values()))
  assert out["prop/avg_acc"] == pytest.approx(correct[real].mean())
  assert all(0.0 <= v <= 1.0 for v in out.values())
  lo, hi = min(accs.values()), max(accs.values())
  assert lo - 1e-9 <= out["prop/adj_avg_acc"] <= hi + 1e-9
