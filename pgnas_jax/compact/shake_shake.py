"""Compact SupNet-M / MI (``supernets.shake_shake``).

The residual stream is read whole by the identity shortcuts and the classifier, so it keeps
every channel; a branch's first conv takes the channels its mask keeps from it. The branch's
inner channels are read by its second conv alone: the first conv computes only those the
second keeps. The test-time mixing (the mean of the branches) is folded into each branch's
last conv. A branch whose second conv keeps no input is the constant its BatchNorm makes of
zero; one whose first conv keeps none (the second some) is image-independent too, a map
read off the masked super-network.
"""

import jax
import numpy as np

from pgnas_jax.compact import ops


def _branch(params, stats, mask, captured, factor):
  keep0, keep1 = ops.kept(mask['conv0']['group0']), ops.kept(mask['conv1']['group0'])
  bn1 = ops.bn_affine(params['bn1'], stats['bn1'])
  if len(keep1) == 0:  # the second conv is removed, and with it all before it
    return None, {'constant': bn1[1] * factor}
  if len(keep0) == 0:  # the first conv is removed: its output is the BN of zero
    return None, {'constant': np.asarray(captured['__call__'][0][0], np.float64) * factor}
  conv0 = ops.folded(
    params['conv0']['kernel'],
    ops.sub_affine(ops.bn_affine(params['bn0'], stats['bn0']), keep1),
    rows=keep0,
    cols=keep1,
  )
  conv1 = ops.folded(params['conv1']['kernel'], bn1, rows=keep1, factor=factor)
  channels = params['conv0']['kernel'].shape[2]
  return ops.positions(keep0, np.arange(channels)), {'conv0': conv0, 'conv1': conv1}


def compact(model, variables, mask, captured):
  p, s = variables['params'], variables['batch_stats']
  weights = {
    'stem': ops.folded(p['stem']['kernel'], ops.bn_affine(p['stem_bn'], s['stem_bn'])),
    'classifier': dict(p['classifier']['linear']),
  }
  plan = {}
  factor = 1.0 / len(model.kernel_sizes)
  for block in _blocks(model):
    weights[block], plan[block] = {}, {}
    for i in range(len(model.kernel_sizes)):
      name = f'branch{i}'
      plan[block][name], weights[block][name] = _branch(
        p[block][name], s[block][name], mask[block][name], captured[block][name], factor
      )
    if 'shortcut' in p[block]:
      weights[block]['shortcut'] = ops.folded_reduction(p[block]['shortcut'], s[block]['shortcut'])
  return plan, weights


def _blocks(model):
  return [
    f'stage{s}_block{b}' for s in range(len(model.widths)) for b in range(model.blocks_per_stage)
  ]


def _strides(block: str) -> int:
  stage, b = (int(t[5:]) for t in block.split('_'))
  return 2 if (stage > 0 and b == 0) else 1


def apply(model, plan, weights, images):
  x = ops.conv(images, weights['stem'])
  for block in _blocks(model):
    w, strides = weights[block], _strides(block)
    r = jax.nn.relu(x)
    mixed = 0.0
    for i in range(len(model.kernel_sizes)):
      branch = w[f'branch{i}']
      if 'constant' in branch:
        mixed = mixed + branch['constant']
        continue
      y = ops.conv(ops.take(r, plan[block][f'branch{i}']), branch['conv0'], strides)
      mixed = mixed + ops.conv(jax.nn.relu(y), branch['conv1'])
    if 'shortcut' in w:
      x = ops.factorized_reduction(r, w['shortcut'], strides)
    x = x + mixed
  pooled = jax.numpy.mean(jax.nn.relu(x), axis=(1, 2))
  return ops.dense(pooled, weights['classifier'])
