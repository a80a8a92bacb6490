"""The distillation methods and what each one needs (DESIGN.md section 2)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Method:
  """What a student method trains on.

  objective: "ce" (labels), "kd" (teacher logits), "feature" (teacher feature maps) or
    "gdro" (group-DRO cross-entropy on the training group labels, `objectives.group_dro_loss`).
  reweight: uses the error set (upsampling or loss weights).
  transplant: the teacher's head, frozen, is the student's classifier.
  head_term: feature methods: adds `distill.head_weight` x the MSE between the transplanted
    head's logits on the projected student and the teacher's logits (matching that sees
    the head; see `training.steps.method_loss`).
  standardize: feature methods: both maps divided per channel by the teacher feature's
    standard deviation over the training set before the MSE.
  """

  name: str
  objective: str
  reweight: bool
  transplant: bool
  head_term: bool = False
  standardize: bool = False

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
    # DeTT variants whose matching sees the head (the paper's method is `dett`). Appended:
    # a student's seed follows its position here.
    Method("dett_head", "feature", reweight=True, transplant=True, head_term=True),
    Method("dett_std", "feature", reweight=True, transplant=True, standardize=True),
    # The oracle reference: group-DRO cross-entropy on the training group labels (its
    # group weights live in the state's batch_stats["gdro"]). Appended, as above.
    Method("gdro", "gdro", reweight=False, transplant=False),
)}


# The debiased teachers `teacher.debias` may list (DESIGN.md section 3).
TEACHER_DEBIAS = ("dfr", "gdro")


def parse_debias(debias: str) -> list[str]:
  """`teacher.debias` ("dfr,gdro", "" for none) as a list of names, in order."""
  return [d.strip() for d in str(debias).split(",") if d.strip()]


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r} in distill.methods; choose from {', '.join(METHODS)}")
  return METHODS[name]
