"""The method registry: every method is one `Method` subclass registered by name.

A method from your own module runs through `train.py`, sweeps, evaluation and the report
once registered (`@methods.register`); list its module in `config.plugins` so that
`train.py` imports it (docs/design.md, "Adding a method").

Examples:
  >>> from dett_jax import methods
  >>> methods.get("dett").needs_teacher, methods.get("erm").reweight
  (True, False)
  >>> "gdro" in methods.names()
  True
"""

from __future__ import annotations

from typing import TypeVar

from dett_jax.methods.base import (Method, Models, Setup, accuracy, apply_module,
                                   example_weights, pool, teacher_outputs)
from dett_jax.methods.classifier import ERM, JTT, KD, KDUp
from dett_jax.methods.feature import (DeTTHead, DeTTNoTransplant, DeTTStd, FeatureMatching,
                                      SimKD, apply_projector, matched_feature_loss,
                                      transplanted_logits)
from dett_jax.methods.gdro import GroupDRO

M = TypeVar("M", bound=type[Method])
_REGISTRY: dict[str, type[Method]] = {}


def register(cls: M) -> M:
  """Registers a `Method` subclass under its `name` (a class decorator); re-registering a
  name replaces the earlier class."""
  if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
    raise TypeError(f"register takes a Method subclass with a name, got {cls!r}")
  _REGISTRY[cls.name] = cls
  return cls


def get(name: str) -> type[Method]:
  """The method class registered as `name` (ValueError naming the choices otherwise)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(sorted(_REGISTRY))} "
                     "(a method of your own: register it and list its module in config.plugins)")
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  """Every registered method name, built-ins first."""
  return tuple(_REGISTRY)


def parse(methods: str) -> list[str]:
  """A comma-separated method list ("dett, kd") as names, in order."""
  return [m.strip() for m in str(methods).split(",") if m.strip()]


for _cls in (FeatureMatching, ERM, KD, KDUp, SimKD, DeTTNoTransplant, JTT, DeTTHead, DeTTStd,
             GroupDRO):
  register(_cls)
BUILTIN = tuple(_REGISTRY)  # the package's own methods (plug-ins add to `names()`)

# The debiased teachers `teacher.debias` may list (docs/design.md, "Debiased teachers").
TEACHER_DEBIAS = ("dfr", "gdro")


def parse_debias(debias: str) -> list[str]:
  """`teacher.debias` ("dfr,gdro", "" for none) as a list of names, in order."""
  return [d.strip() for d in str(debias).split(",") if d.strip()]


__all__ = ["Method", "Models", "Setup", "register", "get", "names", "parse", "apply_module",
           "apply_projector", "matched_feature_loss", "transplanted_logits", "teacher_outputs",
           "example_weights", "accuracy", "pool", "BUILTIN", "TEACHER_DEBIAS", "parse_debias",
           "ERM", "JTT", "KD", "KDUp", "GroupDRO", "FeatureMatching", "SimKD",
           "DeTTNoTransplant", "DeTTHead", "DeTTStd"]
