"""Checks run before any compute: bad config fields (the workdir guard is `dett_jax.workdir`)."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from dett_jax.config_schema import (ARCHS, OPTIM_SECTIONS, TEXT_ARCHS, TEXT_DATA_SETS,
                                    ConfigError, complete, section)
from dett_jax.data import GENERATED, LOADERS, generated_benchmark, text_max_length
from dett_jax.hf_checkpoint import is_hf_folder, read_hf_config
from dett_jax.data.images import TRAIN_TRANSFORMS
from dett_jax.methods import TEACHER_DEBIAS, parse_debias
from dett_jax.methods import get as get_method, names as method_names
from dett_jax.sweep_axes import (check_sweep, method_of, parse_subset, variant_config,
                                 variants)
from dett_jax.optimizers import DECAYS, LR_SCALING, OPTIMIZERS, schedule_error
from dett_jax.sharding import parse_rules
from dett_jax.models.projector import PROJECTORS
from dett_jax.models.resnet import STAGES, feature_channels


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config completed by the schema (`config_schema.complete`: every declared field
  present, an undeclared one refused), after checking it: raises ConfigError naming the
  field and the fix for the first bad value found. The run uses the returned config.
  A sweep config's `sweep` section is checked too (`sweep_axes.check_sweep`)."""
  config = complete(config)
  if "sweep" in config:
    check_sweep(config)
  _validate_distill(config)
  validate_teachers(config)
  _validate_networks(config)
  _validate_optimizers(config)
  validate_data_config(config)
  check_schedules(config, known_train_size(config))
  _validate_run_options(config)
  _validate_checkpoints(config)
  return config


def _method_names(config: ml_collections.ConfigDict) -> list[str]:
  return [m.strip() for m in str(config.distill.methods).split(",") if m.strip()]


def _validate_distill(config: ml_collections.ConfigDict) -> None:
  """Checks `distill` (methods, projector, reweighting, losses, selection)."""
  distill = config.distill
  for m in _method_names(config):
    _check(m in method_names(), f"distill.methods: unknown method {m!r}; choose from "
           f"{', '.join(method_names())} (a method of your own: list its module in plugins)")
  _check(distill.projector in PROJECTORS,
         f"distill.projector: unknown projector {distill.projector!r}; choose from "
         f"{', '.join(PROJECTORS)}")
  _check(distill.lambda_up >= 1,
         f"distill.lambda_up={distill.lambda_up} must be >= 1 (1 means no upweighting)")
  _check(distill.reweight in ("upsample", "loss_weight"),
         f"distill.reweight={distill.reweight!r}; choose upsample or loss_weight")
  if distill.reweight == "upsample":
    _check(float(distill.lambda_up).is_integer(),
           f"distill.lambda_up={distill.lambda_up} must be an integer with "
           "distill.reweight=upsample; round it or use distill.reweight=loss_weight")
  _check(distill.match in ("map", "pooled"),
         f"distill.match={distill.match!r}; choose map or pooled")
  _check(distill.select in ("val_worst_group", "last"),
         f"distill.select={distill.select!r}; choose val_worst_group or last")
  _check(0.0 <= distill.kd_ce_weight <= 1.0,
         f"distill.kd_ce_weight={distill.kd_ce_weight} must be in [0, 1]")
  _check(distill.temperature > 0, "distill.temperature must be > 0")
  _check(distill.hidden_weight >= 0, f"distill.hidden_weight={distill.hidden_weight} must be >= 0")
  if distill.hidden_weight:
    _check(config.teacher.arch in TEXT_ARCHS and config.student.arch in TEXT_ARCHS,
           "distill.hidden_weight > 0 matches text encoders' hidden states; the teacher and "
           "the student must be bert or distilbert (or set distill.hidden_weight=0)")
    _check(not distill.teacher_cache, "distill.hidden_weight > 0 needs the teacher's hidden "
           "states, which the teacher cache does not hold; set distill.teacher_cache=False")
  if distill.teacher_cache:
    _check(not distill.optim.augment,
           "distill.teacher_cache=True needs un-augmented student training (the teacher must "
           "see the same image each epoch); set augment=False (or distill.optim.augment=False) "
           "or distill.teacher_cache=False")


