"""SupNet-E / SupNet-EI: the ENAS CIFAR-10 micro architecture (SPEC section 5).

ENAS (Pham et al. 2018) found one normal and one reduction cell; the network stacks them.
A cell takes the outputs of the two previous cells, matches them to its width ``F`` (a
previous-previous input at twice the resolution: ReLU + factorized reduction; another width:
ReLU-Conv1x1-BN), passes the previous one through one more ReLU-Conv1x1-BN, then builds its
nodes. Node ``j`` (numbered from 2; 0 and 1 are the two inputs) adds two ops, each applied
to an earlier node; the arc lists, per node, ``input, op, input, op``. Ops: 0 sep3x3,
1 sep5x5, 2 avg3x3, 3 max3x3, 4 identity. A separable op is two stacked
ReLU-SepConv-BN (depthwise kxk then pointwise 1x1), the first one strided in a reduction cell.
In a reduction cell, ops reading the inputs have stride 2 (identity becomes a factorized
reduction). The cell's output concatenates every node no op reads.

The network: conv3x3 stem with 3F channels + BN, then three stages of
``normal_cells_per_stage`` normal cells with a reduction cell (doubling F) between stages
(ENAS's 15 layers with reductions at 5 and 11, counting cells from 0), then ReLU, global
average pool and a dense classifier. F = 36 is SupNet-E, 72 SupNet-EI.

ENAS trains this network with an auxiliary classifier after the first cell of the last
stage (its final-training script, whose settings the supplement says SupNet-E/EI follow).
It is built here (``auxiliary_head``, default on) and trains with the main classifier: in
training its logits are sown into the ``auxiliary_logits`` collection, which the training
loss weighs by ``objective.auxiliary_weight``; it is never used at evaluation. The paper's
counts include it: 15.3M for SupNet-EI is this network with the head (without it: 14.8M),
see docs/supernets.md. ENAS's other training-only extras, drop-path and dropout
before the classifier, are not built: PGNAS's learned channel dropout is the regulariser.

Searchable: every separable conv, one group over its input channels (SPEC section 1). The
rest (stem, 1x1 convs, factorized reductions, auxiliary head, classifier) is fixed.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from pgnas_jax import layers
from pgnas_jax.schema import POSITIVE, Check, Field
from pgnas_jax.supernets import common

# ENAS's published CIFAR-10 micro cells (SPEC section 5): per node, input, op, input, op;
# inputs 0 and 1 are the cell's inputs, node j >= 2 is the j-th built; ops 0 sep3x3,
# 1 sep5x5, 2 avg3x3, 3 max3x3, 4 identity
NORMAL_ARC = (0, 2, 0, 0, 0, 4, 0, 1, 0, 4, 1, 1, 1, 0, 0, 1, 0, 2, 1, 1)
REDUCTION_ARC = (1, 0, 1, 0, 0, 3, 0, 2, 1, 1, 3, 1, 1, 0, 0, 4, 0, 3, 1, 1)
NUM_OPS = 5
ARC_RULE = (
  '4 numbers per node (input, op, input, op): node j (from 0) reads inputs '
  f'0 .. j + 1, ops 0 .. {NUM_OPS - 1}'
)
SEPARABLE_KERNEL_SIZES = {0: 3, 1: 5}  # op -> kernel size; 2 avg3x3, 3 max3x3, 4 identity
AVG_POOL, MAX_POOL = 2, 3


def is_valid_arc(arc) -> bool:
  """Whether ``arc`` follows ARC_RULE: every node reads earlier nodes through known ops."""
  if len(arc) == 0 or len(arc) % 4:
    return False
  for j in range(len(arc) // 4):
    inputs, ops = (arc[4 * j], arc[4 * j + 2]), (arc[4 * j + 1], arc[4 * j + 3])
    if not all(0 <= i < j + 2 for i in inputs) or not all(0 <= o < NUM_OPS for o in ops):
      return False
  return True


class ReluConvBN(nn.Module):
  """ReLU-Conv1x1-BN: matches an input to the cell's width."""

  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = layers.Conv(self.features, 1, name='conv')(nn.relu(x))
    return layers.batch_norm(train, 'bn')(x)


class SeparableOp(nn.Module):
  """Two stacked ReLU-SepConv-BN, each separable conv searchable, the first one strided."""

  features: int
  kernel_size: int
  strides: int

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(2):
      x = layers.SearchableConv(
        self.features,
        self.kernel_size,
        self.strides if i == 0 else 1,
        separable=True,
        name=f'sep{i}',
      )(nn.relu(x))
      x = layers.batch_norm(train, f'bn{i}')(x)
    return x


