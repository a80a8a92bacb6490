"""Never lose a run: bit-identical resume after SIGTERM, checkpoint integrity and fallback,
config-mismatch refusal, the divergence guard, periodic checkpoints, workdir checks."""

import glob
import json
import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from dett_jax import checkpoints
from dett_jax.experiment import train_and_evaluate
from dett_jax.sharding import make_mesh, replicate
from dett_jax.training import loop
from dett_jax.checkpoints import CheckpointMismatch, checksum
from dett_jax.training.loop import Diverged, FitSpec, Interrupted, MetricLogger, fit
from dett_jax.training.state import TrainState
from dett_jax.workdir import WorkdirError, check_workdir_writable

pytestmark = pytest.mark.slow  # left out of ./run.sh test-fast (the full suite runs it)

# ---------------------------------------------------------------------------
# The loop on a small linear model (fast): integrity, mismatch, divergence, periodic saves.
# ---------------------------------------------------------------------------

STEPS_PER_EPOCH, EPOCHS, BATCH = 4, 3, 8


def _batches(nan_at: int | None = None) -> grain.MapDataset:
  rng = np.random.default_rng(0)
  out = []
  for i in range(STEPS_PER_EPOCH * EPOCHS):
    x = rng.normal(size=(BATCH, 5)).astype(np.float32)
    if i == nan_at:
      x[3, 2] = np.nan
    out.append({"x": x, "y": (x @ np.arange(5.0)).astype(np.float32)})
  return grain.MapDataset.source(out)


def _setup(width: int = 5):
  mesh = make_mesh(-1)
  tx = optax.sgd(0.01)

  def step(state, batch, frozen):
    del frozen

    def loss_fn(params):
      pred = batch["x"] @ params["w"][:5] + params["b"]
      return jnp.mean(jnp.square(pred - batch["y"]))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    ok = jnp.isfinite(loss) & jnp.all(jnp.isfinite(grads["w"]))
    params = jax.tree.map(lambda n, o: jnp.where(ok, n, o),
                          optax.apply_updates(state.params, updates), state.params)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "nonfinite_loss": 1.0 - jnp.isfinite(loss).astype(jnp.float32),
               "nonfinite_grad": 1.0 - jnp.all(jnp.isfinite(grads["w"])).astype(jnp.float32)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  params = {"w": jnp.zeros((width,)), "b": jnp.zeros(())}
  state = replicate(TrainState.create(params, {}, tx), mesh)
  return state, jax.jit(step), mesh


def _fit(stage_dir, *, nan_at=None, width=5, signature=None, **spec_fields):
  state, step, mesh = _setup(width)
  spec = FitSpec(name="toy", stage_dir=str(stage_dir), num_epochs=EPOCHS,
                 steps_per_epoch=STEPS_PER_EPOCH, data=_batches(nan_at), log_every_steps=2,
                 keep_checkpoints=3, signature=signature or {"method": "dett"}, **spec_fields)
  return fit(spec, state, step, {}, mesh, MetricLogger(str(stage_dir)))


def _steps(stage_dir) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(stage_dir, "checkpoints")) if d.isdigit())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  return _fit(tmp_path_factory.mktemp("straight"))


