"""The config schema: every field a run reads, with its default and what it means.

`defaults()` is the whole run config of the demo (configs/synthetic.py is `defaults()`
itself, and every other config file derives from that), so the config files and the
schema cannot disagree. `complete(config)` returns a copy of a config with every declared
field it lacks filled from here (a hand-written or older config keeps working) and
refuses, with a `ConfigError` naming the field and the nearest declared one, a field that
is declared nowhere (a typo would otherwise be ignored). The run's code then reads every
field directly (`config.precision`, never `config.get("precision", default)`):
`validation.validate_config` completes the config before checking it and returns the
completed config, which is what the run uses.

Sections whose fields depend on a choice:
  data       one field set per data set (`data_defaults(name)`): `data.name` picks it.
  sweep      only in sweep configs (configs/ablation.py, configs/tuning.py): "sweep" in
             a config is what makes train.py run `dett_jax.sweep`, so `defaults()` has
             none unless asked (`defaults(sweep=True)`), and `complete` fills a sweep
             section only where the config has one. `sweep.axes` is an open group (axis
             name -> values), kept as given; `dett_jax.sweep` checks its names.
  optimizers `pretrain.teacher`, `pretrain.student`, `teacher.optim`, `identification`
             and `distill.optim` (OPTIM_SECTIONS) share one field set (`optim()`), each
             with its own values. `augment` None means "the global `augment`": `complete`
             resolves it, so a completed config holds a bool there.

Public functions that take one section from a caller (`optimizers.make_optimizer`,
`data.load_splits`, `Preprocess.from_config`) complete that section at their entry
(`complete_optim`, `complete_data`), so hand-built partial sections work there too.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from dett_jax.config_data import (ARCHS, DATA_SETS, IMAGENET_MEAN, IMAGENET_STD, TEXT_ARCHS,
                                  TEXT_DATA_SETS, data_sets)

ConfigDict = ml_collections.ConfigDict

OPTIM_SECTIONS = ("pretrain.teacher", "pretrain.student", "teacher.optim", "identification",
                  "distill.optim")
OPEN_GROUPS = ("sweep.axes",)  # kept as given: any field names
# Fields that were renamed: the message that says what replaced them.
RENAMED = {"teacher.dfr": "teacher.dfr was replaced by teacher.debias; use "
                          "--config.teacher.debias=dfr (or \"\" for no debiased teacher)"}


class ConfigError(ValueError):
  """A config field has a value that cannot work; the message names the field and the fix."""


# ---------------------------------------------------------------------------
# The declared fields and their defaults.
# ---------------------------------------------------------------------------

def optim(epochs: int, learning_rate: float, weight_decay: float = 5e-4,
          optimizer: str = "sgd") -> ConfigDict:
  """One training stage's optimizer section (see dett_jax/optimizers.py)."""
  return ConfigDict(dict(
      optimizer=optimizer,  # sgd | adamw | lars | lamb
      epochs=epochs,  # passes over the stage's training examples
      learning_rate=learning_rate,  # peak rate (at base_batch_size with lr_scaling linear/sqrt)
      momentum=0.9,  # sgd (Nesterov) and lars
      weight_decay=weight_decay,  # decoupled; kernels only for lars and lamb
      warmup_epochs=0.0,  # linear warmup, then `decay` over the remaining updates
      decay="cosine",  # cosine | linear (to 0, as Hugging Face's linear schedule) | constant
      batch_size=0,  # this stage's global batch; 0: the global batch_size
      accumulate_steps=1,  # k > 1: one update per k micro-batches (gradient accumulation)
      lr_scaling="none",  # or linear/sqrt in (batch * accumulate_steps) / base_batch_size
      base_batch_size=256,  # reference batch of lr_scaling
      augment=config_dict.placeholder(bool),  # augment this stage; None: the global augment
  ))


# An optimizer section passed on its own (`complete_optim`) must have OPTIM_REQUIRED, whose
# defaults differ by stage; the others (the same default in every stage) it may leave out.
OPTIM_REQUIRED = ("optimizer", "epochs", "learning_rate", "weight_decay")
OPTIM_OPTIONAL = ("momentum", "warmup_epochs", "batch_size", "accumulate_steps", "lr_scaling",
                  "base_batch_size", "augment", "decay")
# Fields added after 0.2.0, with their defaults: a stage checkpoint's signature holds them
# only when not at the default, so checkpoints written before they existed stay valid.
OPTIM_LATER = {"decay": "cosine"}


