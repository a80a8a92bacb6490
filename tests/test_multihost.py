"""Multi-process runs of the whole default pipeline (configs/tiny.py, every stage and
method; gloo collectives on 127.0.0.1): 2 processes x 1 device and 2 x 2 against
1 process, a peer killed mid-stage (the survivor's exit code and line) and the re-run.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import FAST_COMPILE

from dett_jax import distributed
from dett_jax.checkpoints import load_variables
from dett_jax.sharding import make_mesh, replicated

pytestmark = pytest.mark.slow  # left out of ./run.sh test-fast (the full suite runs it)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["train.py", "--config=configs/tiny.py"]


def _env(devices: int) -> dict:
  # Process 0 reuses compilations from the persistent cache, but on XLA:CPU the others
  # never do (the cache key holds a per-process topology fingerprint): process 1 spent
  # 81 of its 89 s CPU compiling (37 s on the two ResNet inits). Without LLVM
  # optimisation (in every run of this test alike) it compiles 3-7x faster.
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
              XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices} "
                         f"{FAST_COMPILE}"))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, *extra, processes: int = 1, devices: int = 8) -> list[subprocess.Popen]:
  """Starts `train.py` as `processes` processes of `devices` CPU devices each."""
  cmd = [sys.executable, *ARGS, f"--workdir={workdir}", *extra]
  if processes > 1:
    port = _free_port()
    cmds = [cmd + [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                   f"--process_id={i}"] for i in range(processes)]
  else:
    cmds = [cmd]
  procs = []
  for i, c in enumerate(cmds):  # output to files: a full pipe would block a process
    log = f"{workdir}.{len(os.listdir(os.path.dirname(str(workdir))))}.{i}.log"
    procs.append(subprocess.Popen(c, cwd=ROOT, env=_env(devices), stdout=open(log, "w"),
                                  stderr=subprocess.STDOUT, text=True))
    procs[-1].log = log
  return procs


def _output(p: subprocess.Popen) -> str:
  return open(p.log).read()


def _finish(procs: list[subprocess.Popen], timeout: float = 400
            ) -> list[subprocess.CompletedProcess]:
  """Waits for the processes of one run; their results (stderr: the combined output)."""
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [subprocess.CompletedProcess(p.args, p.returncode, "", _output(p)) for p in procs]


def _finish_ok(procs: list[subprocess.Popen], label: str, start: float) -> None:
  """Waits for the processes of one run; each must exit 0. Prints the run's time."""
  runs = _finish(procs)
  print(f"{label}: {time.time() - start:.1f}s")
  for i, r in enumerate(runs):
    assert r.returncode == 0, f"{label}, process {i}: {r.stderr[-3000:]}"


def _losses(workdir) -> dict[tuple[str, int], float]:
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    record = json.loads(line)
    if "loss" in record:
      key = (record["stage"], record["step"])
      assert key not in out, f"{key} logged twice: only process 0 may write metrics.jsonl"
      out[key] = record["loss"]
  return out


def _max_relative_difference(a: dict, b: dict) -> float:
  return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


def _metrics(workdir) -> dict:
  return json.load(open(os.path.join(workdir, "results.json")))["models"]


def _assert_same_metrics(got: dict, expected: dict, rtol: float, atol: float) -> None:
  assert set(got) == set(expected)
  for name, entry in expected.items():
    assert set(got[name]["metrics"]) == set(entry["metrics"]), name
    for key, value in entry["metrics"].items():
      np.testing.assert_allclose(got[name]["metrics"][key], value, rtol=rtol, atol=atol,
                                 err_msg=f"{name} {key}")


def _wait_for_stage(workdir, stage: str, procs, timeout: float = 300) -> None:
  """Returns once process 0 logged a training step of `stage` (metrics.jsonl)."""
  deadline = time.time() + timeout
  path = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline:
    if os.path.exists(path) and f'"stage": "{stage}"' in open(path).read():
      return
    for p in procs:
      assert p.poll() is None, f"exited with {p.returncode} before {stage}: {_output(p)[-3000:]}"
    time.sleep(0.1)
  raise AssertionError(f"no step of {stage} within {timeout} s")


# Every stage of the tiny pipeline, with a student of each kind: feature matching with a
# transplanted head (dett), KD, KD on upsampled data, and JTT (no teacher). The other
# methods are these steps with other settings; the whole list runs in test_end_to_end.py.
PIPELINE = ["--config.log_every_steps=1", "--config.distill.methods=dett,kd,kd_up,jtt"]
PEER_TIMEOUT = 5


