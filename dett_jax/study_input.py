"""Checks and normalises the input of `dett_jax.study.build_study`: the swept axes and
their values, and one results dict per run (variant, seed, metrics), as builtin, JSON-ready
values."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from dett_jax.io import to_builtin


def builtin_value(value: Any) -> Any:
  """Numpy/jax scalars -> Python scalars; other values unchanged."""
  if isinstance(value, (str, bool, int, float)) or value is None:
    return value
  try:
    return to_builtin(value)
  except TypeError:
    return value


def value_key(value: Any, where: str) -> tuple[str, Any]:
  """Type-aware identity of an axis value (True != 1, but 5 == 5.0)."""
  value = builtin_value(value)
  if isinstance(value, bool):
    return ("bool", value)
  if isinstance(value, (int, float)):
    if not math.isfinite(value):
      raise ValueError(f"{where}: axis value {value!r} is not finite.")
    return ("num", float(value))
  if isinstance(value, str):
    return ("str", value)
  raise ValueError(f"{where}: axis value {value!r} has type "
                   f"{type(value).__name__}; expected str, int, float or bool.")


def clean_json(obj: Any) -> Any:
  """Deep copy with builtin scalars and non-finite floats as None (valid JSON)."""
  if isinstance(obj, Mapping):
    return {str(k): clean_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [clean_json(v) for v in obj]
  obj = builtin_value(obj)
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def validate_axes(axes: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
  """`axes` as axis -> list of builtin values; refuses a non-string axis, a value list that
  is not a list, a value of another type than str/int/float/bool, and a repeated value."""
  if not isinstance(axes, Mapping):
    raise ValueError(f"axes must be a dict axis -> list of values, got "
                     f"{type(axes).__name__}.")
  clean: dict[str, list[Any]] = {}
  for axis, values in axes.items():
    if not isinstance(axis, str):
      raise ValueError(f"Axis name {axis!r} must be a string.")
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
      raise ValueError(f"axes[{axis!r}] must be a list of values, got "
                       f"{values!r}.")
    seen: dict[tuple[str, Any], Any] = {}
    for value in values:
      key = value_key(value, f"axes[{axis!r}]")
      if key in seen:
        raise ValueError(f"axes[{axis!r}] lists {value!r} twice "
                         f"(as {seen[key]!r} and {value!r}).")
      seen[key] = value
    clean[axis] = [builtin_value(v) for v in values]
  return clean


def check_runs(runs: Any) -> None:
  """Refuses `runs` that is not a non-empty list (each run is checked by `clean_run`)."""
  if not isinstance(runs, Sequence) or isinstance(runs, (str, bytes)):
    raise ValueError(f"runs must be a list of run dicts, got "
                     f"{type(runs).__name__}.")
  if not runs:
    raise ValueError("runs is empty: a study needs at least one run.")


def canonical_variant(run: Any, index: int,
                      axes: Mapping[str, list[Any]]) -> dict[str, Any]:
  """The run's variant with each value replaced by its entry in `axes`."""
  if not isinstance(run, Mapping):
    raise ValueError(f"runs[{index}] must be a dict, got {type(run).__name__}.")
  where = f"runs[{index}] ({run.get('name', 'unnamed')!r})"
  variant = run.get("variant", {})
  if not isinstance(variant, Mapping):
    raise ValueError(f"{where}: 'variant' must be a dict axis -> value, got "
                     f"{variant!r}.")
  unknown = [axis for axis in variant if axis not in axes]
  if unknown:
    raise ValueError(f"{where}: variant has axes {unknown} that are not in "
                     f"axes (known: {list(axes)}).")
  canonical = {}
  for axis in axes:  # Axis order, not the run's key order.
    if axis not in variant:
      continue
    key = value_key(variant[axis], where)
    matches = [v for v in axes[axis] if value_key(v, where) == key]
    if not matches:
      raise ValueError(f"{where}: value {variant[axis]!r} of axis {axis!r} is "
                       f"not one of axes[{axis!r}] = {axes[axis]!r}.")
    canonical[axis] = matches[0]
  return canonical


def clean_run(run: Mapping[str, Any], variant: dict[str, Any], where: str) -> dict[str, Any]:
  """A JSON-ready copy of `run` with its canonical `variant`, after checking seed and metrics."""
  seed = builtin_value(run.get("seed"))
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"{where}: 'seed' must be an int, got {seed!r}.")
  metrics = run.get("metrics", {})
  if metrics is None:
    metrics = {}
  if not isinstance(metrics, Mapping):
    raise ValueError(f"{where}: 'metrics' must be a dict, got {metrics!r}.")
  clean = clean_json(dict(run))
  clean.update(variant=clean_json(variant), seed=seed, metrics=clean_json(metrics))
  return clean
