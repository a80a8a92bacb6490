"""The DeTT pipeline: pretrain -> ERM teacher -> debiased teachers (DFR, group DRO:
`teacher.debias`) -> identification -> students -> results.json / report.md / groups.png.

The stages live in `dett_jax.stages`; this module puts them in order. Every stage writes
its outputs under `<workdir>/<stage>/` and a `done.json` last; a re-run skips finished
stages and resumes an interrupted one from its latest checkpoint.
"""

from __future__ import annotations

import importlib
import os

import ml_collections
import numpy as np
from absl import logging

from dett_jax import distributed, methods
from dett_jax.config_schema import complete
from dett_jax.data import load_splits, preprocess_for
from dett_jax.io import write_json_atomic
from dett_jax.report import write_report
from dett_jax.sharding import make_mesh
from dett_jax.stages.context import Context
from dett_jax.stages.students import identification, student
from dett_jax.stages.teachers import pretrain, teachers
from dett_jax.training.loop import MetricLogger, StopSignals
from dett_jax.validation import batch_sizes, check_schedules, validate_config
from dett_jax.workdir import check_workdir_config, check_workdir_writable


def import_plugins(config: ml_collections.ConfigDict) -> None:
  """Imports the modules of `config.plugins` (comma-separated), which register methods."""
  for name in (p.strip() for p in str(config.plugins).split(",")):
    if name:
      importlib.import_module(name)


def setup_context(config: ml_collections.ConfigDict, workdir: str) -> Context:
  """Completes and checks the config, checks the workdir, builds the mesh, loads the data.

  Every check that can refuse the config runs before `config.json` is written, so a
  refused config leaves no record that would refuse the corrected one."""
  config = complete(config)
  import_plugins(config)  # before validation: the methods it registers are then known
  config = validate_config(config)
  workdir = os.path.abspath(workdir)
  check_workdir_writable(workdir, config.min_free_mb)  # every process: shared disk?
  mesh = make_mesh(config.mesh.data, config.mesh.model)
  for field, size in batch_sizes(config).items():
    if size % mesh.devices.size:
      raise ValueError(f"{field}={size} is not divisible by the {mesh.devices.size} devices of "
                       f"the mesh's data axis; use a multiple of {mesh.devices.size}")
  splits = load_splits(config.data)
  check_schedules(config, len(splits["train"]))  # a data set on disk: its size is known now
  check_workdir_config(config, workdir)
  ctx = Context(config, workdir, splits, mesh, MetricLogger(workdir),
                preprocess_for(config))
  logging.info("mesh %s over %d devices; train group counts %s", dict(mesh.shape),
               mesh.devices.size, ctx.train_counts.tolist())
  return ctx


def run_stages(ctx: Context, method_names: list[str]) -> dict[str, dict]:
  """Teachers, identification and students in order; returns the `models` of results.json."""
  models, teacher_vars, distill_head = teachers(ctx)
  student_pre = pretrain(ctx, "student") if method_names else None
  error_set = np.zeros(0, np.int64)
  if any(methods.get(m).reweight for m in method_names):
    error_set = np.asarray(identification(ctx, student_pre)["error_set"], np.int64)
  for name in method_names:
    models[f"student_{name}"] = student(ctx, name, student_pre, teacher_vars, distill_head,
                                        error_set)
  return models


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every stage; writes results.json, report.md and groups.png; returns the results."""
  ctx = setup_context(config, workdir)
  try:
    with StopSignals():  # SIGTERM/SIGINT: finish the step or stage in progress, then stop
      models = run_stages(ctx, methods.parse(ctx.config.distill.methods))
  finally:  # flush TensorBoard events also when a stage is interrupted
    ctx.logger.close()
  results = {"config": ctx.config.to_dict(), "models": models}
  if distributed.is_primary():
    write_json_atomic(os.path.join(ctx.workdir, "results.json"), results)
    write_report(results, ctx.workdir)
  distributed.sync("results")  # the other processes return once the files are there
  return results
