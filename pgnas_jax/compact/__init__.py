"""The compact network: one candidate of a super-network as the network a user would deploy.

From a hard mask, every channel that nothing reads is removed (issue 15, SPEC section 4):
  * a searchable conv keeps only the input channels its mask keeps (the search's input
    slices), and its producer computes an output channel only if some reader keeps it: a
    conv's output channel goes, with the BatchNorm scale, offset and statistics after it,
    when every consumer dropped it; where several consumers read one feature map (residual
    streams, DenseNet concatenations, ENAS nodes), a channel goes only if all of them did;
  * a conv that keeps no input is removed and outputs zero; what follows it up to the next
    join (its BatchNorm, the next conv) no longer depends on the image and is stored as a
    constant, and the layers that only fed it are removed with it;
  * a BatchNorm right after a conv is folded into the conv (kernel scaled, bias added); the
    training-only parts (ENAS's auxiliary head) are left out.
Kernels are stored already sliced. A conv that reads only part of a feature map that must
stay whole for another reader (a residual stream, a concatenation) takes its channels with a
static slice or gather; a conv that is its producer's only reader reads it as it is.

``CompactNet`` holds the family, the super-network module (its static hyperparameters:
strides, arcs), ``plan`` (static channel positions, per family) and ``weights`` (arrays
only). ``apply(net, images)`` runs it; ``weights`` are everything it stores, so its
parameter count is the sum of their sizes.
"""

import functools
import importlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pgnas_jax import supernets
from pgnas_jax.compact import ops

PyTree = Any


class CompactNet(NamedTuple):
  family: str
  model: Any  # the super-network module: strides, arcs and other static hyperparameters
  plan: dict  # static per-family structure (channel positions read), no arrays
  weights: dict  # every array the network stores
  image_shape: tuple  # one image, (H, W, C)


def supports(model) -> bool:
  """Whether ``model`` is of a family with a compact network (not a custom module)."""
  family = supernets.family_of(model)
  return family is not None and family.compact is not None


def _family(model):
  """(family name, the module building its compact network) of ``model``."""
  for name, family in supernets.FAMILIES.items():
    if family.compact and isinstance(model, family.module):
      return name, importlib.import_module(family.compact)
  raise TypeError(f'no compact network for {type(model).__name__}')


def captured_outputs(model, variables: dict, mask: PyTree, image_shape: tuple) -> dict:
  """Every submodule's output of the masked super-network on one all-zero image. Parts that
  a removed conv made independent of the image are read from here."""
  images = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  _, state = _capturing(model)(
    {'params': variables['params'], 'batch_stats': variables['batch_stats'], 'masks': mask}, images
  )
  return jax.device_get(state['intermediates'])


@functools.cache
def _capturing(model):
  """The jitted capturing apply of ``model``, one per model: building many candidates'
  compact networks (``latency_table``) compiles it once."""
  return jax.jit(
    functools.partial(
      model.apply, train=False, capture_intermediates=True, mutable=['intermediates']
    )
  )


def build(model, variables: dict, mask: PyTree, image_shape: tuple) -> CompactNet:
  """The compact network of candidate ``mask`` (a hard keep mask, one leaf per group)."""
  name, module = _family(model)
  mask = jax.tree.map(np.asarray, jax.device_get(mask))
  variables = jax.device_get(
    {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  )
  captured = captured_outputs(model, variables, mask, image_shape)
  plan, weights = module.compact(model, variables, mask, captured)
  return CompactNet(name, model, plan, ops.f32(weights), tuple(image_shape))


def inference_fn(net: CompactNet):
  """``f(weights, images) -> logits``, the compact network as a function of its arrays."""
  _, module = _family(net.model)
  return functools.partial(module.apply, net.model, net.plan)


def apply(net: CompactNet, images):
  return inference_fn(net)(net.weights, images)


def num_params(net: CompactNet) -> int:
  """Numbers the compact network stores: the sum of its arrays' sizes."""
  return int(sum(np.size(a) for a in jax.tree.leaves(net.weights)))


def macs(net: CompactNet) -> int:
  """Multiply-accumulates of its conv and dense layers for one image."""
  with ops.counting_macs() as counted:
    jax.eval_shape(
      inference_fn(net), net.weights, jax.ShapeDtypeStruct((1,) + net.image_shape, jnp.float32)
    )
  return int(sum(counted))
