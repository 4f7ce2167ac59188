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


def size_classes(template: PyTree) -> list:
  """(channels, leaf indices) of every distinct group size, sizes ascending: the layout of a
  packed draw, where the leaves of one size lie stacked in one array."""
  sizes = channel_counts(template)
  return [(size, [i for i, s in enumerate(sizes) if s == size]) for size in sorted(set(sizes))]


def _per_class(key: jax.Array, drop_logits: PyTree, template: PyTree, draw) -> dict:
  """``draw(k, theta, channels)`` for every leaf, with ``k = fold_in(key, leaf_index)``,
  packed: channels -> the draws of the leaves of that size stacked on axis 0.

  Leaves of one size are drawn together, ``vmap`` over their keys and logits: the values are
  those of one call per leaf, but a super-network with hundreds of groups (SupNet-D-121 has
  593) compiles a handful of random-number computations instead of one per group.
  """
  chex.assert_trees_all_equal_structs(drop_logits, template)
  logits = pack_logits(drop_logits, template)
  out = {}
  for size, which in size_classes(template):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.array(which))
    out[size] = jax.vmap(lambda k, t: draw(k, t, size))(keys, logits[size])
  return out


def unpack(packed: dict, template: PyTree, leading: int = 0) -> PyTree:
  """The tree of ``template``'s structure from a packed draw whose size classes lie on axis
  ``leading`` (1 when candidates come first); numpy arrays stay numpy."""
  out = [None] * len(channel_counts(template))
  for size, which in size_classes(template):
    for j, i in enumerate(which):
      out[i] = packed[size][(slice(None),) * leading + (j,)]
  return jax.tree.unflatten(jax.tree.structure(template), out)


def pack_logits(drop_logits: PyTree, template: PyTree) -> dict:
  """The drop logits packed as a draw: channels -> the logits of the groups of that size."""
  thetas = jax.tree.leaves(drop_logits)
  return {size: jnp.stack([thetas[i] for i in which]) for size, which in size_classes(template)}


def _per_leaf(key: jax.Array, drop_logits: PyTree, template: PyTree, draw) -> PyTree:
  """``_per_class`` as a tree of ``template``'s structure."""
  return unpack(_per_class(key, drop_logits, template, draw), template)


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


def packed_leaf_draws(key: jax.Array, template: PyTree, draw) -> dict:
  """``draw(k, channels)`` for every leaf of ``template``, ``k = fold_in(key, leaf_index)``,
  packed (``_per_class``): what a candidate sampler builds its per-channel uniforms from
  (``samplers.py``)."""
  zeros = jax.tree.map(lambda _: jnp.float32(0), template)
  return _per_class(key, zeros, template, lambda k, _, channels: draw(k, channels))


def leaf_draws(key: jax.Array, template: PyTree, draw) -> PyTree:
  """``packed_leaf_draws`` as a tree of ``template``'s structure."""
  return unpack(packed_leaf_draws(key, template, draw), template)


def packed_uniforms(key: jax.Array, template: PyTree) -> dict:
  """One U[0, 1) per channel, leaf i from ``fold_in(key, i)``, packed."""
  return packed_leaf_draws(key, template, lambda k, channels: jax.random.uniform(k, (channels,)))


def uniforms(key: jax.Array, template: PyTree) -> PyTree:
  """One U[0, 1) per channel, leaf shape ``(channels,)``, leaf i from ``fold_in(key, i)``."""
  return unpack(packed_uniforms(key, template), template)


def _keep(u, theta):
  return (u >= jax.nn.sigmoid(theta)).astype(jnp.float32)


def keep_where(u: PyTree, drop_logits: PyTree) -> PyTree:
  """The hard keep mask of per-channel uniforms ``u``: channel kept iff u >= p (SPEC
  section 3), so a channel is dropped with probability p when u is U[0, 1)."""
  return jax.tree.map(_keep, u, drop_logits)


def packed_keep_where(u: dict, logits: dict) -> dict:
  """``keep_where`` of packed uniforms and packed logits (``pack_logits``)."""
  return {size: _keep(u[size], logits[size][:, None]) for size in u}


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
