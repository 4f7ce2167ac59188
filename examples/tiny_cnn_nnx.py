"""``examples/tiny_cnn.py``'s SmallVGG written with Flax NNX: the same network, layer for
layer, with ``pgnas_jax.nnx``'s layers. Search it as ``pgnas_jax.from_nnx(SmallVGG,
widths=...)`` (``python -m examples.search_fashion_npz --nnx``) or from the config
(``model.custom.module='examples.tiny_cnn_nnx:SmallVGG'``); the run builds it with its own
random key.
"""

from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

import pgnas_jax


class SmallVGG(nnx.Module):
  def __init__(
    self, num_classes: int, widths: Sequence[int] = (16, 32), channels: int = 1, *, rngs: nnx.Rngs
  ):
    """``channels``: the images' (1 for Fashion-MNIST); ``widths``: channels of each stage."""
    self.stem = pgnas_jax.nnx.Conv(channels, widths[0], 3, rngs=rngs)
    self.stem_bn = pgnas_jax.nnx.batch_norm(widths[0], rngs=rngs)
    self.convs, self.norms = nnx.List(), nnx.List()
    inputs = widths[0]
    for width in widths:
      for _ in range(2):
        self.convs.append(pgnas_jax.nnx.SearchableConv(inputs, width, 3, rngs=rngs))
        self.norms.append(pgnas_jax.nnx.batch_norm(width, rngs=rngs))
        inputs = width
    self.classifier = pgnas_jax.nnx.Dense(inputs, num_classes, rngs=rngs)

  def __call__(self, x, train: bool = False):
    x = nnx.relu(self.stem_bn(self.stem(x), use_running_average=not train))
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      x = nnx.relu(norm(conv(x), use_running_average=not train))
      if i % 2 == 1:  # the end of a stage
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    return self.classifier(jnp.mean(x, axis=(1, 2)))