def _validate_networks(config: ml_collections.ConfigDict) -> None:
  """Checks the teacher's and the student's ResNets and the projector between them."""
  methods = _method_names(config)
  text = config.data.name in TEXT_DATA_SETS
  for role in ("teacher", "student"):
    arch = config[role]
    _check(arch.arch in ARCHS, f"{role}.arch={arch.arch!r}; choose from {', '.join(ARCHS)}")
    if text != (arch.arch in TEXT_ARCHS):
      want = "bert or distilbert" if text else "resnet"
      _check(False, f"{role}.arch={arch.arch} does not read data.name={config.data.name} "
             f"({'text' if text else 'images'}); set --config.{role}.arch to {want}")
    if arch.arch in TEXT_ARCHS:
      _validate_transformer(config, role)
      continue
    _check(arch.depth in STAGES, f"{role}.depth={arch.depth}; choose one of {sorted(STAGES)}")
    _check(arch.stem in ("imagenet", "small"), f"{role}.stem={arch.stem!r}; choose imagenet or small")
    _check(arch.width > 0, f"{role}.width={arch.width} must be > 0")
  if config.distill.projector == "identity" and any(
      not get_method(m).student_head for m in methods):  # a projector maps the student's map
    s, t = _width(config, "student"), _width(config, "teacher")
    _check(s == t, f"distill.projector=identity needs equal feature channels, but the student has "
           f"{s} and the teacher {t}; use distill.projector=linear or simkd, or match the widths")


def _validate_transformer(config: ml_collections.ConfigDict, role: str) -> None:
  """Checks a text encoder's sizes (those of a Hugging Face `init` folder are its own)."""
  cfg = config[role]
  if cfg.init:
    _check(is_hf_folder(cfg.init),
           f"{role}.init={cfg.init} is not a Hugging Face folder (no config.json); give the "
           "folder holding config.json and model.safetensors")
    return
  for field in ("layers", "hidden", "heads", "mlp_dim", "max_positions"):
    _check(cfg[field] >= 1, f"{role}.{field}={cfg[field]} must be >= 1")
  _check(cfg.hidden % cfg.heads == 0,
         f"{role}.hidden={cfg.hidden} is not divisible by {role}.heads={cfg.heads}")
  _check(0 <= cfg.dropout < 1, f"{role}.dropout={cfg.dropout} must be in [0, 1)")
  length = text_max_length(config.data)  # the built-in benchmark's 0: its longest sentence
  _check(length <= cfg.max_positions,
         f"data.max_length={length} exceeds {role}.max_positions={cfg.max_positions}; lower "
         f"the one or raise the other")


def _width(config: ml_collections.ConfigDict, role: str) -> int:
  """Channels of what `config[role]`'s head reads, from the config alone."""
  cfg = config[role]
  if cfg.arch not in TEXT_ARCHS:
    return feature_channels(cfg.depth, cfg.width)
  return read_hf_config(cfg.init).hidden_size if cfg.init else cfg.hidden


def _validate_optimizers(config: ml_collections.ConfigDict) -> None:
  """Checks `batch_size` and the fields of every optimizer section (OPTIM_SECTIONS)."""
  _check(config.batch_size > 0, "batch_size must be > 0")
  for name in OPTIM_SECTIONS:
    optim = section(config, name)
    _check(optim.batch_size >= 0, f"{name}.batch_size must be >= 0 (0: batch_size)")
    _check(optim.optimizer in OPTIMIZERS, f"{name}.optimizer={optim.optimizer!r}; choose from "
           f"{', '.join(OPTIMIZERS)}")
    _check(optim.lr_scaling in LR_SCALING,
           f"{name}.lr_scaling={optim.lr_scaling!r}; choose from {', '.join(LR_SCALING)}")
    _check(optim.accumulate_steps >= 1,
           f"{name}.accumulate_steps={optim.accumulate_steps} must be >= 1")
    _check(optim.epochs >= 1, f"{name}.epochs={optim.epochs} must be >= 1")
    _check(optim.decay in DECAYS,
           f"{name}.decay={optim.decay!r}; choose from {', '.join(DECAYS)}")
    _check(optim.warmup_epochs >= 0,
           f"{name}.warmup_epochs={optim.warmup_epochs} must be >= 0 (0: no warmup)")
    _check(optim.learning_rate > 0, f"{name}.learning_rate must be > 0")


