"""Methods whose student keeps its own classifier: ERM, JTT, and Hinton KD (with and
without upsampling)."""

from __future__ import annotations

from dett_jax import objectives
from dett_jax.methods.base import Method, example_weights


class ERM(Method):
  """Cross-entropy on the labels (`erm`); `jtt` is the same on the error set's weights."""

  name = "erm"

  def loss(self, params, collections, batch, frozen, rng=None):
    out, collections = self.forward(params, collections, batch, frozen, True, rng)
    ce = objectives.cross_entropy(out["logits"], batch["label"])
    return self.finish(objectives.weighted_mean(ce, example_weights(batch)), out, collections,
                       batch)


class JTT(ERM):
  """Just Train Twice: ERM with the error set upweighted (or upsampled)."""

  name = "jtt"
  reweight = True


class KD(Method):
  """Hinton KD of the teacher's logits: (1 - a) tau^2 KL + a CE, with tau =
  `distill.temperature` and a = `distill.kd_ce_weight`."""

  name = "kd"
  needs_teacher = True

  def loss(self, params, collections, batch, frozen, rng=None):
    out, collections = self.forward(params, collections, batch, frozen, True, rng)
    weights, settings = example_weights(batch), self.config.distill
    kd = objectives.weighted_mean(
        objectives.kd_loss(out["logits"], batch["teacher_logits"], settings.temperature), weights)
    ce = objectives.weighted_mean(objectives.cross_entropy(out["logits"], batch["label"]), weights)
    loss = (1.0 - settings.kd_ce_weight) * kd + settings.kd_ce_weight * ce
    return self.finish(loss, out, collections, batch, kd_loss=kd, ce_loss=ce)


class KDUp(KD):
  """KD with the error set upweighted (or upsampled), as DeTT reweights."""

  name = "kd_up"
  reweight = True
