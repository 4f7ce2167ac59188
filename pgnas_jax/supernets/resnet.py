"""SupNet-R-50: ResNet-50 whose every 3x3 conv is a multi-kernel block (SPEC section 5).

The supplement inflates ResNet-50 (He et al. 2016) by replacing every 3x3 conv with four
parallel convs, 1x1, 3x3, "5x5" and "9x9", the last two mimicked by dilated convs (3x3 and
5x5, dilation 2), each with a quarter of the original output channels, concatenated.
Everything else is ResNet-50: the ImageNet stem (conv7x7/2 + BN + ReLU + max-pool 3x3/2),
bottleneck blocks Conv1x1-BN-ReLU, multi-kernel block-BN-ReLU, Conv1x1(4x width)-BN, added
to the shortcut (a strided Conv1x1-BN where the shape changes) and ReLU; stages of 3, 4, 6
and 3 blocks of widths 64, 128, 256 and 512; global average pool and a dense classifier.
The stride of a stage's first block is in the multi-kernel block (every branch), as in the
common "ResNet-50 v1.5"; the original put it in the first 1x1 conv. Counts are the same.

Searchable: each kernel branch is its own conv with its own group over its input channels
(SPEC section 1), so a candidate can keep or drop whole kernel sizes. The 1x1 convs, the
stem, the shortcuts and the classifier are fixed.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from pgnas_jax import layers
from pgnas_jax.schema import EACH_ODD, EACH_POSITIVE, POSITIVE, Field
from pgnas_jax.supernets import common

EXPANSION = 4  # a bottleneck's output has 4x its width


class MultiKernelConv(nn.Module):
  """Parallel searchable convs, one per (kernel size, dilation), outputs concatenated."""

  features: int
  strides: int
  kernel_sizes: Sequence[int]
  dilations: Sequence[int]

  @nn.compact
  def __call__(self, x):
    n = len(self.kernel_sizes)
    if self.features % n:
      raise ValueError(f'{self.name}: {self.features} channels do not split over {n} branches')
    return jnp.concatenate(
      [
        layers.SearchableConv(self.features // n, k, self.strides, d, name=f'branch{i}')(x)
        for i, (k, d) in enumerate(zip(self.kernel_sizes, self.dilations))
      ],
      axis=-1,
    )


class Bottleneck(nn.Module):
  width: int
  strides: int
  kernel_sizes: Sequence[int]
  dilations: Sequence[int]

  @nn.compact
  def __call__(self, x, train: bool):
    out = EXPANSION * self.width
    y = nn.relu(layers.batch_norm(train, 'bn0')(layers.Conv(self.width, 1, name='conv0')(x)))
    y = MultiKernelConv(
      self.width, self.strides, tuple(self.kernel_sizes), tuple(self.dilations), name='multi_kernel'
    )(y)
    y = nn.relu(layers.batch_norm(train, 'bn1')(y))
    y = layers.batch_norm(train, 'bn2')(layers.Conv(out, 1, name='conv2')(y))
    if self.strides != 1 or x.shape[-1] != out:
      x = layers.Conv(out, 1, self.strides, name='shortcut')(x)
      x = layers.batch_norm(train, 'shortcut_bn')(x)
    return nn.relu(x + y)


class MultiKernelResNet(nn.Module):
  """SupNet-R-50 with the defaults."""

  num_classes: int
  stem_width: int = 64
  widths: Sequence[int] = (64, 128, 256, 512)
  blocks_per_stage: Sequence[int] = (3, 4, 6, 3)
  kernel_sizes: Sequence[int] = (1, 3, 3, 5)  # one entry per branch
  dilations: Sequence[int] = (1, 1, 2, 2)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = common.ImageNetStem(self.stem_width, name='stem')(x, train)
    for s, (width, blocks) in enumerate(zip(self.widths, self.blocks_per_stage)):
      for b in range(blocks):
        strides = 2 if (s > 0 and b == 0) else 1
        x = Bottleneck(
          width, strides, tuple(self.kernel_sizes), tuple(self.dilations), name=f'stage{s}_block{b}'
        )(x, train)
    return layers.Dense(self.num_classes, name='classifier')(jnp.mean(x, axis=(1, 2)))


# model.resnet.*: this family's config fields, its module's fields of the same names
FIELDS = (
  Field(
    'stem_width',
    64,
    'SupNet-R-50 family: channels of the conv7x7/2 stem',
    check=POSITIVE,
  ),
  Field(
    'widths',
    (64, 128, 256, 512),
    'bottleneck widths per stage (block outputs are 4x); each a multiple of the number of branches',
    check=EACH_POSITIVE,
  ),
  Field(
    'blocks_per_stage',
    (3, 4, 6, 3),
    'bottleneck blocks per stage',
    check=EACH_POSITIVE,
  ),
  Field(
    'kernel_sizes',
    (1, 3, 3, 5),
    'one entry per branch of the multi-kernel block that replaces every 3x3 conv; each '
    'branch has `width / branches` output channels',
    check=EACH_ODD,
  ),
  Field(
    'dilations',
    (1, 1, 2, 2),
    'the dilation of each branch, one per entry of `kernel_sizes`',
    check=EACH_POSITIVE,
  ),
)

# checks across this family's fields: (fields, test of their values, what must hold)
CONSTRAINTS = (
  (('kernel_sizes', 'dilations'), lambda k, d: len(k) == len(d), 'one dilation per kernel size'),
  (
    ('widths', 'blocks_per_stage'),
    lambda w, b: len(w) == len(b),
    'one number of blocks per width',
  ),
  (
    ('widths', 'kernel_sizes'),
    lambda w, k: all(x % len(k) == 0 for x in w),
    'every width a multiple of the number of branches (each gets an equal share)',
  ),
)
