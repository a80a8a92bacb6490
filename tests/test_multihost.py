"""Multi-process runs: 2 processes x 4 CPU devices (gloo collectives on 127.0.0.1) train
as 1 process x 8 devices does, and their checkpoints resume in a 1-process run.

The losses are not bit-identical: gloo sums the gradients across processes in another
order than XLA does within one process, so they differ by about one float32 rounding
(1.3-1.9e-7 relative measured over every step, AdamW included); the bound is 1e-6.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The cheapest pipeline that trains a DeTT student (the error set needs the
# identification stage); every step's loss goes to metrics.jsonl.
ARGS = ["train.py", "--config=configs/tiny.py", "--config.pretrain.enabled=False",
        "--config.distill.methods=dett", "--config.teacher.dfr=False",
        "--config.distill.teacher=erm", "--config.log_every_steps=1"]
STOP = 6  # each stage stops after 6 steps: identification (6 steps) finishes, student_dett
          # (8 steps with upsampling) stops mid-epoch


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
  return [subprocess.Popen(c, cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for c in cmds]


def _finish(procs: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
  """Waits for the processes of one run; their results."""
  try:
    outs = [p.communicate(timeout=400) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


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


def test_two_processes_train_as_one_and_their_checkpoints_resume_in_one(tmp_path):
  two, one = tmp_path / "two", tmp_path / "one"
  start = time.time()
  reference = _finish(_start(one))[0]
  assert reference.returncode == 0, reference.stderr[-3000:]
  print(f"1 x 8 devices: {time.time() - start:.1f}s")
  # The 2-process run distils the reference run's ERM teacher (restored from 1 process
  # onto 2), then trains the identification model and the DeTT student itself.
  teacher = f"--config.teacher.checkpoint={one / 'teacher_erm' / 'final'}"
  start = time.time()
  stopped = _finish(_start(two, teacher, f"--config.stop_after_steps={STOP}", processes=2,
                           devices=4))
  print(f"2 x 4 devices, stopped: {time.time() - start:.1f}s")
  for i, r in enumerate(stopped):
    assert r.returncode == 3, f"process {i}: {r.stderr[-3000:]}"
    assert f"stage student_dett stopped at step {STOP} of" in r.stderr

  # The same losses at every step of every stage (to rounding in the cross-process sums).
  ref, multi = _losses(one), _losses(two)
  assert {s for s, _ in multi} == {"identification", "student_dett"}
  assert sorted(k for k in multi if k[0] == "student_dett") == [
      ("student_dett", s) for s in range(1, STOP + 1)]
  difference = _max_relative_difference(multi, ref)
  print(f"2x4 vs 1x8 devices: max relative loss difference {difference:.2e} over "
        f"{len(multi)} steps")
  assert difference <= 1e-6
  # Process 0 wrote the files, once; the error sets agree.
  for name in ("config.json", "identification/error_set.json", "teacher_erm/done.json"):
    assert (two / name).exists(), name
  error_set = lambda d: json.load(open(d / "identification" / "error_set.json"))["error_set"]
  assert error_set(two) == error_set(one)

  # The teacher, restored from 1 process onto 2 and saved again by both, restores onto this
  # process's 8-device mesh bit for bit.
  mesh = make_mesh()
  path = str(two / "teacher_erm" / "final")
  stored = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
  template = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                         sharding=replicated(mesh)), stored)
  restored = load_variables(path, template)
  expected = load_variables(str(one / "teacher_erm" / "final"), template)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    assert a.sharding == replicated(mesh)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # 1 process resumes the 2-process run mid-stage (Orbax state + finished stages) and ends
  # as the uninterrupted 1-process run did.
  start = time.time()
  resumed = _finish(_start(two, teacher))[0]
  print(f"1 x 8 devices, resumed: {time.time() - start:.1f}s")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  after = _losses(two)
  assert sorted(k for k in after if k[0] == "student_dett" and k[1] > STOP) == sorted(
      k for k in ref if k[0] == "student_dett" and k[1] > STOP)
  assert _max_relative_difference(after, ref) <= 1e-6
  final = json.load(open(two / "results.json"))["models"]
  expected = json.load(open(one / "results.json"))["models"]
  assert set(final) == set(expected) == {"teacher_erm", "student_dett"}
  for name, entry in expected.items():
    for key, value in entry["metrics"].items():
      np.testing.assert_allclose(final[name]["metrics"][key], value, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{name} {key}")


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
