"""Checks run before any compute: bad config fields and a workdir of another config."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections

from dett_jax import distributed
from dett_jax.data import GENERATED, LOADERS, generated_benchmark
from dett_jax.data.images import TRAIN_TRANSFORMS
from dett_jax.methods import METHODS, TEACHER_DEBIAS, parse_debias
from dett_jax.optimizers import LR_SCALING, OPTIMIZERS, schedule_error
from dett_jax.sharding import parse_rules
from dett_jax.models.projector import PROJECTORS
from dett_jax.models.resnet import STAGES, feature_channels
from dett_jax.report import write_json_atomic

# Fields that change how a run is watched or where it computes, not what it computes: a
# workdir may be re-run with other values of these (and with more or fewer student methods
# or debiased teachers: each is its own stage). The whole mesh group is placement only:
# `mesh.cpu_devices` (the number of CPU devices), `mesh.data` / `mesh.model` (the mesh's
# shape) and `mesh.strategy` / `mesh.rules` (how parameters are sharded over it) decide
# which device holds which part of the same global arrays; the global batch, the data
# order and the checkpoints' shapes do not depend on them, and a checkpoint restores under
# any mesh (tests/test_scale.py). Results may differ by float rounding (another reduction
# order), as with another number of processes.
NON_RESULT_FIELDS = ("log_every_steps", "checkpoint_every_steps", "stop_after_steps",
                     "checkpoint_every_minutes", "keep_checkpoints", "on_nonfinite", "min_free_mb",
                     "sweep.axes", "sweep.subset", "sweep.stack", "sweep.mesh_axis", "sweep.conv",
                     "sweep.execution",
                     "mesh.cpu_devices", "mesh.data", "mesh.model", "mesh.strategy", "mesh.rules",
                     "distill.methods", "teacher.debias", "eval_batch_size", "data.workers",
                     "data.check_images")


class ConfigError(ValueError):
  """A config field has a value that cannot work; the message names the field and the fix."""


class WorkdirError(OSError):
  """The workdir cannot be created or written, or its disk is (nearly) full."""


def check_workdir_writable(workdir: str, min_free_mb: float) -> None:
  """Fails early, naming the path and the fix, when `workdir` cannot hold the run's files:
  it cannot be created, a file cannot be written in it, or its disk has less than
  `min_free_mb` MB free. Writes nothing but a probe file it removes again."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create workdir {workdir}: {e.strerror or e}; choose a writable "
                       "--workdir") from None
  probe = os.path.join(workdir, f".write_probe_{jax.process_index()}_{os.getpid()}")
  try:
    with open(probe, "wb") as f:
      f.write(b"0" * 4096)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise WorkdirError(f"cannot write to workdir {workdir}: {e.strerror or e}; fix its "
                       "permissions or free space, or choose another --workdir") from None
  finally:
    if os.path.exists(probe):
      os.remove(probe)
  free_mb = shutil.disk_usage(workdir).free / 2**20
  if free_mb < min_free_mb:
    raise WorkdirError(f"workdir {workdir} has {free_mb:.0f} MB free, less than min_free_mb="
                       f"{min_free_mb:g}; free some space or choose another --workdir")


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
  validate_teachers(config)
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
    _check(optim.get("batch_size", 0) >= 0, f"{name}.batch_size must be >= 0 (0: batch_size)")
    _check(optim.optimizer in OPTIMIZERS, f"{name}.optimizer={optim.optimizer!r}; choose from "
           f"{', '.join(OPTIMIZERS)}")
    _check(optim.get("lr_scaling", "none") in LR_SCALING,
           f"{name}.lr_scaling={optim.get('lr_scaling')!r}; choose from {', '.join(LR_SCALING)}")
    _check(optim.get("accumulate_steps", 1) >= 1,
           f"{name}.accumulate_steps={optim.get('accumulate_steps')} must be >= 1")
    _check(optim.epochs >= 1, f"{name}.epochs={optim.epochs} must be >= 1")
    _check(optim.get("warmup_epochs", 0.0) >= 0,
           f"{name}.warmup_epochs={optim.get('warmup_epochs')} must be >= 0 (0: no warmup)")
    _check(optim.learning_rate > 0, f"{name}.learning_rate must be > 0")
  validate_data_config(config)
  check_schedules(config, known_train_size(config))
  _check(config.get("precision", "float32") in ("float32", "bfloat16"),
         f"precision={config.get('precision')!r}; choose float32 or bfloat16")
  _check(config.get("on_nonfinite", "stop") in ("stop", "skip"),
         f"on_nonfinite={config.get('on_nonfinite')!r}; choose stop or skip")
  _check(config.get("keep_checkpoints", 2) >= 1,
         f"keep_checkpoints={config.get('keep_checkpoints')} must be >= 1")
  _check(config.get("checkpoint_every_minutes", 0.0) >= 0,
         f"checkpoint_every_minutes={config.get('checkpoint_every_minutes')} must be >= 0 "
         "(0: off)")
  _check(config.get("small_map_conv", "auto") in ("auto", "patches", "xla"),
         f"small_map_conv={config.get('small_map_conv')!r}; choose auto, patches or xla")
  try:
    parse_rules(config.mesh.get("strategy", "replicated"), tuple(config.mesh.get("rules", ())))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check(config.mesh.get("model", 1) >= 1, "mesh.model must be >= 1")
  if config.distill.get("teacher_cache"):
    _check(not config.distill.optim.get("augment", config.augment),
           "distill.teacher_cache=True needs un-augmented student training (the teacher must "
           "see the same image each epoch); set augment=False (or distill.optim.augment=False) "
           "or distill.teacher_cache=False")
  for role in ("teacher", "student"):
    init = config[role].get("init")
    if init:
      _check(os.path.isdir(init), f"{role}.init={init!r} is not a checkpoint directory; give an "
             "Orbax checkpoint of ResNet variables (python -m dett_jax.import_torch makes one "
             "from torchvision weights)")
  if config.teacher.checkpoint:
    _check(os.path.isdir(config.teacher.checkpoint),
           f"teacher.checkpoint={config.teacher.checkpoint!r} is not a checkpoint directory; "
           "give the path of an Orbax checkpoint of teacher variables")