def _validate_run_options(config: ml_collections.ConfigDict) -> None:
  """Checks precision, the divergence policy, checkpointing, convolutions and the mesh."""
  _check(config.precision in ("float32", "bfloat16"),
         f"precision={config.precision!r}; choose float32 or bfloat16")
  _check(config.on_nonfinite in ("stop", "skip"),
         f"on_nonfinite={config.on_nonfinite!r}; choose stop or skip")
  _check(config.keep_checkpoints >= 1, f"keep_checkpoints={config.keep_checkpoints} must be >= 1")
  _check(config.checkpoint_every_minutes >= 0,
         f"checkpoint_every_minutes={config.checkpoint_every_minutes} must be >= 0 (0: off)")
  _check(config.small_map_conv in ("auto", "patches", "xla"),
         f"small_map_conv={config.small_map_conv!r}; choose auto, patches or xla")
  try:
    parse_rules(config.mesh.strategy, tuple(config.mesh.rules))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _check(config.mesh.model >= 1, "mesh.model must be >= 1")


def _validate_checkpoints(config: ml_collections.ConfigDict) -> None:
  """Checks that `teacher.init`, `student.init` and `teacher.checkpoint` are directories."""
  for role in ("teacher", "student"):
    init = config[role].init
    if init:
      _check(os.path.isdir(init), f"{role}.init={init!r} is not a checkpoint directory; give an "
             "Orbax checkpoint of ResNet variables (python -m dett_jax.import_torch makes one "
             "from torchvision weights)")
  if config.teacher.checkpoint:
    _check(os.path.isdir(config.teacher.checkpoint),
           f"teacher.checkpoint={config.teacher.checkpoint!r} is not a checkpoint directory; "
           "give the path of an Orbax checkpoint of teacher variables")


def validate_teachers(config: ml_collections.ConfigDict) -> None:
  """Checks `teacher.debias`, `distill.teacher` and `gdro` (group-DRO settings) of a
  completed config (`validate_config` completes it; a `teacher.dfr` field, replaced by
  `teacher.debias`, is refused by the completion, naming the replacement)."""
  debias = parse_debias(config.teacher.debias)
  for name in debias:
    _check(name in TEACHER_DEBIAS, f"teacher.debias: unknown debiased teacher {name!r}; choose "
           f"from {', '.join(TEACHER_DEBIAS)} (comma-separated, \"\" for none)")
  _check(len(set(debias)) == len(debias), f"teacher.debias={config.teacher.debias!r} names a "
         "teacher twice; list each once")
  _check(config.distill.teacher in ("erm",) + TEACHER_DEBIAS,
         f"distill.teacher={config.distill.teacher!r}; choose erm, {', '.join(TEACHER_DEBIAS)}")
  _check(config.distill.teacher == "erm" or config.distill.teacher in debias,
         f"distill.teacher={config.distill.teacher} needs that teacher in teacher.debias "
         f"(now {config.teacher.debias!r}); add it there, or distil another one")
  eta, adjustment = config.gdro.eta, config.gdro.adjustment
  _check(eta > 0, f"gdro.eta={eta} must be > 0 (the group weights' step size; default 0.01)")
  _check(adjustment >= 0, f"gdro.adjustment={adjustment} must be >= 0 (C of C / sqrt(n_g); "
         "0: none)")
  if "gdro" in debias:
    _check(not config.teacher.checkpoint,
           "teacher.debias=gdro fine-tunes the pretrained teacher backbone, which "
           "teacher.checkpoint (a finished teacher) skips; drop gdro from teacher.debias, or "
           "give the backbone as teacher.init instead of teacher.checkpoint")


