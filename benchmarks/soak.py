"""Soak test: kill the pipeline with SIGTERM at random moments, resume, compare results.

  python benchmarks/soak.py --kills 10
  python benchmarks/soak.py --kills 3 --config configs/tiny.py --set distill.methods=dett

Runs `train.py` once uninterrupted (the reference; it also fills the compilation cache),
once more uninterrupted in another workdir to time a run as the restarts see it (with the
cache; its results are compared too), then the same command in a third workdir, sending it
SIGTERM after a random delay and restarting it after each kill until `--kills` kills have
landed, then lets it finish. Prints, for every kill, the delay, the exit code and the
stage/step it stopped at, then the number of kills landed and survived and whether the
final `results.json` metrics equal the reference's exactly. Exit status 0 only when all
kills landed, all were survived and all results match.

Delay rule (so that the kills fit in the run on any machine speed): with T the length of
the timed uninterrupted run and S its start-up (from the process start until its workdir
appeared), each delay, counted from a start of the process, is

  delay = scale * (S + u * (T - S) / (kills + 1)),   u ~ uniform(0.5, 1), seeded by --seed

so each start gets past start-up and then runs for at most 1/(kills + 1) of the pipeline,
and all kills together cover at most about kills/(kills + 1) of it. `--min_delay` and
`--max_delay` (seconds), when given, replace the measured range: delay = scale *
uniform(min_delay, max_delay). `scale` starts at 1.

A kill lands when the SIGTERM reaches a live, unfinished run. One that arrives after the
run has finished (exit code 0: the restarts went faster than the timed run) does not
count: that run's results are compared with the reference too, `scale` is halved, and the
killed run starts again from scratch in a fresh workdir (killed_2, killed_3, ...), where
the remaining kills are made. Halving guarantees that kills land eventually (at worst
during start-up).

A landed kill is survived when the process exits with train.py's "interrupted" code (3:
the step in progress was checkpointed, or the stage in progress finished), or is ended by
the signal during start-up (before the pipeline installs its handler), and the next start
resumes. Each process uses a persistent compilation cache in the soak workdir, so restarts
do not recompile.
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
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_INTERRUPTED = 3
MAX_MISSES = 30  # kills that arrive after the run finished, before giving up


def command(args, workdir: str) -> list[str]:
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={args.config}",
         f"--workdir={workdir}"]
  return cmd + [f"--config.{item}" for item in args.set]


def environment(args) -> dict[str, str]:
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.workdir, "jit_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  return env


def run_to_end(cmd: list[str], env: dict[str, str], log: str,
               workdir: str | None = None) -> tuple[float, float]:
  """Runs `cmd` to the end; (seconds in all, seconds until `workdir` appeared, 0 if never)."""
  start, startup = time.time(), 0.0
  with open(log, "a") as out:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    while proc.poll() is None:
      if workdir and not startup and os.path.exists(workdir):
        startup = time.time() - start
      time.sleep(0.05)
    code = proc.returncode
  if code != 0:
    raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}; see {log}")
  return time.time() - start, startup


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


def delay_drawer(seconds: float, startup: float, kills: int, rng: random.Random,
                 min_delay: float | None = None,
                 max_delay: float | None = None) -> tuple[Callable[[float], float], str]:
  """(draw(scale) -> seconds, the rule in words) per the module docstring's delay rule."""
  if min_delay is not None or max_delay is not None:
    lo = min_delay if min_delay is not None else 0.0
    hi = max(lo, max_delay if max_delay is not None else lo)
    return (lambda scale: scale * rng.uniform(lo, hi)), f"{lo:.1f}-{hi:.1f} s (given)"
  startup = min(max(startup, 0.0), seconds)
  span = (seconds - startup) / (kills + 1)
  rule = (f"{startup + 0.5 * span:.1f}-{startup + span:.1f} s (start-up {startup:.1f} s + "
          f"0.5-1 x (run - start-up) / (kills + 1))")
  return (lambda scale: scale * (startup + rng.uniform(0.5, 1.0) * span)), rule


def results(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)["models"]


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