def validate_teachers(config: ml_collections.ConfigDict) -> None:
  """Checks `teacher.debias`, `distill.teacher` and `gdro` (group-DRO settings)."""
  _check("dfr" not in config.teacher,
         "teacher.dfr was replaced by teacher.debias; use --config.teacher.debias=dfr (or \"\" "
         "for no debiased teacher)")
  debias = parse_debias(config.teacher.get("debias", "dfr"))
  for name in debias:
    _check(name in TEACHER_DEBIAS, f"teacher.debias: unknown debiased teacher {name!r}; choose "
           f"from {', '.join(TEACHER_DEBIAS)} (comma-separated, \"\" for none)")
  _check(len(set(debias)) == len(debias), f"teacher.debias={config.teacher.debias!r} names a "
         "teacher twice; list each once")
  _check(config.distill.teacher in ("erm",) + TEACHER_DEBIAS,
         f"distill.teacher={config.distill.teacher!r}; choose erm, {', '.join(TEACHER_DEBIAS)}")
  _check(config.distill.teacher == "erm" or config.distill.teacher in debias,
         f"distill.teacher={config.distill.teacher} needs that teacher in teacher.debias "
         f"(now {config.teacher.get('debias', 'dfr')!r}); add it there, or distil another one")
  methods = [m.strip() for m in str(config.distill.methods).split(",") if m.strip()]
  if "gdro" in debias or "gdro" in methods or "gdro" in config:
    gdro = config.get("gdro") or {}
    eta, adjustment = gdro.get("eta", 0.01), gdro.get("adjustment", 0.0)
    _check(eta > 0, f"gdro.eta={eta} must be > 0 (the group weights' step size; default 0.01)")
    _check(adjustment >= 0, f"gdro.adjustment={adjustment} must be >= 0 (C of C / sqrt(n_g); "
           "0: none)")
  if "gdro" in debias:
    _check(not config.teacher.checkpoint,
           "teacher.debias=gdro fine-tunes the pretrained teacher backbone, which "
           "teacher.checkpoint (a finished teacher) skips; drop gdro from teacher.debias, or "
           "give the backbone as teacher.init instead of teacher.checkpoint")


