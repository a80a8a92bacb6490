"""The text path end to end: CivilComments / MultiNLI / text metadata.csv folders through
the configs' `:cpu` settings, the sharded text step equal to 1 device, exact mid-epoch
resume of a text stage, and a bfloat16 text step. Tiny sizes: hidden 32, 1-2 layers,
16-24 tokens, 1 epoch per stage."""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from conftest import ROOT, load_config, override
from dett_jax import checkpoints, methods
from dett_jax.data.tokenize import Tokenize
from dett_jax.experiment import setup_context, train_and_evaluate
from dett_jax.methods import Models, Setup
from dett_jax.models.bert import TextModelConfig, create_text_model
from dett_jax.models.projector import Projector
from dett_jax.sharding import make_mesh, place, shard_batch
from dett_jax.stages.builders import init_model
from dett_jax.training.loop import Interrupted
from dett_jax.training.state import TrainState
from dett_jax.training.steps import jit_train_step, make_train_step

sys.path.insert(0, str(ROOT / "benchmarks"))
import make_text_data  # noqa: E402

pytestmark = pytest.mark.slow  # left out of ./run.sh test-fast (the full suite runs it)



# ---------------------------------------------------------------------------
# Generated data folders, each with a vocab.txt of its own words.
# ---------------------------------------------------------------------------

def civilcomments_folder(folder: str, size: int = 160) -> str:
  rows = make_text_data.civilcomments_rows(size, seed=0)
  make_text_data.make_civilcomments_csv(folder, rows)
  make_text_data.write_vocab(folder, rows)
  return folder


def multinli_folder(folder: str, size: int = 192) -> str:
  rows = make_text_data.multinli_rows(size, seed=0)
  make_text_data.make_multinli_jsonl(folder, rows)  # folder/multinli_1.0/*.jsonl
  make_text_data.write_vocab(folder, rows)
  return folder


def text_csv_folder(folder: str, size: int = 160) -> str:
  rows = make_text_data.text_metadata_rows(size, seed=0, pairs=True)
  make_text_data.make_text_metadata(folder, rows, pairs=True)
  make_text_data.write_vocab(folder, rows)
  return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  base = tmp_path_factory.mktemp("text_data")
  return {"civilcomments": civilcomments_folder(str(base / "civilcomments")),
          "multinli": multinli_folder(str(base / "multinli")),
          "text_csv": text_csv_folder(str(base / "text_csv"))}


def cpu_config(name: str, root: str, **overrides) -> ml_collections.ConfigDict:
  """`configs/<name>.py:cpu` on `root`, shrunk further: hidden 32, 1 layer, 16-24 tokens,
  1 epoch per stage, batch 16 (divisible by the 8 simulated devices)."""
  config = load_config(name, "cpu")
  for role in ("teacher", "student"):
    config[role].update(layers=1, hidden=32, heads=2, mlp_dim=64, max_positions=32)
  for optim in (config.teacher.optim, config.identification, config.distill.optim):
    optim.epochs = 1
  fields = {"data.root": root, "data.max_length": 24 if name == "multinli" else 16,
            "batch_size": 16, "eval_batch_size": 64, "teacher.dfr_num_refits": 2,
            "teacher.dfr_c_grid": (1.0, 0.1), "log_every_steps": 1}
  return override(config, **{**fields, **overrides})


# ---------------------------------------------------------------------------
# CivilComments end to end: ERM and DFR teachers, DeTT and KD students.
# ---------------------------------------------------------------------------

def test_civilcomments_cpu_config_runs_every_stage(folders, tmp_path):
  config = cpu_config("civilcomments", folders["civilcomments"],
                      **{"distill.methods": "dett,kd", "teacher.debias": "dfr"})
  results = train_and_evaluate(config, str(tmp_path))
  names = {"teacher_erm", "teacher_dfr", "student_dett", "student_kd"}
  assert set(results["models"]) == names
  for name in names:
    m = results["models"][name]["metrics"]
    assert 0.0 <= m["test/worst_group_acc"] <= m["test/avg_acc"] + 1e-9 <= 1.0 + 1e-9, name
    assert sum(k.startswith("test/acc/group_") for k in m) == 4, name
  with open(tmp_path / "results.json") as f:
    on_disk = json.load(f)
  assert on_disk["config"]["data"]["name"] == "civilcomments"
  assert on_disk["config"]["teacher"]["arch"] == "bert"
  assert on_disk["config"]["student"]["arch"] == "distilbert"
  report = (tmp_path / "report.md").read_text()
  assert "student_dett" in report and "teacher_dfr" in report
  error_set = json.loads((tmp_path / "identification" / "error_set.json").read_text())
  assert error_set["train_size"] == 96  # 60% of 160


