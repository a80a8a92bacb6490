"""The distillation methods and what each one needs (DESIGN.md section 2)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Method:
  """What a student method trains on.

  objective: "ce" (labels), "kd" (teacher logits) or "feature" (teacher feature maps).
  reweight: uses the error set (upsampling or loss weights).
  transplant: the teacher's head, frozen, is the student's classifier.
  """

  name: str
  objective: str
  reweight: bool
  transplant: bool

  @property
  def uses_teacher(self) -> bool:
    return self.objective in ("kd", "feature")

  @property
  def trains_head(self) -> bool:
    return self.objective == "feature" and not self.transplant


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dett", "feature", reweight=True, transplant=True),
    Method("kd", "kd", reweight=False, transplant=False),
    Method("kd_up", "kd", reweight=True, transplant=False),
    Method("simkd", "feature", reweight=False, transplant=True),
    Method("dett_no_transplant", "feature", reweight=True, transplant=False),
    Method("erm", "ce", reweight=False, transplant=False),
    Method("jtt", "ce", reweight=True, transplant=False),
)}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r} in distill.methods; choose from {', '.join(METHODS)}")
  return METHODS[name]