def test_default_pipeline_with_two_processes_of_one_and_two_devices(tmp_path):
  """Every stage of configs/tiny.py (PIPELINE): 1 process x 2 devices (the reference);
  2 processes x 1 device (the same global mesh), with process 1 killed mid-stage and both
  re-run; 2 processes x 2 devices. The 2 x 1 device run was the failing layout: the DFR
  head placed from the host onto a mesh of one device per process could not be saved."""
  one, two_by_one, two_by_two = tmp_path / "1x2", tmp_path / "2x1", tmp_path / "2x2"
  start = time.time()
  _finish_ok(_start(one, *PIPELINE, devices=2), "1 x 2 devices", start)
  expected = _metrics(one)
  stages = {"teacher_erm", "teacher_dfr", "student_dett", "student_kd", "student_kd_up",
            "student_jtt"}
  assert set(expected) == stages

  # 2 x 1: process 1 dies (SIGKILL) in the middle of a student stage.
  start = time.time()
  procs = _start(two_by_one, *PIPELINE, f"--peer_timeout={PEER_TIMEOUT}", processes=2,
                 devices=1)
  try:
    _wait_for_stage(two_by_one, "student_kd", procs)
    procs[1].kill()
    killed = time.time()
    procs[0].wait(timeout=120)
    survivor_seconds = time.time() - killed
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  err = _output(procs[0])
  print(f"2 x 1 devices until the kill: {killed - start:.1f}s; survivor exited "
        f"{survivor_seconds:.1f}s after it")
  assert procs[0].returncode == 7, err[-3000:]
  assert "peer lost: " in err, err[-3000:]
  line = err[err.rindex("peer lost: "):].splitlines()[0]
  print(line)
  assert line.startswith("peer lost: process 1 of 2 stopped responding"), line
  assert "during stage student_kd at step" in line and "re-run every process" in line, line
  assert PEER_TIMEOUT - 1 <= survivor_seconds <= PEER_TIMEOUT + 10
  assert not (two_by_one / "student_kd" / "done.json").exists()

  # Both re-run: the finished stages are kept, student_kd restarts, the rest runs.
  start = time.time()
  _finish_ok(_start(two_by_one, *PIPELINE, processes=2, devices=1), "2 x 1 devices, resumed",
             start)
  # The same global mesh as the reference: equal up to gloo's summation order.
  _assert_same_metrics(_metrics(two_by_one), expected, rtol=1e-5, atol=1e-6)

  # 2 x 2, uninterrupted: 4 devices, so sums differ from the reference's in rounding.
  start = time.time()
  _finish_ok(_start(two_by_two, *PIPELINE, processes=2, devices=2), "2 x 2 devices", start)
  _assert_same_metrics(_metrics(two_by_two), expected, rtol=1e-4, atol=1e-4)
  ref, multi = _losses(one), _losses(two_by_two)  # also: only process 0 wrote metrics.jsonl
  assert set(multi) == set(ref)
  difference = _max_relative_difference(multi, ref)
  print(f"2x2 vs 1x2 devices: max relative loss difference {difference:.2e} over "
        f"{len(multi)} steps")
  assert difference <= 1e-4
  for name in ("config.json", "identification/error_set.json", "teacher_dfr/done.json"):
    assert (two_by_two / name).exists(), name
  error_set = lambda d: json.load(open(d / "identification" / "error_set.json"))["error_set"]
  assert error_set(two_by_two) == error_set(two_by_one) == error_set(one)

  # What 2 processes saved (the DFR head included) restores onto this process's 8 devices.
  mesh = make_mesh()
  for stage in ("teacher_erm", "teacher_dfr"):
    path = str(two_by_two / stage / "final")
    stored = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    template = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                           sharding=replicated(mesh)), stored)
    restored = load_variables(path, template)
    reference_vars = load_variables(str(one / stage / "final"), template)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(reference_vars)):
      assert a.sharding == replicated(mesh)
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)


def test_settings_from_flags_and_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert distributed.settings(env={}) is None
  assert distributed.settings(env=env) == ("10.0.0.1:1234", 4, 3)
  assert distributed.settings("h:1", 2, 0, env=env) == ("h:1", 2, 0)  # flags win
  assert distributed.settings(process_id=1, env=env) == ("10.0.0.1:1234", 4, 1)
  with pytest.raises(ValueError, match="missing: num_processes"):
    distributed.settings("h:1", None, 0, env={})
  with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
    distributed.settings("h:1", 2, 2, env={})
  with pytest.raises(ValueError, match="HOST:PORT"):
    distributed.settings("h", 2, 0, env={})
  assert not distributed.initialize("off")  # a single process, whatever the environment
  assert not distributed.initialize("explicit", "h:1", 1, 0)  # one process: nothing to start


def test_bad_distributed_flags_fail_with_one_line(tmp_path):
  out = subprocess.run([sys.executable, *ARGS, f"--workdir={tmp_path}", "--num_processes=2",
                        "--process_id=0"], cwd=ROOT, env=_env(1), capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 1
  assert "missing: coordinator_address (JAX_COORDINATOR_ADDRESS)" in out.stderr
  assert not os.listdir(tmp_path)  # failed before anything was written
