"""Checks run before any compute: bad config fields and a workdir of another config."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from dett_jax.methods import METHODS
from dett_jax.models.projector import PROJECTORS
from dett_jax.models.resnet import STAGES, feature_channels
from dett_jax.report import write_json_atomic

# Fields that change how a run is watched, not what it computes: a workdir may be
# re-run with other values of these (and with more or fewer student methods).
NON_RESULT_FIELDS = ("log_every_steps", "checkpoint_every_steps", "stop_after_steps",
                     "distill.methods", "eval_batch_size")


class ConfigError(ValueError):
  """A config field has a value that cannot work; the message names the field and the fix."""


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the field and the fix for the first bad value found."""
  methods = [m.strip() for m in str(config.distill.methods).split(",") if m.strip()]
  for m in methods:
    _check(m in METHODS, f"distill.methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
  _check(config.distill.projector in PROJECTORS,
         f"distill.projector: unknown projector {config.distill.projector!r}; choose from "
         f"{', '.join(PROJECTORS)}")
  _check(config.distill.lambda_up >= 1,
         f"distill.lambda_up={config.distill.lambda_up} must be >= 1 (1 means no upweighting)")
  _check(config.distill.reweight in ("upsample", "loss_weight"),
         f"distill.reweight={config.distill.reweight!r}; choose upsample or loss_weight")
  if config.distill.reweight == "upsample":
    _check(float(config.distill.lambda_up).is_integer(),
           f"distill.lambda_up={config.distill.lambda_up} must be an integer with "
           "distill.reweight=upsample; round it or use distill.reweight=loss_weight")
  _check(config.distill.match in ("map", "pooled"),
         f"distill.match={config.distill.match!r}; choose map or pooled")
  _check(config.distill.teacher in ("dfr", "erm"),
         f"distill.teacher={config.distill.teacher!r}; choose dfr or erm")
  _check(config.distill.teacher == "erm" or config.teacher.dfr,
         "distill.teacher=dfr needs teacher.dfr=True; set one of them")
  _check(config.distill.select in ("val_worst_group", "last"),
         f"distill.select={config.distill.select!r}; choose val_worst_group or last")
  _check(0.0 <= config.distill.kd_ce_weight <= 1.0,
         f"distill.kd_ce_weight={config.distill.kd_ce_weight} must be in [0, 1]")
  _check(config.distill.temperature > 0, "distill.temperature must be > 0")
  for role in ("teacher", "student"):
    arch = config[role]
    _check(arch.depth in STAGES, f"{role}.depth={arch.depth}; choose one of {sorted(STAGES)}")
    _check(arch.stem in ("imagenet", "small"), f"{role}.stem={arch.stem!r}; choose imagenet or small")
    _check(arch.width > 0, f"{role}.width={arch.width} must be > 0")
  if config.distill.projector == "identity" and any(
      METHODS[m].objective == "feature" for m in methods):
    s = feature_channels(config.student.depth, config.student.width)
    t = feature_channels(config.teacher.depth, config.teacher.width)
    _check(s == t, f"distill.projector=identity needs equal feature channels, but the student has "
           f"{s} and the teacher {t}; use distill.projector=linear or simkd, or match the widths")
  _check(config.batch_size > 0, "batch_size must be > 0")
  for name in ("identification", "distill.optim", "teacher.optim", "pretrain.teacher",
               "pretrain.student"):
    optim = config
    for part in name.split("."):
      optim = optim[part]
    _check(optim.optimizer in ("sgd", "adamw"), f"{name}.optimizer={optim.optimizer!r}; choose sgd or adamw")
    _check(optim.epochs >= 1, f"{name}.epochs={optim.epochs} must be >= 1")
    _check(optim.learning_rate > 0, f"{name}.learning_rate must be > 0")
  if config.teacher.checkpoint:
    _check(os.path.isdir(config.teacher.checkpoint),
           f"teacher.checkpoint={config.teacher.checkpoint!r} is not a checkpoint directory; "
           "give the path of an Orbax checkpoint of teacher variables")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir that holds results of a different config; records the config otherwise."""
  path = os.path.join(workdir, "config.json")
  current = {k: v for k, v in _flatten(json.loads(config.to_json())).items()
             if k not in NON_RESULT_FIELDS}
  if os.path.exists(path):
    with open(path) as f:
      stored = {k: v for k, v in _flatten(json.load(f)).items() if k not in NON_RESULT_FIELDS}
    differing = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    if differing:
      shown = ", ".join(f"{k} ({stored.get(k)!r} -> {current.get(k)!r})" for k in differing[:5])
      raise ConfigError(f"workdir {workdir} holds results of a different config ({shown}); "
                        "use a new --workdir, or delete that one to start over")
    return
  write_json_atomic(path, json.loads(config.to_json()))
