"""A method defined outside the package: the plug-in tests register it by importing this
module (`config.plugins="plugin_method"`), with no edit to dett_jax.

`tracked_kd`: Hinton KD at temperature 2 on the error set's weights, which also keeps a
running mean of its loss as its own state (`collections["tracker"]`), checkpointed and
restored with the train state like BatchNorm statistics.
"""

import jax
import jax.numpy as jnp

from dett_jax import methods, objectives


@methods.register
class TrackedKD(methods.Method):
  """KD (tau = 2) with a running mean of its loss in `collections["tracker"]`."""

  name = "tracked_kd"
  needs_teacher = True
  reweight = True

  def init(self, rng, student, setup):
    state = super().init(rng, student, setup)
    state["collections"]["tracker"] = {"mean_loss": jnp.zeros(()), "count": jnp.zeros(())}
    return state

  def loss(self, params, collections, batch, frozen, rng=None):
    out, collections = self.forward(params, collections, batch, frozen, True, rng)
    kd = objectives.kd_loss(out["logits"], batch["teacher_logits"], 2.0)
    loss = objectives.weighted_mean(kd, methods.example_weights(batch))
    tracker = collections["tracker"]
    count = tracker["count"] + 1
    mean = tracker["mean_loss"] + (jax.lax.stop_gradient(loss) - tracker["mean_loss"]) / count
    collections = {**collections, "tracker": {"mean_loss": mean, "count": count}}
    return self.finish(loss, out, collections, batch, tracked_loss=mean)
