"""Group DRO (Sagawa et al. 2020): cross-entropy on the training group labels, the
worst groups upweighted online. The oracle reference (it reads group labels)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dett_jax import objectives
from dett_jax.methods.base import Method, Setup, example_weights


class GroupDRO(Method):
  """`objectives.group_dro_loss` on `batch["group"]`.

  Its state, the group weights q `[G]` (1/G at the start), lives in
  `collections["gdro"]["q"]`: never seen by the optimizer, checkpointed with the state,
  kept by a skipped step. Settings: `gdro.eta` (the step size) and `gdro.adjustment` C,
  which becomes `frozen["gdro_adjustment"]` = C / sqrt(training group counts).
  """

  name = "gdro"

  def init(self, rng, student, setup: Setup):
    state = super().init(rng, student, setup)
    q = jnp.full((setup.num_groups,), 1.0 / setup.num_groups, jnp.float32)
    return {**state, "collections": {**state["collections"], "gdro": {"q": q}}}

  def frozen(self, setup: Setup):
    counts = np.maximum(np.asarray(setup.group_counts, np.float64), 1.0)
    adjustment = float(self.config.gdro.adjustment) / np.sqrt(counts)
    return {"gdro_adjustment": jnp.asarray(adjustment, jnp.float32)}

  def loss(self, params, collections, batch, frozen, rng=None):
    out, collections = self.forward(params, collections, batch, frozen, True, rng)
    weights = example_weights(batch)
    ce = objectives.cross_entropy(out["logits"], batch["label"])
    loss, q, _, _ = objectives.group_dro_loss(
        ce, batch["group"], weights, collections["gdro"]["q"], eta=float(self.config.gdro.eta),
        adjustment=frozen["gdro_adjustment"])
    collections = {**collections, "gdro": {"q": q}}
    return self.finish(loss, out, collections, batch,
                       ce_loss=objectives.weighted_mean(ce, weights), gdro_max_q=jnp.max(q))