def validate_data_config(config: ml_collections.ConfigDict) -> None:
  """Checks `config.data` (loader, preprocessing, workers) of a completed config and its
  fit with pretraining."""
  data = config.data
  _check(data.name in LOADERS, f"data.name={data.name!r}; choose from {', '.join(LOADERS)}")
  _check(data.name in GENERATED or not config.pretrain.enabled,
         f"pretrain.enabled=True trains on a built-in benchmark's pretraining task, which only "
         f"goes with data.name in ({', '.join(GENERATED)}); for data.name={data.name} set "
         "pretrain.enabled=False and give pretrained weights as teacher.init/student.init "
         "(ImageNet ResNets: docs/data.md, 'Teachers and weights from PyTorch'; text: Hugging "
         "Face folders, docs/text.md)")
  if data.name not in GENERATED:
    _check(bool(data.root) or (data.name == "celeba" and data.source == "tfds"),
           "data.root is empty; give the data folder: --config.data.root=DIR")
  if data.name in TEXT_DATA_SETS:
    _check(data.max_length >= 0 if data.name == "synthetic_text" else data.max_length >= 4,
           f"data.max_length={data.max_length} must be >= 4 (tokens incl. [CLS] and [SEP])")
    _check(data.workers >= 0, f"data.workers={data.workers} must be >= 0")
    return
  _check(data.image_size >= 8, f"data.image_size={data.image_size} must be >= 8")
  _check(data.train_transform in TRAIN_TRANSFORMS,
         f"data.train_transform={data.train_transform!r}; choose from "
         f"{', '.join(TRAIN_TRANSFORMS)}")
  resize = data.eval_resize
  _check(resize == 0 or resize >= data.image_size,
         f"data.eval_resize={resize} must be 0 (resize straight to data.image_size) or >= "
         f"data.image_size={data.image_size} (resize, then centre-crop)")
  scale, ratio = data.crop_scale, data.crop_ratio
  _check(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
         f"data.crop_scale={tuple(scale)} must be (low, high) with 0 < low <= high <= 1")
  _check(len(ratio) == 2 and 0 < ratio[0] <= ratio[1],
         f"data.crop_ratio={tuple(ratio)} must be (low, high) with 0 < low <= high")
  for field in ("mean", "std"):
    value = tuple(data[field])
    _check(len(value) == 3, f"data.{field}={value} needs one value per RGB channel")
  _check(all(v > 0 for v in data.std), "data.std values must be > 0")
  _check(data.workers >= 0, f"data.workers={data.workers} must be >= 0")


def batch_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Every global batch size the run uses, by config field: `batch_size`, and each
  optimizer section's own `batch_size` where set (0: the global one)."""
  config = complete(config)
  sizes = {"batch_size": config.batch_size}
  for name in OPTIM_SECTIONS:
    optim = section(config, name)
    if optim.batch_size:
      sizes[f"{name}.batch_size"] = optim.batch_size
  return sizes


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
  error set). Sweeps: every T_id value of the selected variants is checked. `config` is
  completed first (`config_schema.complete`), so a partial one works too.
  """
  config = complete(config)
  for field, optim, data, upsampled, context in _scheduled_stages(config):
    size = config.pretrain.size if data == "pretrain" else train_size
    if size is None:
      problem = schedule_error(optim, None, f"{field}.")
    else:
      batch = optim.batch_size or config.batch_size  # 0: the global batch_size
      batch_field = f"{field}.batch_size" if optim.batch_size else "batch_size"
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
  methods = [get_method(m) for m in _method_names(config) if m in method_names()]
  upsample = config.distill.reweight == "upsample"
  if sweep:  # run_sweep trains the students of its variants (sweep.method)
    if config.sweep.method not in method_names():
      return []  # check_sweep names it
    axes = {name: tuple(values) for name, values in config.sweep.axes.items()}
    selected = variants(axes, parse_subset(config.sweep.subset))
    students = [method_of(config, v) for v in selected]
    t_ids = sorted({int(variant_config(config, v).identification.epochs)
                    for v in selected if method_of(config, v).reweight})
  else:
    students = methods
    t_ids = [config.identification.epochs] if any(m.reweight for m in methods) else []
  stages = []
  if config.pretrain.enabled:
    if not config.teacher.checkpoint and not config.teacher.init:
      stages.append(("pretrain.teacher", config.pretrain.teacher, "pretrain", False, ""))
    if students and not config.student.init:
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