# ---------------------------------------------------------------------------
# MultiNLI and text metadata.csv: the data loads, tokenises, and one stage trains.
# ---------------------------------------------------------------------------

ERM_ONLY = {"distill.methods": "", "teacher.debias": "", "distill.teacher": "erm"}


def check_context(ctx, num_classes: int, max_length: int) -> None:
  assert isinstance(ctx.preprocess, Tokenize)
  assert ctx.preprocess.max_length == max_length
  train = ctx.splits["train"]
  assert train.num_classes == num_classes and train.images.is_pair
  tokens = ctx.preprocess.encode_batch(list(train.images)[:8])
  assert tokens.shape == (8, 3, max_length) and tokens.dtype == np.int32
  unk = ctx.preprocess.tokenizer.token_to_id("[UNK]")
  assert not (tokens[:, 0] == unk).any()  # the folder's vocab.txt covers its words
  assert (tokens[:, 1] == 1).any()  # sentence pairs: the second has token type 1


def test_multinli_cpu_config_loads_tokenises_and_trains_the_erm_teacher(folders, tmp_path):
  config = cpu_config("multinli", folders["multinli"], **ERM_ONLY)
  check_context(setup_context(config, str(tmp_path)), num_classes=3, max_length=24)
  results = train_and_evaluate(config, str(tmp_path))
  m = results["models"]["teacher_erm"]["metrics"]
  assert set(results["models"]) == {"teacher_erm"}
  assert 0.0 <= m["test/worst_group_acc"] <= 1.0
  assert sum(k.startswith("test/acc/group_") for k in m) == 6


def erm_run(folder: str, workdir: str, **overrides) -> dict:
  return train_and_evaluate(cpu_config("text_csv", folder, **ERM_ONLY, **overrides), workdir)


@pytest.fixture(scope="module")
def text_csv_straight(folders, tmp_path_factory):
  """An uninterrupted ERM-teacher run on the text metadata.csv folder (1 epoch, dropout on)."""
  workdir = str(tmp_path_factory.mktemp("text_csv_straight"))
  return workdir, erm_run(folders["text_csv"], workdir)


def test_text_csv_cpu_config_loads_tokenises_and_trains_the_erm_teacher(
    folders, text_csv_straight, tmp_path):
  config = cpu_config("text_csv", folders["text_csv"], **ERM_ONLY)
  check_context(setup_context(config, str(tmp_path)), num_classes=2, max_length=16)
  workdir, results = text_csv_straight
  m = results["models"]["teacher_erm"]["metrics"]
  assert 0.0 <= m["test/worst_group_acc"] <= 1.0
  assert sum(k.startswith("test/acc/group_") for k in m) == 4
  steps = [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))
           if json.loads(l)["stage"] == "teacher_erm" and "loss" in json.loads(l)]
  assert steps == list(range(1, 7))  # 96 training examples // 16


# ---------------------------------------------------------------------------
# Resume mid-epoch: the interrupted text stage ends as the uninterrupted one.
# ---------------------------------------------------------------------------

def test_text_stage_resumes_mid_epoch_to_identical_results(folders, text_csv_straight, tmp_path):
  straight_dir, straight = text_csv_straight
  workdir = str(tmp_path)
  with pytest.raises(Interrupted, match=r"stage teacher_erm stopped at step 2 of 6"):
    erm_run(folders["text_csv"], workdir, stop_after_steps=2)
  with pytest.raises(Interrupted, match=r"stage teacher_erm stopped at step 4 of 6"):
    erm_run(folders["text_csv"], workdir, stop_after_steps=2)  # resumed from step 2
  resumed = erm_run(folders["text_csv"], workdir)
  assert resumed["models"] == straight["models"]  # bit-identical metrics
  a = checkpoints._restore_numpy(os.path.join(straight_dir, "teacher_erm", "final"))
  b = checkpoints._restore_numpy(os.path.join(workdir, "teacher_erm", "final"))
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------
# The sharded text step equals the 1-device step; bfloat16.
# ---------------------------------------------------------------------------

VOCAB, LENGTH = 40, 16
LOSS_CONFIG = ml_collections.ConfigDict(dict(
    distill=dict(temperature=3.0, kd_ce_weight=0.0, match="pooled", head_weight=1.0,
                hidden_weight=0.5),  # text: the hidden-state means matched too
    gdro=dict(eta=0.01, adjustment=0.0)))


