"""Soak test: kill the pipeline with SIGTERM at random moments, resume, compare results.

  python benchmarks/soak.py --kills 10
  python benchmarks/soak.py --kills 3 --config configs/tiny.py --set distill.methods=dett

Runs `train.py` once uninterrupted (the reference), then the same command in another
workdir, sending it SIGTERM after a random delay (seeded, `--min_delay`..`--max_delay`
seconds after each start) `--kills` times and restarting it after each kill, then lets it
finish. Prints, for every kill, the delay, the exit code and the stage/step it stopped
at, then the number of kills survived and whether the final `results.json` metrics equal
the reference's exactly. Exit status 0 only when all kills were survived and the results
match.

A kill is survived when the process exits with train.py's "interrupted" code (3: the
step in progress was checkpointed, or the stage in progress finished), or is ended by the
signal during start-up (before the pipeline installs its handler), and the next start
resumes. Each process uses a persistent compilation cache in the soak
workdir, so restarts do not recompile.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_INTERRUPTED = 3


def command(args, workdir: str) -> list[str]:
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={args.config}",
         f"--workdir={workdir}"]
  return cmd + [f"--config.{item}" for item in args.set]


def environment(args) -> dict[str, str]:
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.workdir, "jit_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  return env


def run_to_end(cmd: list[str], env: dict[str, str], log: str) -> float:
  start = time.time()
  with open(log, "a") as out:
    code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
  if code != 0:
    raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}; see {log}")
  return time.time() - start


def stopped_at(log: str) -> str:
  """Where the last 'interrupted:' line in `log` says the run stopped, or ''."""
  with open(log) as f:
    lines = [l for l in f if l.startswith("interrupted:")]
  if not lines:
    return ""
  m = re.search(r"stage (\S+) stopped at step (\d+ of \d+)", lines[-1])
  if m:
    return f"{m.group(1)} step {m.group(2)} (checkpointed)"
  m = re.search(r"stopped before stage (\S+)", lines[-1])
  return f"the start of stage {m.group(1)}" if m else lines[-1].strip()


def kill_once(cmd: list[str], env: dict[str, str], delay: float, log: str) -> tuple[int, str]:
  """Starts `cmd`, sends SIGTERM after `delay` seconds (if still running); (exit code, where)."""
  with open(log, "a") as out:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
      proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGTERM)
    code = proc.wait()
  return code, stopped_at(log) if code == EXIT_INTERRUPTED else ""


def compare(reference: dict, other: dict) -> list[str]:
  """Metrics that differ between two results.json 'models' entries ([] when identical)."""
  diffs = []
  for name in sorted(set(reference) | set(other)):
    a = reference.get(name, {}).get("metrics")
    b = other.get(name, {}).get("metrics")
    if a != b:
      keys = sorted(k for k in set(a or {}) | set(b or {}) if (a or {}).get(k) != (b or {}).get(k))
      diffs.append(f"{name}: {', '.join(keys[:5]) or 'missing'}")
  return diffs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kills", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--set", action="append", default=[],
                      help="config override FIELD=VALUE (repeatable), e.g. distill.methods=dett")
  parser.add_argument("--workdir", default="runs/soak", help="emptied first")
  parser.add_argument("--min_delay", type=float, default=3.0)
  parser.add_argument("--max_delay", type=float, default=12.0)
  args = parser.parse_args()
  args.workdir = os.path.abspath(args.workdir)
  if os.path.exists(args.workdir):
    if not os.path.exists(os.path.join(args.workdir, "soak.log")):
      raise SystemExit(f"{args.workdir} exists and is not a soak workdir; choose another --workdir")
    shutil.rmtree(args.workdir)
  os.makedirs(args.workdir)
  log = os.path.join(args.workdir, "soak.log")
  env = environment(args)
  rng = random.Random(args.seed)

  straight_dir, killed_dir = (os.path.join(args.workdir, d) for d in ("straight", "killed"))
  seconds = run_to_end(command(args, straight_dir), env, log)
  print(f"uninterrupted run: {seconds:.0f} s", flush=True)

  survived, start = 0, time.time()
  for k in range(args.kills):
    delay = rng.uniform(args.min_delay, args.max_delay)
    code, where = kill_once(command(args, killed_dir), env, delay, log)
    if code == 0:
      print(f"kill {k + 1}: the run finished within {delay:.1f} s; no more kills possible")
      break
    ok = code in (EXIT_INTERRUPTED, -signal.SIGTERM)
    survived += ok
    print(f"kill {k + 1}: SIGTERM after {delay:.1f} s, exit code {code}"
          + (f", stopped at {where}" if where else
             " (ended by the signal during start-up, before the pipeline ran)")
          + ("" if ok else "  <-- unexpected"), flush=True)
  run_to_end(command(args, killed_dir), env, log)
  print(f"killed run: {time.time() - start:.0f} s in all")

  with open(os.path.join(straight_dir, "results.json")) as f:
    reference = json.load(f)["models"]
  with open(os.path.join(killed_dir, "results.json")) as f:
    resumed = json.load(f)["models"]
  diffs = compare(reference, resumed)
  print(f"kills survived: {survived}/{args.kills}")
  print("results identical to the uninterrupted run: " + ("yes" if not diffs else
                                                          "NO: " + "; ".join(diffs)))
  sys.exit(0 if survived == args.kills and not diffs else 1)


if __name__ == "__main__":
  main()
