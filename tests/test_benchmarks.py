"""The benchmark scripts run, at a tiny size."""

import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import FAST_COMPILE

pytestmark = pytest.mark.slow  # left out of ./run.sh test-fast (the full suite runs it)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
  env["XLA_FLAGS"] = FAST_COMPILE  # each benchmark chooses its own device count
  return env


TINY = ["--pair", "tiny", "--image_size", "16", "--batch", "16", "--steps", "2", "--warmup", "1",
        "--matmul_size", "256"]


def _jax_param_counts(teacher=(10, 0.0625, "small"), student=(10, 0.0625, "small"), size=16):
  """Parameter counts of the tiny pair's networks, as throughput.py builds them."""
  import jax.numpy as jnp
  from dett_jax.models.projector import Projector
  from dett_jax.models.resnet import create_resnet, feature_channels
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  x = jnp.zeros((1, size, size, 3))
  t_depth, t_width, t_stem = teacher
  t = jax.eval_shape(create_resnet(t_depth, 2, t_width, t_stem).init, jax.random.key(0), x)
  model = create_resnet(student[0], None, *student[1:])
  s = jax.eval_shape(model.init, jax.random.key(0), x)
  fmap = jax.eval_shape(lambda v: model.apply(v, x)["feature_map"], s)
  proj = Projector("simkd", feature_channels(t_depth, t_width), 2)
  p = jax.eval_shape(proj.init, jax.random.key(0), jnp.zeros(fmap.shape))
  return {"teacher": count(t["params"]), "student": count(s["params"]),
          "projector": count(p["params"])}