@pytest.mark.parametrize("damage", ["delete", "overwrite", "meta"])
def test_corrupted_latest_checkpoint_is_set_aside_and_the_previous_one_used(
    tmp_path, straight, damage, caplog):
  with pytest.raises(Interrupted):
    _fit(tmp_path, stop_after_steps=2 * STEPS_PER_EPOCH)
  assert _steps(tmp_path) == [4, 8]
  latest = os.path.join(tmp_path, "checkpoints", "8")
  if damage == "meta":
    files = [os.path.join(latest, "meta", "metadata")]
  else:
    files = [f for f in glob.glob(os.path.join(latest, "state", "**", "*"), recursive=True)
             if os.path.isfile(f) and "d/" in f.replace(os.sep, "/")]
  assert files, os.listdir(latest)
  for f in files:
    if damage == "delete":
      os.remove(f)
    else:  # same size, other bytes: the files still decode, so only the checksum can tell
      size = os.path.getsize(f)
      with open(f, "r+b") as fh:
        data = bytearray(fh.read())
        for i in range(0, size, 7):
          data[i] ^= 0x5A
        fh.seek(0)
        fh.write(bytes(data))
  best, summary = _fit(tmp_path)
  assert "checkpoints/8" in caplog.text and "unusable" in caplog.text
  aside = os.listdir(os.path.join(tmp_path, "corrupt_checkpoints"))
  assert len(aside) == 1 and aside[0].startswith("8-")  # moved aside, not deleted
  for a, b in zip(jax.tree.leaves(best), jax.tree.leaves(straight[0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # resumed from step 4: same result
  assert summary["history"] == straight[1]["history"]


def test_half_written_checkpoint_is_never_taken_as_complete(tmp_path, straight):
  with pytest.raises(Interrupted):
    _fit(tmp_path, stop_after_steps=STEPS_PER_EPOCH)
  # What a save killed mid-write leaves: Orbax writes into a temporary directory and
  # renames it to the step number only once every file is there.
  partial = os.path.join(tmp_path, "checkpoints", "8.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "junk"), "w") as f:
    f.write("half")
  best, _ = _fit(tmp_path)
  for a, b in zip(jax.tree.leaves(best), jax.tree.leaves(straight[0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))



def test_leftovers_of_a_killed_save_are_removed_and_the_stage_resumes(tmp_path, straight, caplog):
  with pytest.raises(Interrupted):
    _fit(tmp_path, stop_after_steps=STEPS_PER_EPOCH)
  # What SIGKILL mid-save leaves: Orbax 0.12 writes step 8 into "8.orbax-checkpoint-tmp"
  # (older versions append "-<timestamp>"), its items likewise, and renames it when done.
  leftovers = [os.path.join(tmp_path, "checkpoints", "8.orbax-checkpoint-tmp"),
               os.path.join(tmp_path, "checkpoints", "12.orbax-checkpoint-tmp-1234567"),
               os.path.join(tmp_path, "final.orbax-checkpoint-tmp")]
  for leftover in leftovers:
    os.makedirs(os.path.join(leftover, "state.orbax-checkpoint-tmp"))
    with open(os.path.join(leftover, "state.orbax-checkpoint-tmp", "junk"), "w") as f:
      f.write("half")
  with pytest.raises(Interrupted, match=r"stopped at step 6 of 12"):  # resumed from step 4
    _fit(tmp_path, stop_after_steps=2)
  assert not any(os.path.exists(p) for p in leftovers)
  assert all(p in caplog.text for p in leftovers) and "half-written" in caplog.text
  assert _steps(tmp_path) == [4, 6]  # the finished checkpoint is kept
  best, summary = _fit(tmp_path)
  for a, b in zip(jax.tree.leaves(best), jax.tree.leaves(straight[0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert summary["history"] == straight[1]["history"]


def test_checkpoint_of_another_config_is_refused_naming_the_fields(tmp_path):
  with pytest.raises(Interrupted):
    _fit(tmp_path, stop_after_steps=STEPS_PER_EPOCH)
  before = sorted(os.listdir(os.path.join(tmp_path, "checkpoints")))
  with pytest.raises(CheckpointMismatch, match=r"method: dett -> kd"):
    _fit(tmp_path, signature={"method": "kd"})
  with pytest.raises(CheckpointMismatch, match=r"state/params/w: float32\[5\] -> float32\[7\]"):
    _fit(tmp_path, width=7)
  assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == before  # left intact


def test_nonfinite_loss_stops_with_step_metric_and_last_good_checkpoint(tmp_path):
  bad = STEPS_PER_EPOCH + 2  # 0-based batch index: the 7th step
  with pytest.raises(Diverged) as info:
    _fit(tmp_path, nan_at=bad)
  message = str(info.value)
  assert "non-finite loss" in message and f"at step {bad + 1} of 12" in message
  assert os.path.join(str(tmp_path), "checkpoints", "4") in message
  assert _steps(tmp_path) == [4]  # nothing saved after the bad step


def test_nonfinite_steps_can_be_skipped_and_counted(tmp_path, straight):
  best, summary = _fit(tmp_path, nan_at=5, on_nonfinite="skip")
  assert summary["skipped_steps"] == [6]
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(best))
  logged = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert logged[-1]["skipped_steps"] == 1.0 and np.isfinite(logged[-1]["loss"])


def test_checkpoints_by_wall_clock_minutes(tmp_path, monkeypatch):
  clock = {"t": 1000.0}
  monkeypatch.setattr(loop, "_now", lambda: clock["t"])
  original = loop.shard_batch

  def tick(batch, mesh):  # each step takes 10 simulated minutes
    clock["t"] += 600.0
    return original(batch, mesh)

  monkeypatch.setattr(loop, "shard_batch", tick)
  with pytest.raises(Interrupted):
    _fit(tmp_path, stop_after_steps=6, checkpoint_every_minutes=15.0)
  # epoch end at 4, and every sync point (log every 2 steps) 15+ minutes after the last save
  assert _steps(tmp_path) == [2, 4, 6]


def test_checksum_sees_every_bit_and_ignores_sharding():
  x = {"a": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones((2,), jnp.int32)}
  flipped = {"a": x["a"].at[1, 2].set(np.nextafter(np.float32(6.0), np.float32(7.0))), "b": x["b"]}
  swapped = {"a": x["a"][::-1], "b": x["b"]}
  assert checksum(x) != checksum(flipped) != checksum(swapped)
  mesh = make_mesh(-1)
  sharded = jax.device_put(x["a"].reshape(12, 1).repeat(8, 1)[:8],
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  assert checksum(sharded) == checksum(np.asarray(sharded))


# ---------------------------------------------------------------------------
# The pipeline: SIGTERM at two points, resume, bit-identical results and parameters.
# ---------------------------------------------------------------------------

def _final_params(workdir: str) -> dict[str, list[np.ndarray]]:
  out = {}
  for final in sorted(glob.glob(os.path.join(workdir, "*", "final"))):
    tree = checkpoints._restore_numpy(final)
    out[os.path.basename(os.path.dirname(final))] = jax.tree.leaves(tree)
  return out


def test_killed_twice_with_sigterm_resumes_to_bit_identical_results(tmp_path, monkeypatch):
  overrides = {"distill.methods": "dett", "pretrain.enabled": False}
  straight = train_and_evaluate(tiny_config(**overrides), str(tmp_path / "straight"))
  workdir = str(tmp_path / "killed")
  original = loop.shard_batch
  # Training steps counted from each (re)start; tiny: 6 steps per stage. Kill 1: step 3 of
  # the ERM teacher (mid-epoch); kill 2, after resuming: step 5 of the run, i.e. the 2nd
  # step of identification (teacher_erm's last 3 steps come first).
  for kill_at, stage in ((3, "teacher_erm"), (5, "identification")):
    calls = {"n": 0}

    def killing(batch, mesh, kill_at=kill_at):
      calls["n"] += 1
      if calls["n"] == kill_at:
        signal.raise_signal(signal.SIGTERM)  # the real handler: finish the step, checkpoint
      return original(batch, mesh)

    monkeypatch.setattr(loop, "shard_batch", killing)
    with pytest.raises(Interrupted, match=rf"stage {stage} stopped at step \d+ of 6 \(signal 15\)"):
      train_and_evaluate(tiny_config(**overrides), workdir)
  monkeypatch.setattr(loop, "shard_batch", original)
  resumed = train_and_evaluate(tiny_config(**overrides), workdir)
  for name, entry in straight["models"].items():
    assert resumed["models"][name]["metrics"] == entry["metrics"], name  # bit-identical
  with open(os.path.join(workdir, "results.json")) as f, \
       open(os.path.join(tmp_path, "straight", "results.json")) as g:
    assert json.load(f)["models"] == json.load(g)["models"]
  a, b = _final_params(str(tmp_path / "straight")), _final_params(workdir)
  assert a.keys() == b.keys() and len(a) >= 3
  for stage in a:
    for x, y in zip(a[stage], b[stage]):
      np.testing.assert_array_equal(x, y, err_msg=stage)
  assert sorted(os.listdir(tmp_path)) == ["killed", "straight"]  # nothing written elsewhere


# ---------------------------------------------------------------------------
# Storage.
# ---------------------------------------------------------------------------

def test_unwritable_or_full_workdir_fails_early_with_the_path(tmp_path, monkeypatch):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(WorkdirError, match=r"cannot create workdir .*a_file/run.*writable"):
    check_workdir_writable(str(blocker / "run"), 1)
  import shutil
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=5 * 2**20))
  with pytest.raises(WorkdirError, match=r"5 MB free, less than min_free_mb=100"):
    train_and_evaluate(tiny_config(), str(tmp_path / "run"))
  assert os.listdir(tmp_path / "run") == []  # the probe is removed, nothing else written


def test_selection_breaks_worst_group_ties_by_the_tie_metric(tmp_path):
  """Epochs equal in the selection metric (worst group 0.0 after each of the 3 epochs) are
  told apart by `tie_metric`: the last epoch, with the highest average, is selected;
  without a tie metric the first one stays."""
  evaluations = iter([{"val/worst_group_acc": 0.0, "val/avg_acc": 0.33},
                      {"val/worst_group_acc": 0.0, "val/avg_acc": 0.30},
                      {"val/worst_group_acc": 0.0, "val/avg_acc": 0.80}] * 2)
  fields = dict(evaluate=lambda variables: next(evaluations),
                select_metric="val/worst_group_acc")
  _, summary = _fit(tmp_path / "tie", tie_metric="val/avg_acc", **fields)
  assert summary["selection"]["epoch"] == 3  # epochs count from 1
  _, summary = _fit(tmp_path / "no_tie", **fields)
  assert summary["selection"]["epoch"] == 1
