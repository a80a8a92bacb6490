"""Optimizers from a stage's optim config: SGD, AdamW, LARS, LAMB; warmup + cosine;
learning-rate scaling with the batch size; gradient accumulation. And `freeze`, which
keeps parameter subtrees (a transplanted head) out of any optax optimizer.

Fields of an optim config (declared, with their defaults, in dett_jax/config_schema.py
`optim`; every function here completes the section it is given with
`config_schema.complete_optim`, so a caller may leave out the fields of OPTIM_OPTIONAL):
  optimizer         sgd | adamw | lars | lamb
  learning_rate     the rate at `base_batch_size` when `lr_scaling` is linear or sqrt
  lr_scaling        none | linear | sqrt: scale by (effective batch / base_batch_size)
  base_batch_size   reference batch of the scaling rule (default 256)
  warmup_epochs     linear warmup, then `decay` (cosine or linear to 0, or constant)
  accumulate_steps  k > 1: accumulate k micro-batch gradients per update (optax.MultiSteps)
  weight_decay, momentum

With S micro-batches per epoch the schedule has epochs * S // k updates, the first
int(warmup_epochs * S // k) of them warmup; `schedule_error` says why a stage's values
leave it no decay step (make_optimizer raises it as a ValueError; the config checks
name the stage's fields with it before any compute).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import optax

from dett_jax.config_schema import complete_optim
from dett_jax.sharding import path_name

OPTIMIZERS = ("sgd", "adamw", "lars", "lamb")
LR_SCALING = ("none", "linear", "sqrt")


def scaled_learning_rate(optim: Any, effective_batch_size: int) -> float:
  """`optim.learning_rate` after the config's scaling rule for this batch size."""
  optim = complete_optim(optim)
  rule = optim.lr_scaling
  ratio = effective_batch_size / optim.base_batch_size
  if rule == "none":
    return float(optim.learning_rate)
  if rule == "linear":
    return float(optim.learning_rate * ratio)
  if rule == "sqrt":
    return float(optim.learning_rate * math.sqrt(ratio))
  raise ValueError(f"lr_scaling={rule!r}; choose from {', '.join(LR_SCALING)}")


