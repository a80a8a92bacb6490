"""What an ablation sweep trains: its axes, the selected variants, their groups and
configs (`config.sweep`; the runner is `dett_jax.sweep`, the report `dett_jax.study`)."""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import jax
import ml_collections

from dett_jax import methods
from dett_jax.config_schema import ConfigError

AXES = ("method", "projector", "match", "transplant", "head_weight", "T_id", "lambda_up",
        "learning_rate", "epochs", "seed")
# Change the program, the parameter shapes or the schedule's length.
GROUP_AXES = ("method", "projector", "match", "transplant", "head_weight", "epochs")
DATA_AXES = ("T_id", "lambda_up")  # change the data when distill.reweight="upsample"
Tree = Any


class SweepError(ConfigError):
  """A sweep config that cannot work; the message names the field and the fix."""


def check_sweep(config: ml_collections.ConfigDict) -> list[dict]:
  """Raises SweepError for a sweep config (completed) that cannot work; returns the
  selected variants."""
  sweep = config.sweep
  if sweep.execution not in ("auto", "vmap", "loop"):
    raise SweepError(f"sweep.execution={sweep.execution!r}; choose auto, vmap or loop")
  execution(config)  # loop needs one process
  if sweep.conv not in ("auto", "patches", "xla"):
    raise SweepError(f"sweep.conv={sweep.conv!r}; choose auto, patches or xla")
  if sweep.mesh_axis and sweep.mesh_axis not in ("data", "model"):
    raise SweepError(f"sweep.mesh_axis={sweep.mesh_axis!r}; choose model (or empty: "
                     "replicated variants)")
  axes = {name: tuple(values) for name, values in sweep.axes.items()}
  unknown = [m for m in (sweep.method, *axes.get("method", ())) if m not in methods.names()]
  if unknown:
    raise SweepError(f"sweep.method / sweep.axes.method: unknown method(s) {unknown}; choose "
                     f"from {', '.join(methods.names())}")
  if any(int(e) < 1 for e in axes.get("epochs", ())):
    raise SweepError(f"sweep.axes.epochs={list(axes['epochs'])}: every value must be >= 1")
  selected = variants(axes, parse_subset(sweep.subset))
  if not selected:
    raise SweepError("the sweep selects no variant; check sweep.subset")
  return selected


def variants(axes: dict[str, Sequence], subset: dict[str, Sequence] | None = None) -> list[dict]:
  """Every combination of `axes` values (in order), restricted to `subset`'s values."""
  for name in axes:
    if name not in AXES:
      raise SweepError(f"sweep.axes: unknown axis {name!r}; choose from {', '.join(AXES)}")
    if not len(axes[name]):
      raise SweepError(f"sweep.axes.{name} is empty; list at least one value")
  subset = subset or {}
  for name, values in subset.items():
    if name not in axes:
      raise SweepError(f"sweep.subset names {name!r}, which is not a swept axis "
                       f"({', '.join(axes)})")
    unknown = [v for v in values if v not in tuple(axes[name])]
    if unknown:
      raise SweepError(f"sweep.subset: {name}={unknown} not among the axis values "
                       f"{list(axes[name])}")
  names = list(axes)
  out = []
  for combo in itertools.product(*(axes[n] for n in names)):
    variant = dict(zip(names, combo))
    if all(variant[n] in tuple(v) for n, v in subset.items()):
      out.append(variant)
  return out


def parse_subset(text: str) -> dict[str, list]:
  """'projector=linear,simkd;seed=0,1' -> {"projector": ["linear", "simkd"], "seed": [0, 1]}."""
  out = {}
  for part in filter(None, (p.strip() for p in str(text).split(";"))):
    if "=" not in part:
      raise SweepError(f"sweep.subset: {part!r} is not AXIS=VALUE[,VALUE...]")
    name, values = part.split("=", 1)
    out[name.strip()] = [_parse_value(v.strip()) for v in values.split(",") if v.strip()]
  return out


def _parse_value(text: str) -> Any:
  if text in ("True", "true"):
    return True
  if text in ("False", "false"):
    return False
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def group_key(variant: dict, reweight: str, stack: bool) -> tuple:
  """Variants with equal keys train stacked in one program."""
  if not stack:
    return tuple(sorted(variant.items()))
  axes = GROUP_AXES + (DATA_AXES if reweight == "upsample" else ())
  return tuple((a, variant[a]) for a in axes if a in variant)


def group_variants(variant_list: list[dict], reweight: str, stack: bool = True) -> list[list[dict]]:
  """Variants grouped by `group_key`, groups and members in sweep order."""
  groups: dict[tuple, list[dict]] = {}
  for v in variant_list:
    groups.setdefault(group_key(v, reweight, stack), []).append(v)
  return list(groups.values())


def variant_name(variant: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in variant.items())


def variant_config(config: ml_collections.ConfigDict, variant: dict) -> ml_collections.ConfigDict:
  """`config` with the variant's axis values applied."""
  out = ml_collections.ConfigDict(config.to_dict())
  if "projector" in variant:
    out.distill.projector = variant["projector"]
  if "match" in variant:
    out.distill.match = variant["match"]
  if "lambda_up" in variant:
    out.distill.lambda_up = float(variant["lambda_up"])
  if "learning_rate" in variant:
    out.distill.optim.learning_rate = float(variant["learning_rate"])
  if "T_id" in variant:
    out.identification.epochs = int(variant["T_id"])
  if "head_weight" in variant:
    out.distill.head_weight = float(variant["head_weight"])
  if "epochs" in variant:
    out.distill.optim.epochs = int(variant["epochs"])
  return out


def execution(config: ml_collections.ConfigDict) -> str:
  """`sweep.execution`: "vmap" / "loop", or "auto": loop on CPU in one process, else vmap."""
  setting = config.sweep.execution
  if setting == "auto":
    return "loop" if jax.default_backend() == "cpu" and jax.process_count() == 1 else "vmap"
  if setting == "loop" and jax.process_count() > 1:  # its rows' metrics are read per process
    raise SweepError("sweep.execution=loop runs in one process; with several, use vmap (or auto)")
  return setting


def method_of(config: ml_collections.ConfigDict, variant: dict) -> type[methods.Method]:
  """The method class of a variant: its `method` (default `sweep.method`); the
  `transplant=False` axis value picks that method's `no_transplant` counterpart."""
  cls = methods.get(variant.get("method", config.sweep.method))
  if variant.get("transplant") is False and cls.no_transplant:
    cls = methods.get(cls.no_transplant)
  return cls