class Cell(nn.Module):
  arc: Sequence[int]
  features: int
  reduction: bool

  def _op(self, x, op: int, strides: int, name: str, train: bool):
    if op in SEPARABLE_KERNEL_SIZES:
      return SeparableOp(self.features, SEPARABLE_KERNEL_SIZES[op], strides, name=name)(x, train)
    if op == AVG_POOL:  # TF's SAME average pooling: the padding is not counted
      pooled = nn.avg_pool(x, (3, 3), (strides, strides), 'SAME', count_include_pad=False)
      return pooled.astype(x.dtype)  # flax counts the window in float32
    if op == MAX_POOL:
      return nn.max_pool(x, (3, 3), (strides, strides), 'SAME')
    if strides > 1:  # identity
      return common.FactorizedReduction(self.features, strides, name=name)(x, train)
    return x

  @nn.compact
  def __call__(self, prev_prev, prev, train: bool):
    f = self.features
    if prev_prev.shape[1] != prev.shape[1]:
      prev_prev = common.FactorizedReduction(f, name='match_prev_prev')(nn.relu(prev_prev), train)
    elif prev_prev.shape[-1] != f:
      prev_prev = ReluConvBN(f, name='match_prev_prev')(prev_prev, train)
    if prev.shape[-1] != f:
      prev = ReluConvBN(f, name='match_prev')(prev, train)
    prev = ReluConvBN(f, name='base')(prev, train)

    nodes, read = [prev_prev, prev], set()
    for j in range(len(self.arc) // 4):
      node = 0
      for side in range(2):
        source, op = self.arc[4 * j + 2 * side], self.arc[4 * j + 2 * side + 1]
        strides = 2 if (self.reduction and source < 2) else 1
        node = node + self._op(nodes[source], op, strides, f'node{j + 2}_op{side}', train)
        read.add(source)
      nodes.append(node)

    size = min(n.shape[1] for n in nodes)
    outputs = []
    for i, n in enumerate(nodes):
      if i in read:
        continue
      if n.shape[1] != size:  # an input of a reduction cell that no op reads
        n = common.FactorizedReduction(f, name=f'reduce_input{i}')(n, train)
      outputs.append(n)
    return jnp.concatenate(outputs, axis=-1)


class AuxiliaryHead(nn.Module):
  """ENAS's auxiliary classifier: ReLU, average pool 5x5/3, Conv1x1(128)-BN-ReLU,
  Conv(spatial size, 768)-BN-ReLU, global average pool, dense."""

  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    window = min(5, x.shape[1])  # 5 on CIFAR's 8x8; smaller inputs (tests) still fit
    x = nn.avg_pool(nn.relu(x), (window, window), (3, 3), 'VALID')
    x = nn.relu(layers.batch_norm(train, 'bn0')(layers.Conv(128, 1, name='conv0')(x)))
    x = layers.Conv(768, x.shape[1], name='conv1')(x)
    x = nn.relu(layers.batch_norm(train, 'bn1')(x))
    return layers.Dense(self.num_classes, name='classifier')(jnp.mean(x, axis=(1, 2)))


class EnasNet(nn.Module):
  """SupNet-E (filters 36) / SupNet-EI (filters 72)."""

  num_classes: int
  filters: int = 36
  normal_cells_per_stage: int = 5
  normal_arc: Sequence[int] = NORMAL_ARC
  reduction_arc: Sequence[int] = REDUCTION_ARC
  auxiliary_head: bool = True
  stem_multiplier: int = 3  # ENAS: the stem has 3F channels

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = layers.Conv(self.stem_multiplier * self.filters, 3, name='stem')(x)
    x = layers.batch_norm(train, 'stem_bn')(x)
    prev_prev, prev = x, x
    f, index = self.filters, 0
    for stage in range(3):
      cells = [False] * self.normal_cells_per_stage
      if stage > 0:
        f *= 2
        cells = [True] + cells
      for position, reduction in enumerate(cells):
        arc = tuple(self.reduction_arc if reduction else self.normal_arc)
        out = Cell(arc, f, reduction, name=f'cell{index}')(prev_prev, prev, train)
        prev_prev, prev, index = prev, out, index + 1
        # ENAS: after the first cell of the last stage; run at init too, so that its
        # parameters exist before training
        wants_auxiliary = self.auxiliary_head and stage == 2 and position == 1
        if wants_auxiliary and (train or self.is_initializing()):
          logits = AuxiliaryHead(self.num_classes, name='auxiliary_head')(prev, train)
          if train:
            self.sow(layers.AUXILIARY_LOGITS, 'auxiliary_head_logits', logits)
    x = jnp.mean(nn.relu(prev), axis=(1, 2))
    return layers.Dense(self.num_classes, name='classifier')(x)


ARC = Check(is_valid_arc, ARC_RULE)


# model.enas.*: this family's config fields, its module's fields of the same names
FIELDS = (
  Field(
    'filters',
    36,
    "SupNet-E family (SPEC section 5): `F`, the first stage's cell width, doubled by each "
    'reduction cell (SupNet-E: 36, SupNet-EI: 72)',
    check=POSITIVE,
  ),
  Field(
    'normal_cells_per_stage',
    5,
    'normal cells in each of the 3 stages; a reduction cell precedes stages 2 and 3 '
    '(ENAS: 15 layers, reductions at 5 and 11)',
    check=POSITIVE,
  ),
  Field(
    'normal_arc',
    NORMAL_ARC,
    "ENAS's CIFAR-10 normal cell: per node `input, op, input, op`; inputs 0 and 1 are the "
    "cell's inputs, node `j` >= 2 the `j`-th built; ops 0 sep3x3, 1 sep5x5, 2 avg3x3, "
    '3 max3x3, 4 identity',
    check=ARC,
  ),
  Field(
    'reduction_arc',
    REDUCTION_ARC,
    "ENAS's CIFAR-10 reduction cell, written as `normal_arc`",
    check=ARC,
  ),
  Field(
    'auxiliary_head',
    True,
    "ENAS's auxiliary classifier after the first cell of the last stage, trained with "
    'weight `objective.auxiliary_weight`, never used at evaluation',
  ),
)