def data_defaults(name: str = "synthetic") -> ConfigDict:
  """The `data` section of data set `name` with every field at its default."""
  sets = data_sets()
  if name not in sets:
    raise ConfigError(f"data.name={name!r}; choose from {', '.join(sets)}")
  return ConfigDict(dict(name=name, **sets[name]))


def sweep_defaults() -> ConfigDict:
  """The `sweep` section (dett_jax/sweep.py); `axes` is an open group."""
  return ConfigDict(dict(
      axes=ConfigDict(),  # axis name -> tuple of values (see dett_jax.sweep.AXES); {}: one variant
      subset="",  # restrict the variants, e.g. "projector=linear,simkd;seed=0,1"
      method="dett",  # the students' method (transplant=False variants use dett_no_transplant)
      stack=True,  # False: every variant its own program (for comparison)
      execution="auto",  # vmap | loop | auto (loop on CPU, where vmapped convolutions are slow)
      conv="auto",  # vmapped groups' convolutions: patches | xla | auto (patches on CPU)
      mesh_axis="",  # "model": shard the stacked variants over the mesh's model axis
  ))


def defaults(sweep: bool = False) -> ConfigDict:
  """Every field a run reads, at its default: the demo (configs/synthetic.py).

  `sweep=True` adds the `sweep` section (a sweep config); without it the config runs the
  pipeline (train.py runs a sweep exactly when the config has a `sweep` section).
  """
  config = _run_options()
  config.data = data_defaults("synthetic")
  # Mesh (data, model); parameters replicated or FSDP-sharded by path rules
  # ("regex=kind", kinds replicated/fsdp/model; see dett_jax/sharding.py).
  config.mesh = ConfigDict(dict(
      data=-1,  # devices on the data axis (-1: all, divided by model)
      model=1,  # devices on the model axis
      cpu_devices=0,  # XLA devices a CPU host is split into (0: one per core)
      strategy="replicated",  # or fsdp
      rules=()))  # "regex=kind" rules matched before the strategy's own
  # Pretraining on the built-in benchmark's unbiased task (a stand-in for ImageNet).
  config.pretrain = ConfigDict(dict(
      enabled=True,  # False: start from teacher.init / student.init (or random weights)
      size=4000))  # pretraining examples
  config.pretrain.teacher = optim(5, 3e-3, optimizer="adamw", weight_decay=1e-4)
  config.pretrain.student = optim(5, 3e-3, optimizer="adamw", weight_decay=1e-4)
  _networks(config)
  # Identification model: student architecture, ERM for T_id epochs.
  config.identification = optim(epochs=2, learning_rate=0.03)
  config.distill = _distill()
  if sweep:
    config.sweep = sweep_defaults()
  return config


def _run_options() -> ConfigDict:
  """The top-level fields: seeds, batches, logging, checkpoints, numerics."""
  config = ConfigDict()
  config.seed = 0  # the run's seed (data order, initialisations)
  config.batch_size = 128  # global; must be divisible by the mesh's data axis
  config.eval_batch_size = 256  # global batch of evaluation
  config.augment = True  # augment training images (data.train_transform); per stage: optim.augment
  config.log_every_steps = 20  # training metrics every this many steps
  config.checkpoint_every_steps = 50  # also checkpoint every this many steps (0: epoch ends only)
  config.checkpoint_every_minutes = 0.0  # >0: also checkpoint after this much wall-clock time
  config.keep_checkpoints = 2  # recent checkpoints kept per stage (each holds the best so far)
  config.min_free_mb = 100  # refuse to start on a workdir disk with less free space
  config.on_nonfinite = "stop"  # a NaN/inf loss or gradient: "stop" the run, or "skip" the step
  config.stop_after_steps = 0  # >0: stop each stage after this many steps, as if preempted
  config.precision = "float32"  # or bfloat16: activations/matmuls; params, losses, BN stats f32
  # Convolutions on maps smaller than their kernel as patches x matrix: "auto" (on CPU,
  # where XLA's own path for them is ~10x slower), "patches" or "xla".
  config.small_map_conv = "auto"
  # Modules to import before the run, comma-separated: they register methods of your own
  # (`dett_jax.methods.register`) that distill.methods may then name.
  config.plugins = ""
  return config


