"""Optimizers from a stage's optim config: SGD, AdamW, LARS, LAMB; warmup + cosine;
learning-rate scaling with the batch size; gradient accumulation.

Fields of an optim config (see configs/synthetic.py `optim`):
  optimizer         sgd | adamw | lars | lamb
  learning_rate     the rate at `base_batch_size` when `lr_scaling` is linear or sqrt
  lr_scaling        none | linear | sqrt: scale by (effective batch / base_batch_size)
  base_batch_size   reference batch of the scaling rule (default 256)
  warmup_epochs     linear warmup, then cosine decay to 0 over all updates
  accumulate_steps  k > 1: accumulate k micro-batch gradients per update (optax.MultiSteps)
  weight_decay, momentum
"""

from __future__ import annotations

import math
from typing import Any

import jax
import optax

OPTIMIZERS = ("sgd", "adamw", "lars", "lamb")
LR_SCALING = ("none", "linear", "sqrt")


def scaled_learning_rate(optim: Any, effective_batch_size: int) -> float:
  """`optim.learning_rate` after the config's scaling rule for this batch size."""
  rule = optim.get("lr_scaling", "none")
  ratio = effective_batch_size / optim.get("base_batch_size", 256)
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


def make_optimizer(optim: Any, steps_per_epoch: int, batch_size: int = 256
                   ) -> optax.GradientTransformation:
  """The stage's optimizer; `steps_per_epoch` counts micro-batches of `batch_size`."""
  k = int(optim.get("accumulate_steps", 1) or 1)
  updates = max(1, optim.epochs * steps_per_epoch // k)
  warmup = int(optim.warmup_epochs * steps_per_epoch // k)
  lr = scaled_learning_rate(optim, batch_size * k)
  schedule = optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, max(warmup, 1), updates)
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
