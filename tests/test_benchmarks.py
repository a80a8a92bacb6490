"""The benchmark scripts run, at a tiny size."""

import json
import os
import subprocess
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
  env.pop("XLA_FLAGS", None)  # each benchmark chooses its own device count
  return env


def test_cpu_devices_benchmark_prints_a_row_per_device_count():
  out = subprocess.run([sys.executable, "benchmarks/cpu_devices.py", "--devices", "1,2",
                        "--steps", "2", "--config", "configs/tiny.py"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [l for l in out.stdout.splitlines() if l.startswith("| 1 |") or l.startswith("| 2 |")]
  assert len(rows) == 2
  assert float(rows[0].split("|")[2]) > 0


def test_reproduce_summarizes_seeds(tmp_path):
  out = subprocess.run([sys.executable, "benchmarks/reproduce.py", "--seeds", "2",
                        "--config", "configs/tiny.py", "--workdir", str(tmp_path), "--",
                        "--config.distill.methods=dett", "--config.pretrain.enabled=False"],
                       cwd=ROOT, env=dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| student_dett | dett |" in out.stdout and " ± " in out.stdout
  with open(tmp_path / "reproduce.json") as f:
    summary = json.load(f)
  assert len(summary["per_seed"]) == 2
  values = [s["student_dett"]["metrics"]["test/worst_group_acc"] for s in summary["per_seed"]]
  mean = float(summary["rows"][2]["test/worst_group_acc"].split(" ± ")[0])
  assert abs(mean - 100 * sum(values) / 2) < 0.051


def test_image_pipeline_benchmark_and_folder_generator(tmp_path):
  folder = str(tmp_path / "folder")
  out = subprocess.run([sys.executable, "benchmarks/make_folder.py", "--out", folder, "--train",
                        "40", "--val", "16", "--test", "16"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  with open(os.path.join(folder, "metadata.csv")) as f:
    assert f.readline().strip() == "img_id,img_filename,y,split,place,place_filename"
    assert len(f.readlines()) >= 72  # at least one example per group and split
  report = str(tmp_path / "pipeline.json")
  out = subprocess.run([sys.executable, "benchmarks/image_pipeline.py", "--workers", "0", "1",
                        "--images", "24", "--batches", "3", "--batch_size", "4", "--sizes", "40",
                        "60", "--image_size", "32", "--dir", str(tmp_path / "jpegs"), "--out",
                        report], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = json.load(open(report))["rows"]
  assert [r["workers"] for r in rows] == [0, 1] and all(r["images_per_s"] > 0 for r in rows)
  assert "| 1 |" in out.stdout
