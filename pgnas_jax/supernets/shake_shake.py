"""SupNet-M family: multi-branch residual network with shake-shake mixing (SPEC section 5).

Stem conv3x3 + BN; stages of residual blocks whose branches are
ReLU-Conv(k)-BN-ReLU-Conv(k)-BN, every branch conv searchable (one group each); the first
block of every stage after the first has stride 2; a shortcut that changes shape is two
strided 1x1-conv paths (the second shifted by one pixel) concatenated + BN; then ReLU, global
average pool and a dense classifier.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pgnas_jax import layers
from pgnas_jax.schema import EACH_ODD, EACH_POSITIVE, POSITIVE, Field
from pgnas_jax.supernets import common


def _mixing_weights(key, batch: int, branches: int):
  """Per-image convex weights: Dirichlet(1, ..., 1); for two branches alpha ~ U(0, 1)."""
  e = jax.random.exponential(key, (batch, 1, 1, 1, branches))
  return e / jnp.sum(e, axis=-1, keepdims=True)


class ShakeMix(nn.Module):
  """Mixes branch outputs: random weights forward, independent ones backward when training
  (shake-shake); equal weights at evaluation."""

  shake: bool = True

  @nn.compact
  def __call__(self, branches, train: bool):
    stacked = jnp.stack(branches, axis=-1)
    n = len(branches)
    if not (train and self.shake):
      return jnp.mean(stacked, axis=-1)
    forward = _mixing_weights(self.make_rng('shake'), stacked.shape[0], n).astype(stacked.dtype)
    backward = _mixing_weights(self.make_rng('shake'), stacked.shape[0], n).astype(stacked.dtype)
    with_backward = jnp.sum(stacked * backward, axis=-1)
    correction = jnp.sum(stacked * (forward - backward), axis=-1)
    return with_backward + jax.lax.stop_gradient(correction)


class Branch(nn.Module):
  features: int
  kernel_size: int
  strides: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(x)
    x = layers.SearchableConv(self.features, self.kernel_size, self.strides, name='conv0')(x)
    x = nn.relu(layers.batch_norm(train, 'bn0')(x))
    x = layers.SearchableConv(self.features, self.kernel_size, name='conv1')(x)
    return layers.batch_norm(train, 'bn1')(x)


class Block(nn.Module):
  features: int
  strides: int
  kernel_sizes: Sequence[int]
  shake: bool

  @nn.compact
  def __call__(self, x, train: bool):
    outs = [
      Branch(self.features, k, self.strides, name=f'branch{i}')(x, train)
      for i, k in enumerate(self.kernel_sizes)
    ]
    mixed = ShakeMix(self.shake, name='mix')(outs, train)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = common.FactorizedReduction(self.features, self.strides, name='shortcut')(
        nn.relu(x), train
      )
    return x + mixed


class ShakeShakeNet(nn.Module):
  """SupNet-M / SupNet-MI shape, configurable."""

  num_classes: int
  stem_width: int = 16
  widths: Sequence[int] = (96, 192, 384)
  blocks_per_stage: int = 4
  kernel_sizes: Sequence[int] = (3, 3)  # one entry per branch
  shake: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = layers.Conv(self.stem_width, 3, name='stem')(x)
    x = layers.batch_norm(train, 'stem_bn')(x)
    for s, width in enumerate(self.widths):
      for b in range(self.blocks_per_stage):
        strides = 2 if (s > 0 and b == 0) else 1
        x = Block(width, strides, tuple(self.kernel_sizes), self.shake, name=f'stage{s}_block{b}')(
          x, train
        )
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    return layers.Dense(self.num_classes, name='classifier')(x)


# model.shake_shake.*: this family's config fields, its module's fields of the same names
FIELDS = (
  Field(
    'stem_width',
    16,
    'SupNet-M family (SPEC section 5): channels of the stem conv',
    check=POSITIVE,
  ),
  Field(
    'widths',
    (16, 32, 64),
    'channels per stage (SupNet-M: 96, 192, 384)',
    check=EACH_POSITIVE,
  ),
  Field(
    'blocks_per_stage',
    1,
    'residual blocks per stage (SupNet-M: 4)',
    check=POSITIVE,
  ),
  Field(
    'kernel_sizes',
    (3, 3),
    'one kernel size per branch; the number of entries is the number of branches',
    check=EACH_ODD,
  ),
  Field(
    'shake',
    True,
    'shake-shake mixing of the branches in training (equal weights at test)',
  ),
)