def _transformer() -> dict[str, Any]:
  """A text encoder's sizes (arch bert / distilbert started without a Hugging Face folder;
  dett_jax/models/bert.py): the tiny models of the built-in text benchmark."""
  return dict(
      layers=2,  # encoder layers
      hidden=64,  # hidden width (BERT-base: 768)
      heads=2,  # attention heads (must divide hidden)
      mlp_dim=128,  # feed-forward width (BERT-base: 3072)
      max_positions=128,  # position embeddings (BERT: 512); data.max_length must fit
      dropout=0.1)  # hidden, attention and classifier dropout


def _networks(config: ConfigDict) -> None:
  """The teacher (with its optimizer), group DRO and the student."""
  config.teacher = ConfigDict(dict(
      arch="resnet",  # resnet (image data) | bert | distilbert (text data)
      depth=18,  # ResNet depth: 10, 18, 34 or 50
      width=0.125,  # width multiplier (stage widths round(64 * width) * 2**i)
      stem="small",  # small (one 3x3 stride-1 conv, no pooling) or imagenet (7x7/2 + max-pool)
      **_transformer(),
      debias="dfr",  # debiased teachers to produce, comma-separated: "dfr", "gdro" ("" none)
      # Checkpoint to start from: a ResNet (e.g. imported ImageNet weights), or for bert /
      # distilbert a Hugging Face folder (config.json, model.safetensors; its sizes win).
      init="",
      checkpoint="",  # a finished teacher: skip training it
      dfr_c_grid=(1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01),  # DFR: C values of the L1 head
      dfr_num_refits=10))  # DFR: heads averaged over group-balanced validation halves
  config.teacher.optim = optim(epochs=4, learning_rate=0.03)  # ERM and group-DRO teachers
  # Group DRO (Sagawa et al. 2020), for the gdro teacher and the gdro student.
  config.gdro = ConfigDict(dict(
      eta=0.01,  # step size of the group weights
      adjustment=0.0))  # C of the adjustment C / sqrt(n_g) added to each group loss
  config.student = ConfigDict(dict(
      arch="resnet", depth=10, width=0.125, stem="small",  # as teacher.arch / depth / width / stem
      **_transformer(),
      init=""))  # checkpoint to start from (skips student pretraining), as teacher.init


def _distill() -> ConfigDict:
  """The students: methods, the teacher they distil, reweighting, losses, optimizer."""
  distill = ConfigDict(dict(
      # dett_head: DeTT whose matching sees the transplanted head, the recommended
      # variant (docs/measurements.md, "DeTT fidelity"); dett: the paper's method, beside it.
      methods="dett,dett_head,kd,kd_up,simkd,dett_no_transplant,erm,jtt",
      teacher="dfr",  # which teacher is distilled: "dfr", "gdro" (debiased) or "erm"
      lambda_up=20.0,  # weight (or copies) of the error set's examples
      reweight="upsample",  # or "loss_weight"
      projector="simkd",  # identity | linear | simkd | simkd_dw
      projector_factor=2,  # simkd projectors: bottleneck channels = teacher channels // this
      match="map",  # match feature maps, or "pooled" features
      temperature=3.0,  # KD softmax temperature
      kd_ce_weight=0.0,  # KD: weight a of the label cross-entropy ((1 - a) x the KD term)
      head_weight=1.0,  # dett_head: weight of the head-space term (logit MSE through h_T)
      # Text encoders: weight of a second matched feature, the masked mean of the last
      # hidden states over real tokens (student through its own Dense projector); 0: off.
      hidden_weight=0.0,
      select="val_worst_group",  # or "last"
      teacher_cache=False))  # True: teacher outputs computed once (needs no augmentation)
  distill.optim = optim(epochs=6, learning_rate=2e-3, optimizer="adamw", weight_decay=1e-4)
  return distill


def schema(config: Mapping[str, Any] | None = None) -> ConfigDict:
  """The declared fields of `config`: `defaults()` with the data set `config.data.name`
  names and, where `config` has one, the sweep section."""
  config = config if config is not None else {}
  out = defaults(sweep="sweep" in config)
  data = config["data"] if "data" in config else None
  if _is_group(data) and "name" in data:
    out.data = data_defaults(data["name"])
  return out


def _is_group(value: Any) -> bool:
  return isinstance(value, (ConfigDict, Mapping))


# ---------------------------------------------------------------------------
# Completion.
# ---------------------------------------------------------------------------

