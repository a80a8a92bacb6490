"""Tests for dett_jax.study (no training: hand-made runs)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dett_jax import study as study_lib

AXES = {"projector": ["identity", "simkd"], "lambda_up": [1, 5]}


def _run(projector, lambda_up, seed, **metrics) -> dict:
  return {"name": f"{projector}_l{lambda_up}_s{seed}",
          "variant": {"projector": projector, "lambda_up": lambda_up},
          "seed": seed,
          "metrics": {f"{k.split('_', 1)[0]}/{k.split('_', 1)[1]}": v
                      for k, v in metrics.items()}}


def _grid_runs() -> list[dict]:
  """2 x 2 variants x 2 seeds; val/test worst-group and avg for each."""
  values = {  # (projector, lambda_up): [(val_wga, test_wga, val_avg), per seed]
      ("identity", 1): [(0.60, 0.55, 0.90), (0.70, 0.65, 0.92)],
      ("identity", 5): [(0.80, 0.70, 0.91), (0.90, 0.72, 0.93)],
      ("simkd", 1): [(0.50, 0.95, 0.80), (0.50, 0.93, 0.82)],
      ("simkd", 5): [(0.75, 0.60, 0.85), (0.85, 0.80, 0.87)],
  }
  runs = []
  for (proj, lam), per_seed in values.items():
    for seed, (val_wga, test_wga, val_avg) in enumerate(per_seed):
      runs.append(_run(proj, lam, seed, val_worst_group_acc=val_wga,
                       test_worst_group_acc=test_wga, val_avg_acc=val_avg,
                       test_avg_acc=0.9, val_adj_avg_acc=0.88,
                       test_adj_avg_acc=0.89))
  return runs


def _variant(study, projector, lambda_up):
  return next(v for v in study["variants"]
              if v["variant"] == {"projector": projector,
                                  "lambda_up": lambda_up})


def test_variant_means_and_stds(tmp_path):
  study = study_lib.write_study(_grid_runs(), AXES, str(tmp_path))
  assert [v["label"] for v in study["variants"]] == [
      "projector=identity, lambda_up=1", "projector=identity, lambda_up=5",
      "projector=simkd, lambda_up=1", "projector=simkd, lambda_up=5"]
  v = _variant(study, "identity", 5)
  assert v["seeds"] == [0, 1]
  m = v["metrics"]
  assert m["val/worst_group_acc"]["mean"] == pytest.approx(0.85)
  assert m["val/worst_group_acc"]["std"] == pytest.approx(0.05)  # ddof=0
  assert m["val/worst_group_acc"]["n"] == 2
  assert m["test/worst_group_acc"]["mean"] == pytest.approx(0.71)
  assert m["test/worst_group_acc"]["std"] == pytest.approx(0.01)
  assert m["val/avg_acc"]["mean"] == pytest.approx(0.92)
  assert m["test/adj_avg_acc"] == {"mean": pytest.approx(0.89), "std": 0.0,
                                   "n": 2}
  # simkd/1 has identical val worst-group on both seeds: std exactly 0.
  assert _variant(study, "simkd", 1)["metrics"][
      "val/worst_group_acc"]["std"] == 0.0

  with open(tmp_path / "study.json", encoding="utf-8") as f:
    on_disk = json.load(f)
  assert set(on_disk) == {"axes", "runs", "per_axis", "variants", "best",
                          "selection"}
  assert on_disk["axes"] == AXES
  assert len(on_disk["runs"]) == 8
  assert on_disk["variants"][1]["metrics"]["val/worst_group_acc"][
      "mean"] == pytest.approx(0.85)
  # No stray temp files from the atomic writes.
  assert sorted(os.listdir(tmp_path)) == ["study.json", "study.md",
                                          "study.png"]


def test_single_seed_std_is_zero(tmp_path):
  study = study_lib.write_study(
      [_run("simkd", 5, 3, val_worst_group_acc=0.7)], AXES, str(tmp_path))
  (v,) = study["variants"]
  assert v["seeds"] == [3]
  assert v["metrics"]["val/worst_group_acc"] == {"mean": 0.7, "std": 0.0,
                                                 "n": 1}


def test_per_axis_marginals(tmp_path):
  study = study_lib.write_study(_grid_runs(), AXES, str(tmp_path))
  proj = {r["value"]: r for r in study["per_axis"]["projector"]}
  assert [r["value"] for r in study["per_axis"]["projector"]] == [
      "identity", "simkd"]
  # identity: val wga over its 4 runs 0.6, 0.7, 0.8, 0.9.
  ident = proj["identity"]["metrics"]["val/worst_group_acc"]
  assert proj["identity"]["n_runs"] == 4
  assert ident["mean"] == pytest.approx(0.75)
  assert ident["std"] == pytest.approx(np.std([0.6, 0.7, 0.8, 0.9]))
  assert ident["n"] == 4
  # simkd test wga: 0.95, 0.93, 0.60, 0.80.
  assert proj["simkd"]["metrics"]["test/worst_group_acc"][
      "mean"] == pytest.approx(0.82)
  lam = {r["value"]: r for r in study["per_axis"]["lambda_up"]}
  # lambda_up=5: val wga 0.8, 0.9, 0.75, 0.85.
  assert lam[5]["metrics"]["val/worst_group_acc"]["mean"] == pytest.approx(
      0.825)
  assert lam[1]["metrics"]["val/worst_group_acc"]["mean"] == pytest.approx(
      0.575)
  text = (tmp_path / "study.md").read_text(encoding="utf-8")
  ident_row = next(l for l in text.splitlines() if l.startswith("| identity |"))
  cells = [c.strip() for c in ident_row.strip("|").split("|")]
  # axis value, n runs, val wga, val avg, val adj avg, test wga, ...
  assert cells[:3] == ["identity", "4", "75.0 ± 11.2"]
  assert cells[4] == "88.0 ± 0.0"


def test_best_is_selected_on_validation_not_test(tmp_path):
  runs = _grid_runs()
  study = study_lib.write_study(runs, AXES, str(tmp_path))
  # Best by test worst-group is simkd/1 (94%), but by val it is identity/5.
  best_by_test = max(study["variants"], key=lambda v: v["metrics"][
      "test/worst_group_acc"]["mean"])
  assert best_by_test["variant"] == {"projector": "simkd", "lambda_up": 1}
  best = study["best"]
  assert best["variant"] == {"projector": "identity", "lambda_up": 5}
  assert best["metrics"]["test/worst_group_acc"]["mean"] == pytest.approx(0.71)
  assert "validation worst-group" in study["selection"]
  assert "test metrics are never used" in study["selection"]
  text = (tmp_path / "study.md").read_text(encoding="utf-8")
  assert study["selection"] in text
  best_line = next(l for l in text.splitlines()
                   if l.startswith("**Best variant:**"))
  assert "projector=identity, lambda_up=5" in best_line
  assert "val worst group 85.0 ± 5.0" in best_line
  assert "test worst group 71.0 ± 1.0" in best_line
  assert "simkd" not in best_line


def test_best_tie_breaks_on_val_average_then_order(tmp_path):
  runs = [_run("identity", 1, 0, val_worst_group_acc=0.8, val_avg_acc=0.85),
          _run("simkd", 1, 0, val_worst_group_acc=0.8, val_avg_acc=0.90),
          _run("simkd", 5, 0, val_worst_group_acc=0.8, val_avg_acc=0.90)]
  study = study_lib.write_study(runs, AXES, str(tmp_path))
  assert study["best"]["variant"] == {"projector": "simkd", "lambda_up": 1}


def test_absent_metrics_are_not_zero(tmp_path):
  runs = [
      _run("identity", 1, 0, val_worst_group_acc=0.6, test_worst_group_acc=0.5),
      # Seed 1 lacks test worst-group (missing key) and val avg (None).
      _run("identity", 1, 1, val_worst_group_acc=0.8, val_avg_acc=None),
      # simkd/5 has no test metric at all and a NaN val avg.
      _run("simkd", 5, 0, val_worst_group_acc=0.9, val_avg_acc=float("nan")),
  ]
  study = study_lib.write_study(runs, AXES, str(tmp_path))
  m = _variant(study, "identity", 1)["metrics"]
  assert m["test/worst_group_acc"] == {"mean": 0.5, "std": 0.0, "n": 1}
  assert m["val/worst_group_acc"]["n"] == 2
  assert m["val/avg_acc"] == {"mean": None, "std": None, "n": 0}
  simkd = _variant(study, "simkd", 5)["metrics"]
  assert simkd["test/worst_group_acc"] == {"mean": None, "std": None, "n": 0}
  # Marginal over projector=identity: test wga over 1 run, not 2.
  proj = {r["value"]: r for r in study["per_axis"]["projector"]}
  assert proj["identity"]["metrics"]["test/worst_group_acc"]["mean"] == 0.5
  assert proj["identity"]["metrics"]["test/worst_group_acc"]["n"] == 1
  # lambda_up=5 only has simkd/5, which has no test metric.
  lam = {r["value"]: r for r in study["per_axis"]["lambda_up"]}
  assert lam[5]["metrics"]["test/worst_group_acc"]["mean"] is None

  # JSON: absent is null (NaN input included), never 0 and never NaN.
  raw = (tmp_path / "study.json").read_text(encoding="utf-8")
  assert "NaN" not in raw
  on_disk = json.loads(raw)
  assert on_disk["runs"][2]["metrics"]["val/avg_acc"] is None

  text = (tmp_path / "study.md").read_text(encoding="utf-8")
  lines = text.splitlines()
  simkd_variant_row = next(l for l in lines if l.startswith("| simkd | 5 |"))
  cells = [c.strip() for c in simkd_variant_row.strip("|").split("|")]
  assert cells == ["simkd", "5", "90.0 ± 0.0", "—", "0"]
  ident_variant_row = next(l for l in lines if l.startswith("| identity | 1 |"))
  cells = [c.strip() for c in ident_variant_row.strip("|").split("|")]
  assert cells == ["identity", "1", "70.0 ± 10.0", "50.0 ± 0.0 (n=1)", "0, 1"]
  # Per-axis table of lambda_up: value 5's test wga is absent.
  lam5_row = next(l for l in lines if l.startswith("| 5 |"))
  cells = [c.strip() for c in lam5_row.strip("|").split("|")]
  assert cells[1] == "1" and cells[5] == "—"


def test_png_is_written(tmp_path):
  study_lib.write_study(_grid_runs(), AXES, str(tmp_path / "out"))
  data = (tmp_path / "out" / "study.png").read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  assert len(data) > 1000


def test_value_types_and_numpy(tmp_path):
  axes = {"flag": [True, False], "lr": [0.1, 1], "depth": [10, 18]}
  runs = [{"name": "a", "variant": {"flag": np.bool_(True), "lr": 1.0,
                                    "depth": np.int64(18)},
           "seed": np.int64(0),
           "metrics": {"val/worst_group_acc": np.float32(0.5)}},
          {"name": "b", "variant": {"flag": False, "lr": 0.1}, "seed": 0,
           "metrics": {"val/worst_group_acc": 0.25}}]
  study = study_lib.write_study(runs, axes, str(tmp_path))
  # Values map to their entries in `axes` (1.0 -> 1); a run may omit an axis.
  assert study["variants"][0]["variant"] == {"flag": True, "lr": 1,
                                             "depth": 18}
  assert study["variants"][1]["variant"] == {"flag": False, "lr": 0.1}
  depth = {r["value"]: r["n_runs"] for r in study["per_axis"]["depth"]}
  assert depth == {10: 0, 18: 1}
  json.loads((tmp_path / "study.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("runs, axes, match", [
    ([], AXES, "empty"),
    ([_run("identity", 1, 0)], {"projector": ["identity"]},
     "lambda_up.*not in axes"),
    ([_run("linear", 1, 0)], AXES, "'linear' of axis 'projector' is not one"),
    ([_run("identity", 20, 0)], AXES, "20 of axis 'lambda_up'"),
    # bool is not int: True must not match lambda_up=1.
    ([{"variant": {"lambda_up": True}, "seed": 0, "metrics": {}}], AXES,
     "True of axis 'lambda_up'"),
    ([_run("identity", 1, 0), _run("identity", 1, 0)], AXES,
     "seed 0 occurs twice"),
    ([{"variant": {}, "metrics": {}}], AXES, "'seed' must be an int"),
    ([_run("identity", 1, 0)], {"projector": ["identity", "identity"]},
     "twice"),
])
def test_validation_errors(tmp_path, runs, axes, match):
  with pytest.raises(ValueError, match=match):
    study_lib.write_study(runs, axes, str(tmp_path))
  assert not os.path.exists(tmp_path / "study.json")
