"""Channel masks as data: relaxed training masks (Eq. 16) and hard candidate masks.

A mask tree mirrors the tree of searchable groups that a super-network declares in its
``masks`` collection at init (leaf = ones of shape ``(channels,)``). Drop logits live in a
tree of the same structure with scalar leaves, ``theta_g = log p_g - log(1 - p_g)``.
Every leaf draws from its own key, ``fold_in(key, leaf_index)`` in flattening order, so a
mask depends only on the key and the tree, never on batch layout or device count.
"""

from typing import Any

import chex
import jax
import jax.numpy as jnp

PyTree = Any


def channel_counts(template: PyTree) -> list:
  """Channels per searchable group, leaves in flattening order, from a mask template (leaf
  shape ``(channels,)``)."""
  return [int(m.shape[-1]) for m in jax.tree.leaves(template)]


def logit(p):
  return jnp.log(p) - jnp.log1p(-p)


def init_drop_logits(template: PyTree, p: float) -> PyTree:
  """One scalar logit per group, all at drop probability ``p``."""
  return jax.tree.map(lambda _: logit(jnp.float32(p)), template)


def drop_probabilities(drop_logits: PyTree) -> PyTree:
  return jax.tree.map(jax.nn.sigmoid, drop_logits)


def mean_drop_probability(probabilities, channels) -> float:
  """Expected share of searchable channels dropped: the groups' drop probabilities weighted
  by their channel counts (two sequences in one order)."""
  return sum(p * n for p, n in zip(probabilities, channels)) / sum(channels)


def _per_leaf(key: jax.Array, drop_logits: PyTree, template: PyTree, draw) -> PyTree:
  """``draw(k, theta, channels)`` for every leaf, with ``k = fold_in(key, leaf_index)``.

  Leaves of one size are drawn together, ``vmap`` over their keys and logits: the values are
  those of one call per leaf, but a super-network with hundreds of groups (SupNet-D-121 has
  593) compiles a handful of random-number computations instead of one per group.
  """
  chex.assert_trees_all_equal_structs(drop_logits, template)
  treedef = jax.tree.structure(template)
  thetas = jax.tree.leaves(drop_logits)
  sizes = channel_counts(template)
  out = [None] * len(sizes)
  for size in sorted(set(sizes)):
    which = [i for i, s in enumerate(sizes) if s == size]
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.array(which))
    drawn = jax.vmap(lambda k, t: draw(k, t, size))(keys, jnp.stack([thetas[i] for i in which]))
    for j, i in enumerate(which):
      out[i] = drawn[j]
  return jax.tree.unflatten(treedef, out)


def logistic_noise(key: jax.Array, template: PyTree, batch_size: int) -> PyTree:
  """One Logistic(0, 1) draw per example and channel, leaf shape ``(batch_size, channels)``:
  the noise every training mask is made from (Eq. 16; ``estimators.py``)."""
  return leaf_draws(
    key, template, lambda k, channels: jax.random.logistic(k, (batch_size, channels))
  )


def concrete_keep(drop_logits: PyTree, noise: PyTree, tau) -> PyTree:
  """The relaxed-Bernoulli *keep* masks of ``noise``: drop = sigmoid((theta + noise) / tau),
  keep = 1 - drop (SPEC section 2). As tau -> 0, keep -> 1[noise < -theta], i.e.
  Bernoulli(1 - p). No 1/(1-p) rescale."""
  return jax.tree.map(lambda t, n: 1.0 - jax.nn.sigmoid((t + n) / tau), drop_logits, noise)


def relaxed_masks(
  key: jax.Array, drop_logits: PyTree, template: PyTree, batch_size: int, tau: float
) -> PyTree:
  """Per-example relaxed-Bernoulli keep masks (``concrete_keep``) of a key, leaf shape
  ``(batch_size, channels)``: the ``concrete`` estimator's training masks."""
  chex.assert_trees_all_equal_structs(drop_logits, template)
  return concrete_keep(drop_logits, logistic_noise(key, template, batch_size), tau)


def leaf_draws(key: jax.Array, template: PyTree, draw) -> PyTree:
  """``draw(k, channels)`` for every leaf of ``template``, ``k = fold_in(key, leaf_index)``:
  what a candidate sampler builds its per-channel uniforms from (``samplers.py``)."""
  zeros = jax.tree.map(lambda _: jnp.float32(0), template)
  return _per_leaf(key, zeros, template, lambda k, _, channels: draw(k, channels))


def uniforms(key: jax.Array, template: PyTree) -> PyTree:
  """One U[0, 1) per channel, leaf shape ``(channels,)``, leaf i from ``fold_in(key, i)``."""
  return leaf_draws(key, template, lambda k, channels: jax.random.uniform(k, (channels,)))


def keep_where(u: PyTree, drop_logits: PyTree) -> PyTree:
  """The hard keep mask of per-channel uniforms ``u``: channel kept iff u >= p (SPEC
  section 3), so a channel is dropped with probability p when u is U[0, 1)."""
  return jax.tree.map(lambda x, t: (x >= jax.nn.sigmoid(t)).astype(jnp.float32), u, drop_logits)


def hard_mask(key: jax.Array, drop_logits: PyTree, template: PyTree) -> PyTree:
  """One hard keep mask (one architecture): channel kept iff u >= p (SPEC section 3)."""
  chex.assert_trees_all_equal_structs(drop_logits, template)
  return keep_where(uniforms(key, template), drop_logits)


def candidate_masks(
  search_key: jax.Array, indices: jax.Array, drop_logits: PyTree, template: PyTree
) -> PyTree:
  """Hard masks of candidates ``indices``; candidate c uses ``fold_in(search_key, c)``.

  Leaves gain a leading candidate axis. The result for candidate c is independent of which
  other indices are drawn with it (chunking) and of the device layout.
  """
  draw = lambda c: hard_mask(jax.random.fold_in(search_key, c), drop_logits, template)
  return jax.vmap(draw)(indices)
