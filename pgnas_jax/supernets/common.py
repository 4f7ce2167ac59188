"""Building blocks that more than one super-network family uses (none of them searchable)."""

import flax.linen as nn
import jax.numpy as jnp

from pgnas_jax import layers


class FactorizedReduction(nn.Module):
  """Halves the resolution without discarding pixels: two strided 1x1-conv paths, the second
  shifted by one pixel, concatenated, then BN. The downsampling shortcut of shake-shake
  (SupNet-M, SPEC section 5) and ENAS's reduction of a skip input."""

  features: int
  strides: int = 2

  @nn.compact
  def __call__(self, x, train: bool):
    s = self.strides
    a = x[:, ::s, ::s, :]
    b = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))[:, 1::s, 1::s, :][
      :, : a.shape[1], : a.shape[2]
    ]
    a = layers.Conv(self.features // 2, 1, name='path0')(a)
    b = layers.Conv(self.features - self.features // 2, 1, name='path1')(b)
    return layers.batch_norm(train, 'bn')(jnp.concatenate([a, b], axis=-1))


class ImageNetStem(nn.Module):
  """conv7x7/2 + BN + ReLU + max-pool 3x3/2: the stem of ResNet-50 and DenseNet-121."""

  features: int = 64

  @nn.compact
  def __call__(self, x, train: bool):
    x = layers.Conv(self.features, 7, strides=2, name='conv')(x)
    x = nn.relu(layers.batch_norm(train, 'bn')(x))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