def validate_data_config(config: ml_collections.ConfigDict) -> None:
  """Checks `config.data` (loader, preprocessing, workers) and its fit with pretraining."""
  data = config.data
  _check(data.name in LOADERS, f"data.name={data.name!r}; choose from {', '.join(LOADERS)}")
  _check(data.name in GENERATED or not config.pretrain.enabled,
         f"pretrain.enabled=True trains on a built-in benchmark's pretraining task, which only "
         f"goes with data.name in ({', '.join(GENERATED)}); for data.name={data.name} set "
         "pretrain.enabled=False and give ImageNet weights as teacher.init/student.init (see "
         "README, 'Teachers and weights from PyTorch')")
  if data.name not in GENERATED:
    _check(bool(data.get("root")) or data.get("source") == "tfds",
           "data.root is empty; give the data folder: --config.data.root=DIR")
  _check(data.image_size >= 8, f"data.image_size={data.image_size} must be >= 8")
  _check(data.get("train_transform", "pad_crop") in TRAIN_TRANSFORMS,
         f"data.train_transform={data.get('train_transform')!r}; choose from "
         f"{', '.join(TRAIN_TRANSFORMS)}")
  resize = data.get("eval_resize", 0)
  _check(resize == 0 or resize >= data.image_size,
         f"data.eval_resize={resize} must be 0 (resize straight to data.image_size) or >= "
         f"data.image_size={data.image_size} (resize, then centre-crop)")
  scale, ratio = data.get("crop_scale", (0.7, 1.0)), data.get("crop_ratio", (0.75, 4 / 3))
  _check(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
         f"data.crop_scale={tuple(scale)} must be (low, high) with 0 < low <= high <= 1")
  _check(len(ratio) == 2 and 0 < ratio[0] <= ratio[1],
         f"data.crop_ratio={tuple(ratio)} must be (low, high) with 0 < low <= high")
  for field in ("mean", "std"):
    value = tuple(data.get(field, (1.0,) * 3))
    _check(len(value) == 3, f"data.{field}={value} needs one value per RGB channel")
  _check(all(v > 0 for v in data.get("std", (1.0,))), "data.std values must be > 0")
  _check(data.get("workers", 0) >= 0, f"data.workers={data.get('workers')} must be >= 0")


def known_train_size(config: ml_collections.ConfigDict) -> int | None:
  """The training split's size when the config alone fixes it (the built-in benchmark),
  else None (a data set on disk: known once loaded)."""
  benchmark = generated_benchmark(config.data.name)
  if benchmark is None:
    return None
  return benchmark.split_size("train", config.data.train_size)


def check_schedules(config: ml_collections.ConfigDict, train_size: int | None) -> None:
  """Raises ConfigError when a stage the run trains has a learning-rate schedule that
  `make_optimizer` cannot build (see `optimizers.schedule_error`): no full batch, no
  optimizer update, accumulate_steps above the steps of an epoch, no decay steps.

  A stage's steps per epoch are (its training examples) // (its global batch size), the
  same in any number of processes. Pretraining trains on `pretrain.size` examples, the
  other stages on the training split (`train_size`; None: not known yet, so only what
  fails for every size is checked; `setup_context` checks again once the data is loaded).
  Upsampling (`distill.reweight=upsample`) adds examples of the error set, unknown before
  identification: the un-upsampled size is used, the fewest steps per epoch, which the
  methods without upsampling train with exactly (and the upsampled ones with an empty
  error set). Sweeps: every T_id value of the selected variants is checked.
  """
  for field, optim, data, upsampled, context in _scheduled_stages(config):
    size = config.pretrain.size if data == "pretrain" else train_size
    if size is None:
      problem = schedule_error(optim, None, f"{field}.")
    else:
      batch = optim.get("batch_size") or config.batch_size
      batch_field = f"{field}.batch_size" if optim.get("batch_size") else "batch_size"
      where = "pretrain.size" if data == "pretrain" else "the training split"
      _check(size // batch >= 1,
             f"{context}{batch_field}={batch} is larger than the {size} examples of {where}, "
             f"so {field} has no full batch; lower {batch_field}")
      steps = size // batch
      per_epoch = (f"{steps} steps per epoch ({size} examples / {batch_field}={batch}"
                   f"{', before upsampling' if upsampled else ''})")
      problem = schedule_error(optim, steps, f"{field}.", per_epoch)
    _check(problem is None, f"{context}{problem}")


