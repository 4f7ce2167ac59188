"""SupNet-D-121: DenseNet-121 whose convs select their inputs (SPEC section 5).

DenseNet-121 (Huang et al. 2017): the ImageNet stem (conv7x7/2 + BN + ReLU + max-pool 3x3/2),
dense blocks of 6, 12, 24 and 16 layers, each layer BN-ReLU-Conv1x1(4 x growth)-BN-ReLU-
Conv3x3(growth) whose output (its growth chunk) is concatenated to its input; between blocks
a transition BN-ReLU-Conv1x1(half the channels)-AvgPool2x2; then BN-ReLU, global average pool
and a dense classifier.

Searchable (SPEC section 1): a dense layer's 1x1 conv reads the block input and every earlier
layer's growth chunk; each source is its own group, so layer ``i`` of a block has ``1 + i``
groups and the search selects connections. Its 3x3 conv has one group. The BN before each
conv is pre-activation: the masks act on the conv input after BN-ReLU, which is what removes
the kernel slices, and BN statistics stay per channel, so a pruned network computes BN on all
channels and keeps the ones its conv reads. Transitions, stem and classifier are fixed.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from pgnas_jax import layers
from pgnas_jax.schema import EACH_POSITIVE, POSITIVE, Check, Field
from pgnas_jax.supernets import common


class DenseLayer(nn.Module):
  growth_rate: int
  bottleneck_width: int
  sources: Sequence[int]  # channels of the block input, then of each earlier growth chunk

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.relu(layers.batch_norm(train, 'bn0')(x))
    y = layers.SearchableConv(self.bottleneck_width, 1, groups=tuple(self.sources), name='conv1x1')(
      y
    )
    y = nn.relu(layers.batch_norm(train, 'bn1')(y))
    return layers.SearchableConv(self.growth_rate, 3, name='conv3x3')(y)


class Transition(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(layers.batch_norm(train, 'bn')(x))
    x = layers.Conv(self.features, 1, name='conv')(x)
    return nn.avg_pool(x, (2, 2), (2, 2))


class SearchableDenseNet(nn.Module):
  """SupNet-D-121 with the defaults."""

  num_classes: int
  stem_width: int = 64
  blocks: Sequence[int] = (6, 12, 24, 16)
  growth_rate: int = 32
  bottleneck_width: int = 128  # 4 x growth rate
  compression: float = 0.5  # a transition keeps this share of channels

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = common.ImageNetStem(self.stem_width, name='stem')(x, train)
    for b, num_layers in enumerate(self.blocks):
      sources = (x.shape[-1],)
      for i in range(num_layers):
        new = DenseLayer(
          self.growth_rate, self.bottleneck_width, sources, name=f'block{b}_layer{i}'
        )(x, train)
        x = jnp.concatenate([x, new], axis=-1)
        sources += (self.growth_rate,)
      if b < len(self.blocks) - 1:
        x = Transition(int(x.shape[-1] * self.compression), name=f'transition{b}')(x, train)
    x = jnp.mean(nn.relu(layers.batch_norm(train, 'final_bn')(x)), axis=(1, 2))
    return layers.Dense(self.num_classes, name='classifier')(x)


# model.densenet.*: this family's config fields, its module's fields of the same names
FIELDS = (
  Field(
    'stem_width',
    64,
    'SupNet-D-121 family: channels of the conv7x7/2 stem',
    check=POSITIVE,
  ),
  Field('blocks', (6, 12, 24, 16), 'dense layers per dense block', check=EACH_POSITIVE),
  Field(
    'growth_rate',
    32,
    "channels each dense layer adds (its 3x3 conv's output)",
    check=POSITIVE,
  ),
  Field(
    'bottleneck_width',
    128,
    "output channels of a dense layer's 1x1 conv",
    check=POSITIVE,
  ),
  Field(
    'compression',
    0.5,
    'share of channels a transition keeps',
    check=Check(lambda v: 0.0 < v <= 1.0, 'in (0, 1]'),
  ),
)