def complete(config: Mapping[str, Any], strict: bool = True) -> ConfigDict:
  """A copy of `config` with every declared field it lacks at its default.

  Raises ConfigError for a field the schema does not declare (naming it and the nearest
  declared name), a group of fields given as a value, or an unknown `data.name`.
  `strict=False` keeps undeclared fields instead (for reading an older `config.json`).
  Optimizer sections' `augment=None` becomes the global `augment`. Idempotent.
  """
  out = _copy(config)
  try:
    declared = schema(out)
  except ConfigError:
    if strict:
      raise
    declared = defaults(sweep="sweep" in out)
    del declared["data"]  # an unknown data set: leave its fields as they are
  _fill(out, declared, "", strict)
  for path in OPTIM_SECTIONS:
    stage = section(out, path)
    if stage.augment is None:
      stage.augment = bool(out.augment)
  return out


def complete_optim(optim_config: Mapping[str, Any]) -> ConfigDict:
  """A copy of one optimizer section with the fields of OPTIM_OPTIONAL it lacks at their
  defaults (`augment` stays None: the global `augment`, which one section does not know).
  Raises ConfigError for an undeclared field, or a missing one of OPTIM_REQUIRED."""
  out = _copy(optim_config)
  declared = optim(epochs=1, learning_rate=1.0)
  _refuse_unknown(out, list(declared.keys()), "optim.")
  missing = [k for k in OPTIM_REQUIRED if k not in out]
  if missing:
    raise ConfigError(f"an optimizer section needs {', '.join(missing)} (it has "
                      f"{', '.join(out.keys()) or 'no field'}); see config_schema.optim")
  for key in OPTIM_OPTIONAL:
    if key not in out:
      out[key] = declared[key]
  return out


def complete_data(data: Mapping[str, Any]) -> ConfigDict:
  """A copy of a `data` section with every field of its data set (`name`, default
  "synthetic") it lacks at its default. Raises ConfigError for an undeclared field."""
  out = _copy(data)
  wrapped = ConfigDict({"data": out})
  _fill(wrapped, ConfigDict({"data": data_defaults(out.name if "name" in out else "synthetic")}),
        "", strict=True)
  return wrapped.data


def _copy(config: Mapping[str, Any]) -> ConfigDict:
  """An unlocked copy of `config` (a ConfigDict or a dict) with references resolved."""
  if isinstance(config, ConfigDict):
    out = config.copy_and_resolve_references()
  elif isinstance(config, Mapping):
    out = ConfigDict(copy.deepcopy(dict(config)))
  else:
    raise ConfigError(f"a config is a ConfigDict or a dict, not {type(config).__name__}")
  out.unlock()
  return out


def section(config: ConfigDict, path: str) -> Any:
  """The field or section at a dotted `path` of `config` ("distill.optim")."""
  for part in path.split("."):
    config = config[part]
  return config


def _fill(node: ConfigDict, declared: ConfigDict, prefix: str, strict: bool) -> None:
  """Adds `declared`'s fields that `node` lacks (recursively); refuses undeclared ones."""
  for key in list(node.keys()):
    if f"{prefix}{key}" in RENAMED and strict:
      raise ConfigError(RENAMED[f"{prefix}{key}"])
  if strict:
    _refuse_unknown(node, list(declared.keys()), prefix)
  for key, default in declared.items():
    path = f"{prefix}{key}"
    if key not in node or (node[key] is None and isinstance(default, ConfigDict)):
      node[key] = copy.deepcopy(default)
    elif isinstance(default, ConfigDict) and path not in OPEN_GROUPS:
      if not _is_group(node[key]):
        raise ConfigError(f"{path}={node[key]!r}: {path} is a group of fields "
                          f"({', '.join(default.keys())}), not a value; set them as "
                          f"--config.{path}.FIELD=VALUE")
      _fill(node[key], default, path + ".", strict)


def _refuse_unknown(node: ConfigDict, fields: list[str], prefix: str) -> None:
  for key in node.keys():
    if key in fields:
      continue
    parent = prefix[:-1] or "the config"
    if prefix == "data.":
      parent = f"data (data.name={node.name!r})" if "name" in node else "data"
    close = difflib.get_close_matches(key, fields, n=1)
    hint = f"did you mean {prefix}{close[0]}? " if close else ""
    raise ConfigError(f"{prefix}{key}: unknown config field, {parent} declares no {key!r}; "
                      f"{hint}its fields: {', '.join(fields)} (see dett_jax/config_schema.py)")