def test_throughput_rows_per_step_and_device_count(tmp_path):
  report = str(tmp_path / "throughput.json")
  out = subprocess.run([sys.executable, "benchmarks/throughput.py", *TINY, "--devices", "1,2",
                        "--torch", "no", "--json", report], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  for name in ("DeTT", "DeTT, cached teacher", "KD"):
    for devices in (1, 2):
      assert sum(l.startswith(f"| {name} | JAX | float32 | {devices} |") for l in lines) == 1
  with open(report) as f:
    results = json.load(f)
  rows = results["rows"]
  assert [(r["name"], r["devices"]) for r in rows] == [
      ("dett", 1), ("dett_cached", 1), ("kd", 1), ("dett", 2), ("dett_cached", 2), ("kd", 2)]
  for r in rows:
    for key in ("compile_s", "step_s", "examples_per_s", "flops", "gflops_per_s",
                "peak_gflops_per_s", "utilisation", "memory_mb"):
      assert r[key] > 0, (r["name"], key, r[key])
    assert len(r["step_times_s"]) == 2 and abs(r["examples_per_s"] * r["step_s"] - 16) < 1e-6
  by = {(r["name"], r["devices"]): r for r in rows}
  # FLOPs are per step (all devices), and the cached step skips the teacher's forward pass.
  assert abs(by["dett", 2]["flops"] / by["dett", 1]["flops"] - 1) < 0.05
  assert by["dett_cached", 1]["flops"] < by["dett", 1]["flops"]
  assert results["params"] == _jax_param_counts()


@pytest.mark.parametrize("mode", ["only", "interleaved"])
def test_torch_reference_is_the_same_step_and_joins_the_table(tmp_path, mode):
  """`only`: the PyTorch step in its own process; `interleaved`: in the JAX process, its
  steps taking turns with the JAX row's."""
  import importlib.util
  if importlib.util.find_spec("torch") is None:
    pytest.skip("the PyTorch reference needs torch, which is not installed; "
                "pip install 'dett-jax[torch]'")
  report = str(tmp_path / "throughput.json")
  extra = ["--devices", "1", "--rows", "dett"] if mode == "interleaved" else []
  out = subprocess.run([sys.executable, "benchmarks/throughput.py", *TINY, "--torch", mode,
                        *extra, "--json", report], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert any(l.startswith("| DeTT | PyTorch (eager, channels_last") for l in out.stdout.splitlines())
  with open(report) as f:
    rows = json.load(f)["rows"]
  if mode == "interleaved":
    assert [(r["engine"], r["name"]) for r in rows] == [("jax", "dett"), ("torch", "dett")]
    assert len(rows[1]["step_times_s"]) == len(rows[0]["step_times_s"]) == 2
    rows = rows[1:]
  (row,) = rows
  assert row["engine"] == "torch" and row["batch"] == 16 and row["image_size"] == 16
  for key in ("step_s", "examples_per_s", "flops", "gflops_per_s", "utilisation"):
    assert row[key] > 0, key
  assert row["loss"] > 0
  # Same architectures and widths as the JAX networks (BatchNorm scale/bias = weight/bias).
  assert row["params"] == _jax_param_counts()


def _fake_wheel(folder, dist, module):
  """A minimal pure-Python wheel of distribution `dist` holding package `module`."""
  import zipfile
  path = os.path.join(folder, f"{dist}-0.1-py3-none-any.whl")
  info = f"{dist}-0.1.dist-info"
  files = {f"{module}/__init__.py": "VALUE = 7\n",
           f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n",
           f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                            "Tag: py3-none-any\n"}
  files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
  with zipfile.ZipFile(path, "w") as z:
    for name, text in files.items():
      z.writestr(name, text)


def test_gpu_script_dry_run_on_cpu(tmp_path):
  """benchmarks/gpu.sh end to end on this CPU (the GPU check relaxed, a tiny pair): it
  installs only what the wheels folder has and python lacks, and appends its tables."""
  wheels, deps = tmp_path / "wheels", tmp_path / "deps"
  wheels.mkdir()
  _fake_wheel(str(wheels), "dett_fake_dep", "dett_fake_dep")  # missing here: installed
  _fake_wheel(str(wheels), "absl_py", "absl_fake_copy")  # installed here: left alone
  results = tmp_path / "RESULTS.md"
  results.write_text(open(os.path.join(ROOT, "benchmarks", "RESULTS.md")).read())
  env = dict(_env(), PYTHON=sys.executable, GPU_BENCH_ALLOW_CPU="1", WHEELS=str(wheels),
             GPU_DEPS=str(deps), RESULTS=str(results), GPU_BENCH_JSON_DIR=str(tmp_path),
             GPU_BENCH_DTYPES="float32", GPU_BENCH_BUDGET="200",
             GPU_BENCH_ARGS=" ".join(TINY + ["--devices", "1", "--rows", "dett", "--torch", "no"]))
  env.pop("OUT", None)
  out = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (deps / "dett_fake_dep" / "__init__.py").exists()  # installed: python lacked it
  assert not (deps / "absl_fake_copy").exists()  # nothing this python already has
  text = results.read_text()
  assert "No GPU run has been recorded yet" not in text
  assert "\n## " in text and "bash benchmarks/gpu.sh" in text
  assert "| DeTT | JAX | float32 | 1 |" in text
  assert json.load(open(tmp_path / "gpu_throughput_float32.json"))["rows"][0]["step_s"] > 0


def test_reproduce_summarizes_seeds(tmp_path):
  def reproduce(seeds: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/reproduce.py", "--seeds", str(seeds),
                           "--config", "configs/tiny.py", "--workdir", str(tmp_path), "--",
                           "--config.distill.methods=dett", "--config.pretrain.enabled=False"],
                          # 8 devices, like the in-process tests: their compilations are reused
                          cwd=ROOT, env=dict(_env(), XLA_FLAGS=(
                              f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")),
                          capture_output=True, text=True, timeout=600)

  out = reproduce(1)  # one real train.py run (seed 0)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "running:" in out.stdout and "--config.seed=0" in out.stdout
  first = json.load(open(tmp_path / "seed_0" / "results.json"))
  # A second seed's results, as its run would leave them: finished seeds are not re-run,
  # and the summary is over both.
  second = json.loads(json.dumps(first))
  metrics = second["models"]["student_dett"]["metrics"]
  metrics["test/worst_group_acc"] = 1.0 - metrics["test/worst_group_acc"]
  os.makedirs(tmp_path / "seed_1")
  json.dump(second, open(tmp_path / "seed_1" / "results.json", "w"))
  out = reproduce(2)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "running:" not in out.stdout
  assert "| student_dett | dett |" in out.stdout and " ± " in out.stdout
  with open(tmp_path / "reproduce.json") as f:
    summary = json.load(f)
  assert len(summary["per_seed"]) == 2
  values = [s["student_dett"]["metrics"]["test/worst_group_acc"] for s in summary["per_seed"]]
  assert values[1] == 1.0 - values[0]
  row = next(r for r in summary["rows"] if r["model"] == "student_dett")
  mean, std = (float(x) for x in row["test/worst_group_acc"].split(" ± "))
  assert abs(mean - 50.0) < 0.051  # (v + 1 - v) / 2
  assert abs(std - 100 * abs(values[0] - 0.5)) < 0.051


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


def test_soak_kills_compares_and_reports(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import soak
  # kill_once: SIGTERM reaches a running process after the delay; its exit code is kept
  script = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: (print('interrupted: stage teacher_erm "
            "stopped at step 3 of 6 (signal 15); re-run'), sys.exit(3)))\n"
            "time.sleep(30)\n")
  log = str(tmp_path / "log")
  code, where = soak.kill_once([sys.executable, "-u", "-c", script], dict(os.environ), 1.5, log)
  assert code == 3 and where == "teacher_erm step 3 of 6 (checkpointed)"
  code, where = soak.kill_once([sys.executable, "-c", "pass"], dict(os.environ), 10.0, log)
  assert code == 0  # finished before the kill
  a = {"dett": {"metrics": {"test/avg_acc": 0.5, "val/avg_acc": 0.25}}}
  assert soak.compare(a, json.loads(json.dumps(a))) == []
  b = {"dett": {"metrics": {"test/avg_acc": 0.5, "val/avg_acc": 0.2500001}}}
  assert soak.compare(a, b) == ["dett: val/avg_acc"]
  assert soak.compare(a, {}) == ["dett: test/avg_acc, val/avg_acc"]


# A resumable stand-in for train.py: 0.2 s start-up before its workdir exists, then 20 steps
# of 0.05 s; SIGTERM checkpoints the step and exits 3; results.json holds the steps done.
_FAKE_PIPELINE = """
import json, os, signal, sys, time
wd = sys.argv[1]
time.sleep(0.2)
os.makedirs(wd, exist_ok=True)
path = os.path.join(wd, "step")
step = int(open(path).read()) if os.path.exists(path) else 0
def stop(*_):
  open(path, "w").write(str(step))
  print(f"interrupted: stage student_dett stopped at step {step} of 20 (signal 15); re-run",
        flush=True)
  sys.exit(3)
signal.signal(signal.SIGTERM, stop)
while step < 20:
  time.sleep(0.05)
  step += 1
json.dump({"models": {"dett": {"metrics": {"steps": step}}}},
          open(os.path.join(wd, "results.json"), "w"))
"""


def test_soak_delays_fit_the_measured_run_and_all_kills_land(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import random
  import soak
  # the delay rule: start-up + 0.5-1 x (run - start-up) / (kills + 1), whatever the run length
  for seconds, startup, kills in ((54.0, 3.0, 10), (400.0, 5.0, 10), (2.0, 0.4, 3)):
    draw, _ = soak.delay_drawer(seconds, startup, kills, random.Random(0))
    span = (seconds - startup) / (kills + 1)
    delays = [draw(1.0) for _ in range(kills)]
    assert all(startup + 0.5 * span <= d <= startup + span for d in delays)
    assert sum(d - startup for d in delays) <= seconds * kills / (kills + 1)
    assert draw(0.5) <= (startup + span) / 2
  draw, rule = soak.delay_drawer(54.0, 3.0, 10, random.Random(0), 3.0, 12.0)  # given range
  assert all(3.0 <= draw(1.0) <= 12.0 for _ in range(20)) and "given" in rule

  log = str(tmp_path / "log")
  script = str(tmp_path / "fake_train.py")
  with open(script, "w") as f:
    f.write(_FAKE_PIPELINE)
  make_cmd = lambda workdir: [sys.executable, "-u", script, workdir]
  straight = str(tmp_path / "straight")
  seconds, startup = soak.run_to_end(make_cmd(straight), dict(os.environ), log, workdir=straight)
  assert 0 < startup < seconds
  reference = soak.results(straight)
  # delays from the measured run: every kill lands on the one live run, which then resumes
  draw, _ = soak.delay_drawer(seconds, startup, 3, random.Random(0))
  lines = []
  out = soak.kill_until_landed(make_cmd, dict(os.environ), 3, draw, str(tmp_path / "a"), log,
                               reference=reference, say=lines.append)
  assert (out["landed"], out["survived"], out["diffs"]) == (3, 3, []), lines
  assert soak.results(out["workdirs"][-1]) == reference
  # delays longer than the run: a kill after the run finished does not count; the run starts
  # again from scratch in a fresh workdir with delays halved until the kills land
  lines = []
  out = soak.kill_until_landed(make_cmd, dict(os.environ), 1, lambda scale: 3.0 * scale,
                               str(tmp_path / "b"), log, reference=reference, say=lines.append)
  assert out["landed"] == out["survived"] == 1 and out["missed"] >= 1, lines
  assert len(out["workdirs"]) == out["missed"] + 1 and out["diffs"] == []
  assert "not counted" in lines[0] and "killed_2" in lines[0]
  assert all(soak.results(w) == reference for w in out["workdirs"])
  # a finished run whose results differ is reported by workdir
  out = soak.kill_until_landed(make_cmd, dict(os.environ), 0, draw, str(tmp_path / "c"), log,
                               reference={"dett": {"metrics": {"steps": 19}}}, say=lines.append)
  assert out["diffs"] == ["killed: dett: steps"]
