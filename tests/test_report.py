"""Tests for dett_jax.report."""

from __future__ import annotations

import json
import os

import numpy as np

from dett_jax import report
from dett_jax.io import write_json_atomic


def _results() -> dict:
  return {
      "config": {"dataset": "waterbirds", "seed": np.int64(0)},
      "models": {
          "teacher_erm": {
              "role": "teacher",
              "method": "erm",
              "metrics": {
                  "val/worst_group_acc": 0.801,
                  "test/worst_group_acc": 0.9234,
                  "test/avg_acc": 0.9612,
                  "test/adj_avg_acc": 0.9501,
                  "test/acc/group_0_0": 0.99,
                  "test/acc/group_0_1": 0.9234,
                  "test/acc/group_1_0": 0.94,
                  "test/acc/group_1_1": 0.97,
              },
          },
          "student_dett": {
              "role": "student",
              "method": "dett",
              "metrics": {
                  # No val/worst_group_acc: must render as "—".
                  "test/worst_group_acc": 0.6543,
                  "test/avg_acc": 0.8811,
                  "test/adj_avg_acc": 0.8712,
                  "test/acc/group_0_0": 0.9,
                  "test/acc/group_0_1": 0.6543,
                  "test/acc/group_1_0": 0.7,
                  "test/acc/group_1_1": 0.88,
                  "test/agreement": 0.9512,
                  "test/agreement/group_0_0": 0.97,
                  "test/feature_error": 0.12345,
                  "test/feature_error/group_0_0": 0.0567,
              },
              "selection": {"epoch": 3},
          },
      },
  }


def test_write_report(tmp_path):
  report.write_report(_results(), str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["groups.png", "report.md"]
  text = (tmp_path / "report.md").read_text(encoding="utf-8")
  lines = text.splitlines()
  teacher_row = next(l for l in lines if l.startswith("| teacher_erm"))
  student_row = next(l for l in lines if l.startswith("| student_dett"))
  assert lines.index(teacher_row) < lines.index(student_row)  # Dict order.
  assert "| 92.3 | 96.1 | 95.0 |" in teacher_row
  assert teacher_row.rstrip().endswith("| 80.1 |")  # Val worst group last.
  assert "65.4" in student_row
  assert student_row.rstrip().endswith("| — |")  # Missing val metric.
  assert "Student diagnostics" in text
  diag_rows = [l for l in lines if l.startswith("| student_dett")]
  assert len(diag_rows) == 2
  assert "95.1" in diag_rows[1] and "0.123" in diag_rows[1]
  assert "0.057" in diag_rows[1]
  assert not any(l.startswith("| teacher_erm") for l in
                 lines[lines.index("## Student diagnostics"):])
  with open(tmp_path / "groups.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_format_table():
  table = report.format_table(
      [{"a": 1, "b": "x"}, {"a": "2 ± 0.1"}], ["a", "b"])
  assert table.splitlines() == [
      "| a | b |", "|---|---|", "| 1 | x |", "| 2 ± 0.1 | — |"]


def test_write_json_atomic_round_trip(tmp_path):
  path = tmp_path / "out.json"
  path.write_text("old")
  obj = {"b": np.float32(0.5), "a": np.int64(3), "arr": np.arange(3),
         "nested": {"flag": np.bool_(True)}}
  write_json_atomic(str(path), obj)
  loaded = json.loads(path.read_text())
  assert loaded == {"b": 0.5, "a": 3, "arr": [0, 1, 2],
                    "nested": {"flag": True}}
  assert list(loaded) == ["b", "a", "arr", "nested"]  # Not sorted.
  assert os.listdir(tmp_path) == ["out.json"]
