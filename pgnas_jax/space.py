"""The search space a super-network declares at init, and what a candidate costs.

``template`` is the tree of searchable groups (leaf: ones of shape ``(channels,)``); every
mask and the drop logits mirror it. ``channel_costs`` mirrors it too (leaf: params and MACs
of one kept input channel). A candidate's cost is the fixed cost of the non-searchable layers
plus, per group, its kept channels times their cost. FLOPs are counted as multiply-accumulates
of conv and dense layers per image, the usual convention of the NAS literature.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pgnas_jax import layers, masks

PyTree = Any


class SearchSpace(NamedTuple):
  template: PyTree
  channel_costs: PyTree  # leaf int32 [params per kept channel, MACs per kept channel]
  fixed_params: int  # trainable parameters outside the searchable kernels (drop logits and
  #                   BatchNorm running statistics are not counted)
  fixed_macs: int

  @property
  def num_groups(self) -> int:
    return len(jax.tree.leaves(self.template))

  @property
  def num_channels(self) -> int:
    return sum(masks.channel_counts(self.template))


def count_params(tree: PyTree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def from_variables(variables: dict) -> SearchSpace:
  """Reads the search space off the collections returned by ``model.init``."""
  template = variables[layers.MASKS]
  costs = jax.device_get(variables[layers.CHANNEL_COSTS])
  searchable = sum(
    n * int(c[0]) for n, c in zip(masks.channel_counts(template), jax.tree.leaves(costs))
  )
  total = count_params(variables['params'])
  fixed = jax.device_get(variables.get(layers.FIXED_MACS, {}))  # none: searchable convs only
  fixed_macs = int(sum(int(v) for v in jax.tree.leaves(fixed)))
  return SearchSpace(
    template=template, channel_costs=costs, fixed_params=total - searchable, fixed_macs=fixed_macs
  )


def initial_variables(model, image_shape: tuple, key: jax.Array) -> dict:
  """``model.init`` on one image of ``image_shape``, jitted: every collection, the search
  space's included."""
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)

  def init_model(k):  # named: compile logs name the program by it
    return model.init({'params': k}, dummy, train=False)

  return jax.jit(init_model)(key)


def of_model(model, image_shape: tuple) -> SearchSpace:
  """The search space of ``model`` on images of ``image_shape``, from one initialisation
  (for checks that need it before training starts)."""
  return from_variables(initial_variables(model, image_shape, jax.random.key(0)))


def kept_counts(mask_tree: PyTree) -> np.ndarray:
  """[..., groups] kept channels per group, leaves in flattening order."""
  return np.stack([np.asarray(m).sum(-1) for m in jax.tree.leaves(mask_tree)], axis=-1).astype(
    np.int64
  )


def costs(space: SearchSpace, mask_tree: PyTree) -> tuple:
  """(params, MACs) of each architecture in ``mask_tree`` (leading axes are kept)."""
  per_channel = np.stack([np.asarray(c, np.int64) for c in jax.tree.leaves(space.channel_costs)])
  kept = kept_counts(mask_tree)
  return (
    space.fixed_params + kept @ per_channel[:, 0],
    space.fixed_macs + kept @ per_channel[:, 1],
  )


def group_paths(space: SearchSpace) -> list:
  """Each group's path (a tuple of names), in flattening (and layer) order."""
  paths = jax.tree_util.tree_flatten_with_path(space.template)[0]
  return [tuple(k.key for k in path) for path, _ in paths]


def group_names(space: SearchSpace) -> list:
  """'/'-joined names of the groups, in flattening (and layer) order."""
  return ['/'.join(path) for path in group_paths(space)]