def _matrices_only(params: Any) -> Any:
  """Mask: weight decay / trust ratio on kernels only, not on biases and norm scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def schedule_steps(optim: Any, steps_per_epoch: int) -> tuple[int, int]:
  """(updates, warmup updates) of the stage's schedule with `steps_per_epoch` micro-batches
  per epoch, as `make_optimizer` counts them (before its floor of 1 on both)."""
  optim = complete_optim(optim)
  k = int(optim.accumulate_steps)
  return (int(optim.epochs * steps_per_epoch // k),
          int(optim.warmup_epochs * steps_per_epoch // k))


def schedule_error(optim: Any, steps_per_epoch: int | None, prefix: str = "",
                   per_epoch: str | None = None) -> str | None:
  """Why the stage's warmup + cosine schedule cannot be built with `steps_per_epoch`
  micro-batches per epoch (one line naming the values and the fix), or None if it can.

  `prefix` goes before each field name (e.g. "distill.optim."); `per_epoch` describes the
  steps per epoch (default "S steps per epoch"); `steps_per_epoch=None` (not known yet)
  checks only what fails for any number. Refused: warmup_epochs < 0; no optimizer
  update (accumulate_steps above all the stage's micro-batches); accumulate_steps above
  the steps of one epoch; and a schedule without decay steps (`optax`'s cosine decay needs
  updates > max(warmup updates, 1)): warmup_epochs >= epochs, a single update, or a
  warmup that rounds up to every update.
  """
  optim = complete_optim(optim)
  k = int(optim.accumulate_steps)
  epochs, warmup_epochs = optim.epochs, optim.warmup_epochs
  p = prefix
  if k < 1:
    return f"{p}accumulate_steps={k} must be >= 1 (1: no accumulation)"
  if warmup_epochs < 0:
    return f"{p}warmup_epochs={warmup_epochs:g} must be >= 0 (0: no warmup)"
  if steps_per_epoch is None:
    if warmup_epochs >= epochs:
      return (f"{p}warmup_epochs={warmup_epochs:g} leaves no decay steps with epochs={epochs} "
              "(for any number of steps per epoch); lower warmup_epochs below epochs or "
              "raise epochs")
    return None
  s = int(steps_per_epoch)
  per_epoch = per_epoch or f"{s} steps per epoch"
  if s < 1:
    return f"steps_per_epoch={s} must be >= 1 (one full batch); lower the batch size"
  updates, warmup = schedule_steps(optim, s)
  if updates < 1:
    return (f"{p}accumulate_steps={k} with epochs={epochs} over {per_epoch} gives no optimizer "
            f"update ({epochs * s} micro-batches in all); lower accumulate_steps to at most "
            f"{s} or raise epochs")
  if k > s:
    return (f"{p}accumulate_steps={k} exceeds the {per_epoch} (one update would span "
            f"epochs); lower accumulate_steps to at most {s}, or lower the batch size")
  if updates > max(warmup, 1):
    return None
  counts = f"{updates} update{'s' if updates != 1 else ''}"
  accumulation = f"accumulate_steps={k} over " if k > 1 else ""
  if warmup_epochs >= epochs:
    return (f"{p}warmup_epochs={warmup_epochs:g} leaves no decay steps with epochs={epochs} "
            f"(and {accumulation}{per_epoch}: {counts}, all warmup); lower warmup_epochs "
            "below epochs or raise epochs")
  if updates < 2:
    fix = (f"raise epochs or lower accumulate_steps to at most {epochs * s // 2}"
           if epochs * s >= 2 else "raise epochs or lower the batch size")
    return (f"{p}epochs={epochs} with {accumulation}{per_epoch} gives {counts}, and the "
            f"warmup + cosine schedule needs at least 2; {fix}")
  return (f"{p}warmup_epochs={warmup_epochs:g} rounds to {warmup} warmup updates of the {counts} "
          f"of epochs={epochs} ({accumulation}{per_epoch}), leaving no decay steps; lower "
          "warmup_epochs or raise epochs")


DECAYS = ("cosine", "linear", "constant")


def learning_rate_schedule(decay: str, learning_rate: float, warmup: int, updates: int
                           ) -> optax.Schedule:
  """Linear warmup over `warmup` of `updates` updates, then `decay`: "cosine" (to 0),
  "linear" (to 0 at the last update, Hugging Face's `get_linear_schedule_with_warmup`)
  or "constant".

  Examples:
    >>> from dett_jax.optimizers import learning_rate_schedule
    >>> schedule = learning_rate_schedule("linear", 1.0, warmup=2, updates=10)
    >>> [round(float(schedule(s)), 3) for s in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
  """
  if decay == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else learning_rate, learning_rate,
                                              max(warmup, 1), updates)
  if decay not in DECAYS:
    raise ValueError(f"decay={decay!r}; choose from {', '.join(DECAYS)}")
  after = (optax.linear_schedule(learning_rate, 0.0, max(updates - warmup, 1))
           if decay == "linear" else optax.constant_schedule(learning_rate))
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup), after],
                              [warmup])


def make_optimizer(optim: Any, steps_per_epoch: int, batch_size: int = 256
                   ) -> optax.GradientTransformation:
  """The stage's optimizer; `steps_per_epoch` counts micro-batches of `batch_size`.

  Raises ValueError (see `schedule_error`) when the values leave the warmup + cosine
  schedule no decay step, e.g. warmup_epochs >= epochs or accumulate_steps above
  `steps_per_epoch`.
  """
  optim = complete_optim(optim)
  problem = schedule_error(optim, steps_per_epoch)
  if problem:
    raise ValueError(problem)
  k = int(optim.accumulate_steps)
  updates = max(1, optim.epochs * steps_per_epoch // k)
  warmup = int(optim.warmup_epochs * steps_per_epoch // k)
  lr = scaled_learning_rate(optim, batch_size * k)
  schedule = learning_rate_schedule(optim.decay, lr, warmup, updates)
  name, wd = optim.optimizer, optim.weight_decay
  if name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(wd),
                     optax.sgd(schedule, momentum=optim.momentum, nesterov=True))
  elif name == "adamw":
    tx = optax.adamw(schedule, weight_decay=wd)
  elif name == "lars":
    tx = optax.lars(schedule, weight_decay=wd, weight_decay_mask=_matrices_only,
                    trust_ratio_mask=_matrices_only, momentum=optim.momentum)
  elif name == "lamb":
    tx = optax.lamb(schedule, weight_decay=wd, mask=_matrices_only)
  else:
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
  return optax.MultiSteps(tx, every_k_schedule=k) if k > 1 else tx


def freeze(tx: optax.GradientTransformation, frozen_paths: Sequence[str | Sequence[str]]
           ) -> optax.GradientTransformation:
  """`tx` for every parameter except the subtrees at `frozen_paths`, whose updates are 0.

  Built from `optax.multi_transform` and `optax.set_to_zero`: frozen leaves get no
  optimizer state and a zero update (weight decay included), so they stay bit-identical.
  This lets a transplanted head live inside a single parameter tree. A path is a
  "/"-separated string of keys ("head", "student/head") or a sequence of keys; it
  freezes every leaf at or below it. Works on any pytree of parameters (nested dicts,
  `nnx.State`).

  Args:
    tx: the optimizer of the trainable parameters.
    frozen_paths: subtrees to freeze; each must match at least one leaf (else ValueError
      at `init`, naming the path).

  Returns:
    The combined `optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from dett_jax import freeze
    >>> params = {"backbone": {"w": jnp.ones(2)}, "head": {"kernel": jnp.ones((2, 2))}}
    >>> tx = freeze(optax.adamw(0.1, weight_decay=0.5), ["head"])
    >>> opt_state = tx.init(params)
    >>> grads = {"backbone": {"w": jnp.ones(2)}, "head": {"kernel": jnp.ones((2, 2))}}
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> print(params["head"]["kernel"], params["backbone"]["w"].round(3))  # head unchanged
    [[1. 1.]
     [1. 1.]] [0.85 0.85]
  """
  prefixes = [tuple(p.strip("/").split("/")) if isinstance(p, str) else tuple(map(str, p))
              for p in frozen_paths]

  def labels(params: Any) -> Any:
    names = [tuple(path_name(path).split("/"))
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for prefix in prefixes:
      if not any(name[:len(prefix)] == prefix for name in names):
        top = sorted({"/".join(name[:len(prefix)]) for name in names})
        raise ValueError(f"freeze: no parameter at {'/'.join(prefix)!r}; paths at that depth: "
                         f"{', '.join(top[:10])}")

    def label(path: tuple, _: Any) -> str:
      name = tuple(path_name(path).split("/"))
      return "frozen" if any(name[:len(p)] == p for p in prefixes) else "trainable"

    return jax.tree_util.tree_map_with_path(label, params)

  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