def kill_until_landed(make_cmd: Callable[[str], list[str]], env: dict[str, str], kills: int,
                      draw: Callable[[float], float], root: str, log: str,
                      reference: dict | None = None,
                      say: Callable[[str], None] = lambda line: print(line, flush=True)) -> dict:
  """Kills runs of make_cmd(workdir) until `kills` kills landed on a live, unfinished run
  (see the module docstring), then runs the last workdir to the end. Returns landed,
  survived, missed (kills after the run finished), workdirs (all used, the last one the
  finished resumed run) and diffs (vs `reference`, over every workdir that finished)."""
  landed = survived = missed = 0
  scale, workdirs, diffs = 1.0, [os.path.join(root, "killed")], []

  def check(workdir):
    if reference is not None:
      diffs.extend(f"{os.path.basename(workdir)}: {d}" for d in compare(reference, results(workdir)))

  while landed < kills:
    delay = draw(scale)
    code, where = kill_once(make_cmd(workdirs[-1]), env, delay, log)
    if code == 0:
      missed += 1
      check(workdirs[-1])
      if missed > MAX_MISSES:
        say(f"kill {landed + 1}: the run finished within {delay:.2f} s again; giving up "
            f"after {missed} kills that came too late")
        return dict(landed=landed, survived=survived, missed=missed, workdirs=workdirs,
                    diffs=diffs)
      workdirs.append(os.path.join(root, f"killed_{len(workdirs) + 1}"))
      scale /= 2
      say(f"kill {landed + 1}: the run finished within {delay:.1f} s, before the signal "
          f"(not counted); starting again from scratch in {os.path.basename(workdirs[-1])} "
          f"with delays halved")
      continue
    landed += 1
    ok = code in (EXIT_INTERRUPTED, -signal.SIGTERM)
    survived += ok
    say(f"kill {landed}: SIGTERM after {delay:.1f} s, exit code {code}"
        + (f", stopped at {where}" if where else
           " (ended by the signal during start-up, before the pipeline ran)"
           if code == -signal.SIGTERM else "")
        + ("" if ok else "  <-- unexpected"))
  run_to_end(make_cmd(workdirs[-1]), env, log)
  check(workdirs[-1])
  return dict(landed=landed, survived=survived, missed=missed, workdirs=workdirs, diffs=diffs)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kills", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--set", action="append", default=[],
                      help="config override FIELD=VALUE (repeatable), e.g. distill.methods=dett")
  parser.add_argument("--workdir", default="runs/soak", help="emptied first")
  parser.add_argument("--min_delay", type=float, default=None,
                      help="seconds; with --max_delay, replaces the delays drawn from the "
                           "measured run length (see the delay rule above)")
  parser.add_argument("--max_delay", type=float, default=None, help="seconds; see --min_delay")
  args = parser.parse_args()
  if args.kills < 0:
    parser.error("--kills must be >= 0")
  args.workdir = os.path.abspath(args.workdir)
  if os.path.exists(args.workdir):
    if not os.path.exists(os.path.join(args.workdir, "soak.log")):
      raise SystemExit(f"{args.workdir} exists and is not a soak workdir; choose another --workdir")
    shutil.rmtree(args.workdir)
  os.makedirs(args.workdir)
  log = os.path.join(args.workdir, "soak.log")
  open(log, "a").close()
  env = environment(args)
  rng = random.Random(args.seed)

  straight_dir, warm_dir = (os.path.join(args.workdir, d) for d in ("straight", "warm"))
  cold, _ = run_to_end(command(args, straight_dir), env, log)
  reference = results(straight_dir)
  print(f"uninterrupted run: {cold:.0f} s", flush=True)
  seconds, startup = run_to_end(command(args, warm_dir), env, log, workdir=warm_dir)
  warm_diffs = [f"warm: {d}" for d in compare(reference, results(warm_dir))]
  draw, rule = delay_drawer(seconds, startup, args.kills, rng, args.min_delay, args.max_delay)
  print(f"again, with the compilation cache: {seconds:.0f} s"
        + (" (results differ)" if warm_diffs else "") + f"; kill delays {rule}", flush=True)

  start = time.time()
  out = kill_until_landed(lambda d: command(args, d), env, args.kills, draw, args.workdir, log,
                          reference=reference)
  out["diffs"] = warm_diffs + out["diffs"]
  print(f"killed run: {time.time() - start:.0f} s in all"
        + (f", {len(out['workdirs'])} runs from scratch" if len(out["workdirs"]) > 1 else ""),
        flush=True)
  print(f"kills landed: {out['landed']}/{args.kills}"
        + (f" ({out['missed']} more arrived after the run had finished and did not count)"
           if out["missed"] else ""))
  print(f"kills survived: {out['survived']}/{args.kills}")
  print("results identical to the uninterrupted run: " + ("yes" if not out["diffs"] else
                                                          "NO: " + "; ".join(out["diffs"])))
  ok = out["landed"] == out["survived"] == args.kills and not out["diffs"]
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