def _scheduled_stages(config: ml_collections.ConfigDict) -> list[tuple[str, Any, str, bool, str]]:
  """(field, optim config, "pretrain" or "train", only upsampled, message prefix) of every
  stage the run trains (a stage that is loaded or skipped has no schedule to check)."""
  sweep = "sweep" in config
  methods = [METHODS[m] for m in (p.strip() for p in str(config.distill.methods).split(","))
             if m in METHODS]
  upsample = config.distill.reweight == "upsample"
  if sweep:  # run_sweep trains the students of its variants (sweep.method)
    from dett_jax.sweep import method_of, parse_subset, variant_config, variants
    if config.sweep.get("method", "dett") not in METHODS:
      return []  # check_sweep names it
    axes = {name: tuple(values) for name, values in config.sweep.axes.items()}
    selected = variants(axes, parse_subset(config.sweep.get("subset", "")))
    students = [method_of(config, v) for v in selected]
    t_ids = sorted({int(variant_config(config, v).identification.epochs)
                    for v in selected if method_of(config, v).reweight})
  else:
    students = methods
    t_ids = [config.identification.epochs] if any(m.reweight for m in methods) else []
  stages = []
  if config.pretrain.enabled:
    if not config.teacher.checkpoint and not config.teacher.get("init"):
      stages.append(("pretrain.teacher", config.pretrain.teacher, "pretrain", False, ""))
    if students and not config.student.get("init"):
      stages.append(("pretrain.student", config.pretrain.student, "pretrain", False, ""))
  if not config.teacher.checkpoint:
    stages.append(("teacher.optim", config.teacher.optim, "train", False, ""))
  for t_id in t_ids:
    optim, context = config.identification, ""
    if t_id != config.identification.epochs:  # a sweep's T_id value
      _check(t_id >= 1, f"sweep.axes.T_id={t_id} must be >= 1 (identification epochs)")
      optim = ml_collections.ConfigDict({**optim.to_dict(), "epochs": t_id})
      context = f"sweep.axes.T_id={t_id}: "
    stages.append(("identification", optim, "train", False, context))
  if students:
    only_upsampled = upsample and all(m.reweight for m in students)
    stages.append(("distill.optim", config.distill.optim, "train", only_upsampled, ""))
  return stages


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
  """Refuses a workdir that holds results of a different config; records the config otherwise.

  With several processes, process 0 writes `config.json` and the others wait for it,
  then check that their config is the same as process 0's.
  """
  path = os.path.join(workdir, "config.json")
  current = {k: v for k, v in _flatten(json.loads(config.to_json())).items()
             if not _non_result(k)}
  stored = _stored_config(path)
  if stored is not None:
    differing = _differing(stored, current)
    if differing:
      raise ConfigError(f"workdir {workdir} holds results of a different config ({differing}); "
                        "use a new --workdir, or delete that one to start over")
  elif distributed.is_primary():
    write_json_atomic(path, json.loads(config.to_json()))
  distributed.sync("config.json")
  if stored is None and not distributed.is_primary():
    differing = _differing(_stored_config(path) or {}, current)
    if differing:
      raise ConfigError(f"process {jax.process_index()} has a different config from process 0 "
                        f"({differing}); start every process with the same flags")


def _non_result(key: str) -> bool:
  """Whether a flattened config key is (inside) one of NON_RESULT_FIELDS."""
  return any(key == f or key.startswith(f + ".") for f in NON_RESULT_FIELDS)


def _stored_config(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return {k: v for k, v in _flatten(json.load(f)).items() if not _non_result(k)}


def _differing(stored: dict[str, Any], current: dict[str, Any]) -> str:
  """'' when equal, else the first differing fields as 'key (stored -> current)'."""
  differing = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
  return ", ".join(f"{k} ({stored.get(k)!r} -> {current.get(k)!r})" for k in differing[:5])
