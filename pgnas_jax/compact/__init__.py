"""The compact network: one candidate of a super-network as the network a user would deploy.

From a hard mask, every channel that nothing reads is removed (issues 15 and 31, SPEC
section 4), for any network, the four families, a custom Linen or NNX module alike:
``derived`` follows each channel through the masked network's traced program.
  * a conv or dense layer keeps only the input channels its mask keeps, and its producer
    computes an output channel only if some reader keeps it; where several readers share
    a feature map (residual streams, DenseNet concatenations, ENAS nodes), a channel goes
    only if all of them dropped it;
  * a conv that keeps no input is removed and outputs zero; what follows it up to the next
    join no longer depends on the image and is computed at export: its readers add it to
    their bias (a vector, or a map where a padded conv made it vary over the image);
  * BatchNorms at inference, the mean over stacked branches and other per-channel affine
    ops are folded into the conv or dense layer before them where it has no other reader,
    else kept as a scale and an offset; training-only parts (ENAS's auxiliary head) are
    not in the inference program at all.
An op the derivation cannot follow raises ``derived.Unsupported`` naming it.

``CompactNet`` holds the program (``derived.Program``: static steps, no arrays), ``weights``
(every array it stores: its parameter count is the sum of their sizes) and the image shape.
``apply(net, images)`` runs it at any batch size.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pgnas_jax.compact import derived

PyTree = Any
Unsupported = derived.Unsupported


class CompactNet(NamedTuple):
  program: derived.Program  # static steps
  weights: dict  # every array the network stores, by name
  image_shape: tuple  # one image, (H, W, C)


def build(model, variables: dict, mask: PyTree, image_shape: tuple) -> CompactNet:
  """The compact network of candidate ``mask`` (a hard keep mask, one leaf per group);
  raises ``Unsupported`` for an op the derivation cannot follow."""
  program, weights = derived.derive(model, variables, mask, image_shape)
  return CompactNet(program, weights, tuple(image_shape))


def inference_fn(net: CompactNet):
  """``f(weights, images) -> logits``, the compact network as a function of its arrays."""
  return functools.partial(derived.apply, net.program)


def apply(net: CompactNet, images):
  return inference_fn(net)(net.weights, images)


def num_params(net: CompactNet) -> int:
  """Numbers the compact network stores: the sum of its arrays' sizes."""
  return int(sum(np.size(a) for a in jax.tree.leaves(net.weights)))


def layers(net: CompactNet, batch: int = 1) -> list:
  """Its convolutions and dense products on ``batch`` images, in order:
  ``(kind, input shape, kernel shape, strides, dilation, groups, macs)``."""
  with derived.recording() as seen:  # a new function: a cached trace would record nothing
    jax.eval_shape(
      lambda weights, images: apply(net._replace(weights=weights), images),
      net.weights,
      jax.ShapeDtypeStruct((batch,) + net.image_shape, jnp.float32),
    )
  return list(seen)


def macs(net: CompactNet) -> int:
  """Multiply-accumulates of its conv and dense layers for one image."""
  return int(sum(entry[-1] for entry in layers(net)))
