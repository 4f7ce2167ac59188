"""Gate estimators (``drop.estimator``): the training masks a step draws from its noise, and
the gradient the drop logits get through them (SPEC section 2, "Gate estimators"), plus the
temperature schedule (``drop.final_tau``).

Every estimator starts from the step's ``noise``, one Logistic(0, 1) per example and channel
(``masks.logistic_noise``): the hard drop ``d = 1[theta + noise > 0]`` has probability
``p = sigmoid(theta)``, the concrete keep is ``masks.concrete_keep``. An estimator is a
function ``estimate(loss, drop_logits, noise, tau, learned) -> (value, aux)`` registered by
name in ``ESTIMATORS``, where ``loss(drop_logits, keep_masks) -> (value, aux)`` is the step's
negative ELBO under keep masks (leaf shape ``(batch, channels)``). ``value`` is the loss of
the masks the weights train on, and ``jax.grad`` of it is the estimator's gradient.
``learned`` is False in the ``random`` ablation, whose logits get no gradient.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pgnas_jax import masks as masks_lib

PyTree = Any
DEFAULT = 'concrete'
GAMMA, ZETA = -0.1, 1.1  # hard concrete's stretch (Louizos, Welling & Kingma 2018)


def _hard_drop(drop_logits: PyTree, noise: PyTree) -> PyTree:
  """``d = 1[theta + noise > 0]``: each channel dropped with probability sigmoid(theta)."""
  return jax.tree.map(lambda t, n: (t + n > 0).astype(jnp.float32), drop_logits, noise)


def _keep(drop: PyTree) -> PyTree:
  return jax.tree.map(lambda d: 1.0 - d, drop)


def _concrete(loss, drop_logits, noise, tau, learned):
  """The paper's Eq. 16: the relaxed mask forward and backward."""
  return loss(drop_logits, masks_lib.concrete_keep(drop_logits, noise, tau))


def _hard_concrete(loss, drop_logits, noise, tau, learned):
  """The concrete keep stretched to (GAMMA, ZETA) and clipped to [0, 1]."""
  stretch = lambda s: jnp.clip(GAMMA + (ZETA - GAMMA) * s, 0.0, 1.0)
  return loss(drop_logits, jax.tree.map(stretch, masks_lib.concrete_keep(drop_logits, noise, tau)))


def _straight_through(loss, drop_logits, noise, tau, learned):
  """The hard keep forward, the concrete keep's Jacobian backward (one noise for both); the
  bracket is exactly 0 forward, so the mask is exactly 0 or 1."""
  relaxed = masks_lib.concrete_keep(drop_logits, noise, tau)
  mask = jax.tree.map(
    lambda h, s: h + (s - jax.lax.stop_gradient(s)), _keep(_hard_drop(drop_logits, noise)), relaxed
  )
  return loss(drop_logits, mask)


def disarm_weight(theta, drop, anti):
  """What multiplies half the loss difference in group ``theta``'s DisARM estimate:
  ``sigmoid(|theta|) * sum (d - d~)`` over the group's gates (``d - d~`` is the paper's
  ``(-1)^{d~} 1[d != d~]``)."""
  return jax.nn.sigmoid(jnp.abs(theta)) * jnp.sum(drop - anti)


def _disarm(loss, drop_logits, noise, tau, learned):
  """Dong, Mnih & Tucker (2020): the weights train on the hard sample d; the logits get the
  DisARM estimate from the antithetic pair (d, d~) and the regulariser's exact gradient."""
  drop = _hard_drop(drop_logits, noise)
  value, aux = loss(drop_logits, _keep(drop))
  if not learned:  # no logit gradient to estimate: one pass
    return value, aux
  anti = _hard_drop(drop_logits, jax.tree.map(jnp.negative, noise))  # u -> 1 - u: noise -> -noise
  half_difference = 0.5 * jax.lax.stop_gradient(value - loss(drop_logits, _keep(anti))[0])
  weights = jax.tree.map(
    lambda t, d, a: half_difference * disarm_weight(t, d, a),
    jax.lax.stop_gradient(drop_logits),
    drop,
    anti,
  )
  surrogate = sum(jax.tree.leaves(jax.tree.map(lambda w, t: w * t, weights, drop_logits)))
  return value + (surrogate - jax.lax.stop_gradient(surrogate)), aux  # the bracket is 0


ESTIMATORS = {
  'concrete': _concrete,
  'hard_concrete': _hard_concrete,
  'straight_through': _straight_through,
  'disarm': _disarm,
}
NAMES = tuple(ESTIMATORS)


def temperature(drop_config, total_steps: int) -> Callable:
  """``tau_t`` of training step ``t`` (the state's step, 0 .. total_steps - 1): ``drop.tau``
  throughout when ``drop.final_tau`` is 0, else exponential in the step from ``drop.tau`` at
  step 0 to ``drop.final_tau`` at the last (SPEC section 2)."""
  tau, final = drop_config.tau, drop_config.final_tau
  if not final:
    return lambda step: tau
  span = max(total_steps - 1, 1)
  return lambda step: tau * (final / tau) ** (step / span)
