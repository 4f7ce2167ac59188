"""The negative ELBO of SPEC section 2 (paper Eq. 14-15), returned with its parts.

    L = mean_b CE(y_b, f(x_b; m, mask_b))
        + (1/N) sum_g [ c_g * sum_{k in g} ||m_{:,:,k,:}||^2
                        + |g| (p_g log p_g + (1-p_g) log(1-p_g)) ]

with c_g = l2 (1 - p_g) (the weight prior; no factor 1/2, no 1/(1-p) rescale) or, for the
"constant L2" ablation, a constant. The "random" ablation freezes every p_g at p0 and drops
the entropy term. A super-network with auxiliary classifiers (SupNet-E/EI, as ENAS trains
them) adds ``auxiliary_weight`` times their mean cross-entropy.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from pgnas_jax import layers, precision

PyTree = Any


class LossParts(NamedTuple):
  nll: jax.Array
  prior: jax.Array
  entropy: jax.Array
  weight_decay: jax.Array
  auxiliary: jax.Array


def negative_bernoulli_entropy(p):
  """p log p + (1 - p) log(1 - p), the KL to the uniform prior up to a constant."""
  return p * jnp.log(p) + (1.0 - p) * jnp.log1p(-p)


def regulariser(
  params: PyTree,
  drop_logits: PyTree,
  template: PyTree,
  objective: ml_collections.ConfigDict,
  learned: bool,
) -> tuple:
  """(prior, entropy) terms, both already divided by N."""
  sq_norms = layers.group_sq_norms(params, template)
  p = jax.tree.map(jax.nn.sigmoid, drop_logits)
  if objective.prior == 'posterior':
    coeff = jax.tree.map(lambda q: objective.weight_prior_l2 * (1.0 - q), p)
  else:  # 'constant'
    coeff = jax.tree.map(lambda q: jnp.float32(objective.constant_l2), p)
  prior = sum(jax.tree.leaves(jax.tree.map(lambda c, s: c * s, coeff, sq_norms)))
  if learned:
    entropy = sum(
      jax.tree.leaves(
        jax.tree.map(lambda q, m: m.shape[-1] * negative_bernoulli_entropy(q), p, template)
      )
    )
  else:
    entropy = jnp.float32(0.0)
  n = objective.num_train_effective
  return prior / n, entropy / n


def fixed_weight_decay(params: PyTree, template: PyTree, rate: float):
  """Optional 0.5 * rate * ||w||^2 on the kernels of non-searchable layers (not BN)."""
  if rate == 0.0:
    return jnp.float32(0.0)
  searchable = layers.searchable_conv_paths(template)
  total = jnp.float32(0.0)
  for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(k.key for k in path)
    if names[-1] == 'kernel' and names[:-1] not in searchable:
      total = total + jnp.sum(jnp.square(w))
  return 0.5 * rate * total


def negative_elbo(
  logits: jax.Array,
  labels: jax.Array,
  params: PyTree,
  template: PyTree,
  objective: ml_collections.ConfigDict,
  learned: bool,
) -> tuple:
  """Total loss and its ``LossParts`` (``auxiliary`` zero: ``with_auxiliary`` adds it);
  ``params`` holds the network's ``weights`` and the ``drop_logits``, as the train state
  does."""
  weights, drop_logits = params['weights'], params['drop_logits']
  nll = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  prior, entropy = regulariser(weights, drop_logits, template, objective, learned)
  decay = fixed_weight_decay(weights, template, objective.weight_decay)
  parts = LossParts(nll, prior, entropy, weight_decay=decay, auxiliary=jnp.float32(0.0))
  return nll + prior + entropy + decay, parts


def with_auxiliary(
  loss: tuple, auxiliary_logits: Sequence[jax.Array], labels: jax.Array, weight: float
) -> tuple:
  """``loss`` (total, ``LossParts``) with the auxiliary heads' cross-entropy (ENAS), times
  ``weight`` (``objective.auxiliary_weight``), added; unchanged without auxiliary heads."""
  if not auxiliary_logits:
    return loss
  total, parts = loss
  auxiliary = weight * sum(
    jnp.mean(optax.softmax_cross_entropy_with_integer_labels(a, labels)) for a in auxiliary_logits
  )
  return total + auxiliary, parts._replace(auxiliary=auxiliary)


def make_masked_loss(
  model, template: PyTree, config: ml_collections.ConfigDict, learned: bool
) -> Callable:
  """``loss(params, batch_stats, masks, batch, shake_key, prior_weights=None) -> (loss,
  (LossParts, logits, batch_stats))``: the negative ELBO of the super-network under
  ``masks`` in training mode (BatchNorm on the batch's statistics, updating its running
  ones; shake noise from ``shake_key``), for training (relaxed masks) and fine-tuning (one
  hard mask). ``params`` holds ``weights`` and ``drop_logits``; the weight prior is over
  ``prior_weights`` where given, else over the weights."""

  def loss(params, batch_stats, masks, batch, shake_key, prior_weights=None):
    logits, updates = precision.apply(
      model,
      {'params': params['weights'], 'batch_stats': batch_stats, 'masks': masks},
      batch['images'],
      config.model.compute_dtype,
      train=True,
      rngs={'shake': shake_key},
      mutable=['batch_stats', layers.AUXILIARY_LOGITS],
    )
    auxiliary_logits = [
      a.astype(jnp.float32) for a in jax.tree.leaves(updates.get(layers.AUXILIARY_LOGITS, {}))
    ]
    if prior_weights is not None:
      params = {**params, 'weights': prior_weights}
    total, parts = with_auxiliary(
      negative_elbo(logits, batch['labels'], params, template, config.objective, learned),
      auxiliary_logits,
      batch['labels'],
      config.objective.auxiliary_weight,
    )
    return total, (parts, logits, updates.get('batch_stats', {}))  # none without BatchNorm

  return loss