def text_model(arch: str, num_classes: int | None, dtype=jnp.float32, dropout: float = 0.1):
  config = TextModelConfig(arch=arch, vocab_size=VOCAB, hidden_size=32,
                           type_vocab_size=2 if arch == "bert" else 0, num_layers=1,
                           num_heads=2, intermediate_size=64, max_positions=32,
                           hidden_dropout=dropout, attention_dropout=dropout,
                           classifier_dropout=dropout)
  return create_text_model(config, num_classes, dtype=dtype)


def text_batch(n: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
  """Random token arrays `[n, 3, LENGTH]`: sentence pairs of random lengths, padded."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((n, 3, LENGTH), np.int32)
  for i in range(n):
    length = int(rng.integers(5, LENGTH + 1))
    split = int(rng.integers(2, length - 1))
    tokens[i, 0, :length] = rng.integers(5, VOCAB, length)
    tokens[i, 0, 0], tokens[i, 0, split], tokens[i, 0, length - 1] = 2, 3, 3
    tokens[i, 1, split + 1:length] = 1
    tokens[i, 2, :length] = 1
  return {"tokens": tokens, "label": rng.integers(0, 2, n).astype(np.int32),
          "group": rng.integers(0, 4, n).astype(np.int32), "index": np.arange(n, dtype=np.int32),
          "weight": rng.choice([1.0, 5.0], n).astype(np.float32), "mask": np.ones(n, np.float32)}


def dett_setup(dtype=jnp.float32):
  """(method, params, collections, frozen) of a DeTT student: a 1-layer DistilBERT with a
  linear projector under a 1-layer BERT teacher's transplanted head."""
  teacher = text_model("bert", 2, dtype)
  models = Models(student=text_model("distilbert", None, dtype),
                  projector=Projector("linear", 32, dtype=dtype), teacher=teacher)
  method = methods.get("dett")(models, LOSS_CONFIG)
  t_vars = init_model(teacher, (3, LENGTH), jax.random.key(0), jnp.int32)
  head = t_vars["params"]["classifier"]
  run = Setup(teacher_head=head, group_counts=np.full(4, 4), input_shape=(3, LENGTH),
              input_dtype=jnp.int32, feature_scale=lambda: jnp.ones(32))
  student = init_model(models.student, (3, LENGTH), jax.random.key(1), jnp.int32)
  variables = method.init(jax.random.key(2), student, run)
  frozen = {"teacher": t_vars, "teacher_head": head, **method.frozen(run)}
  return method, variables["params"], variables["collections"], frozen


def run_text_steps(strategy: str, data: int, model: int, steps: int = 3, dtype=jnp.float32):
  method, params, collections, frozen = dett_setup(dtype)
  tx = optax.adamw(1e-3)
  mesh = make_mesh(data, model)
  state = place(TrainState.create(params, collections, tx), mesh, strategy)
  frozen = place(frozen, mesh, strategy)
  step = jit_train_step(make_train_step(method, tx, jax.random.key(3)), mesh, state, frozen)
  losses = []
  for k in range(steps):
    state, metrics = step(state, shard_batch(text_batch(16, seed=k), mesh), frozen)
    losses.append(float(metrics["loss"]))
  return state, losses


@pytest.fixture(scope="module")
def one_device_run():
  return run_text_steps("replicated", 1, 1)


@pytest.mark.parametrize("strategy, data, model", [
    ("replicated", 8, 1), ("fsdp", 8, 1), ("replicated", 4, 2)])
def test_sharded_text_dett_step_equals_one_device(one_device_run, strategy, data, model):
  reference, reference_losses = one_device_run
  state, losses = run_text_steps(strategy, data, model)
  np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
  layer = state.params["student"]["transformer"]["layer_0"]
  if strategy == "fsdp":  # kernels and embeddings are split over the data axis
    assert "data" in layer["ffn"]["lin1"]["kernel"].sharding.spec
    embedding = state.params["student"]["embeddings"]["word_embeddings"]["embedding"]
    assert "data" in embedding.sharding.spec
  if model > 1:  # the query kernel [c, heads * d] is split over its heads
    assert layer["attention"]["q_lin"]["kernel"].sharding.spec == P(None, "model")


def test_bfloat16_text_step_gives_finite_float32_losses():
  state, losses = run_text_steps("replicated", 8, 1, steps=2, dtype=jnp.bfloat16)
  assert all(np.isfinite(losses))
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(state.params))
