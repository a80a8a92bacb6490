"""What `train.py` prints: a quiet console by default, library INFO records with -v 0."""

import os
import re
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSL_INFO = re.compile(r"^I\d{4} \d\d:\d\d:\d\d")  # absl's INFO prefix, e.g. "I1130 00:25:45.86"
ORBAX = ("checkpoint_manager.py", "async_checkpointer.py", "checkpointer.py", "orbax")


def train_py(workdir, *flags: str) -> tuple[str, str]:
  cmd = [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
         "--config.pretrain.enabled=False", "--config.distill.methods=dett", *flags]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout, result.stderr


def console_lines(text: str) -> list[str]:
  """The lines a terminal keeps: progress-bar redraws (tqdm, separated by \\r) and the
  blanks they leave when cleared are not counted."""
  lines = re.split(r"[\r\n]", text)
  return [l for l in lines if l.strip() and not re.search(r"%\||step/s|it/s", l)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("console")
  quiet = train_py(workdir)
  # The same command again, verbose: every stage is done, so it only loads checkpoints
  # (Orbax INFO records) and prints the same results.
  verbose = train_py(workdir, "--verbosity=0")
  return workdir, quiet, verbose


def test_default_console_is_quiet(runs):
  workdir, (stdout, stderr), _ = runs
  lines = console_lines(stdout + "\n" + stderr)
  assert not [l for l in lines if ABSL_INFO.match(l) or any(o in l for o in ORBAX)], lines
  assert len(lines) <= 60, "\n".join(lines)
  out = stdout.splitlines()
  for stage in ("teacher_erm", "teacher_dfr", "identification", "student_dett"):
    line = [l for l in out if l.startswith(f"stage {stage}: ")]
    assert len(line) == 1, out  # one line per finished stage, with its time
    assert re.match(rf"stage {stage}: \d+(\.\d)? s\b", line[0]), line
  assert "val worst group" in [l for l in out if l.startswith("stage student_dett:")][0]
  # report.md's main table, its rows aligned, then the paths of what the run wrote.
  header = [l for l in out if l.startswith("| model ")]
  assert len(header) == 1 and "test worst group" in header[0] and "val worst group" in header[0]
  for model in ("teacher_erm", "teacher_dfr", "student_dett"):
    assert any(l.startswith(f"| {model} ") for l in out), model
  assert f"report: {os.path.join(workdir, 'report.md')}" in out
  assert any(l.startswith(f"plots in {workdir}: groups.png") for l in out), out
  assert any(l.startswith(f"TensorBoard: {os.path.join(workdir, 'tensorboard')}") for l in out)
  # Warnings still show (this config starts from random weights).
  assert any(l.startswith("W") and "no pretraining" in l for l in stderr.splitlines()), stderr


def test_verbosity_flag_shows_library_info_records(runs):
  _, _, (stdout, stderr) = runs
  info = [l for l in stderr.splitlines() if ABSL_INFO.match(l)]
  assert any(any(o in l for o in ORBAX) for l in info), stderr[-3000:]
  out = stdout.splitlines()
  assert any(l.startswith("stage student_dett: done earlier") for l in out), out
  assert any(l.startswith("| student_dett ") for l in out), out
