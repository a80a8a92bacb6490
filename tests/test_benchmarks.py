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
