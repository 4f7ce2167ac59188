"""A small user-written CNN made searchable: a VGG-style stack, none of the four families.

Each stage is two 3x3 convs and a max-pool. The convs of the stages are ``SearchableConv``:
the search decides which of their input channels to keep. The stem conv reads the image's
channels, which should all stay, so it is a plain ``pgnas_jax.Conv``; the classifier is a
``pgnas_jax.Dense``; both record their cost. BatchNorm follows the ``train`` flag.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

import pgnas_jax


class SmallVGG(nn.Module):
  num_classes: int
  widths: Sequence[int] = (16, 32)  # channels of each stage

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(pgnas_jax.batch_norm(train)(pgnas_jax.Conv(self.widths[0], 3, name='stem')(x)))
    for s, width in enumerate(self.widths):
      for c in range(2):
        x = pgnas_jax.SearchableConv(width, 3, name=f'stage{s}_conv{c}')(x)
        x = nn.relu(pgnas_jax.batch_norm(train)(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return pgnas_jax.Dense(self.num_classes, name='classifier')(jnp.mean(x, axis=(1, 2)))
