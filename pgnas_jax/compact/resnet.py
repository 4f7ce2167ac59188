"""Compact SupNet-R-50 (``supernets.resnet``).

A bottleneck's first 1x1 conv feeds the four kernel branches, each with its own mask: it
computes a channel if any branch keeps it, and each branch takes the channels it keeps. The
branches' outputs are read whole by the last 1x1 conv; a removed branch outputs zero, which
its BatchNorm and ReLU make a constant, folded into that conv's bias. With every branch
removed the first conv feeds nothing and goes, and the block's residual is a constant.
"""

import flax.linen as nn
import jax
import numpy as np

from pgnas_jax.compact import ops


def _stem(p, s):
  return ops.folded(p['conv']['kernel'], ops.bn_affine(p['bn'], s['bn']))


def _bottleneck(p, s, mask):
  branches = sorted(mask['multi_kernel'], key=lambda n: int(n[len('branch') :]))
  keeps = [ops.kept(mask['multi_kernel'][b]['group0']) for b in branches]
  used = np.unique(np.concatenate(keeps)).astype(np.int64)
  bn1 = ops.bn_affine(p['bn1'], s['bn1'])
  width = p['conv2']['kernel'].shape[2] // len(branches)
  weights, plan, live, constant = {}, {}, [], np.zeros(p['conv2']['kernel'].shape[-1])
  for i, (name, keep) in enumerate(zip(branches, keeps)):
    out = np.arange(i * width, (i + 1) * width)
    if len(keep) == 0:  # removed: zero, then BN1 and ReLU, read by the 1x1 conv
      const = np.maximum(bn1[1][out], 0.0)
      constant += const @ np.asarray(p['conv2']['kernel'], np.float64)[0, 0, out]
      continue
    weights[name] = ops.folded(
      p['multi_kernel'][name]['kernel'], ops.sub_affine(bn1, out), rows=keep
    )
    plan[name] = ops.positions(keep, used)
    live.append(out)
  bn2 = ops.bn_affine(p['bn2'], s['bn2'])
  if live:
    weights['conv0'] = ops.folded(
      p['conv0']['kernel'], ops.sub_affine(ops.bn_affine(p['bn0'], s['bn0']), used), cols=used
    )
    weights['conv2'] = ops.folded(
      p['conv2']['kernel'], bn2, rows=np.concatenate(live), extra_bias=constant
    )
  else:  # every branch removed: the residual is a constant
    weights['residual'] = constant * bn2[0] + bn2[1]
  if 'shortcut' in p:
    weights['shortcut'] = ops.folded(
      p['shortcut']['kernel'], ops.bn_affine(p['shortcut_bn'], s['shortcut_bn'])
    )
  return plan, weights


def _blocks(model):
  return [
    (f'stage{s}_block{b}', 2 if (s > 0 and b == 0) else 1)
    for s, n in enumerate(model.blocks_per_stage)
    for b in range(n)
  ]


def compact(model, variables, mask, captured):
  del captured  # nothing here depends on a spatial map
  p, s = variables['params'], variables['batch_stats']
  weights = {'stem': _stem(p['stem'], s['stem']), 'classifier': dict(p['classifier']['linear'])}
  plan = {}
  for block, _ in _blocks(model):
    plan[block], weights[block] = _bottleneck(p[block], s[block], mask[block])
  return plan, weights


def apply_stem(stem, images):
  x = jax.nn.relu(ops.conv(images, stem, strides=2))
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')


def apply(model, plan, weights, images):
  x = apply_stem(weights['stem'], images)
  for block, strides in _blocks(model):
    w = weights[block]
    shortcut = ops.conv(x, w['shortcut'], strides) if 'shortcut' in w else x
    if 'residual' in w:
      x = jax.nn.relu(shortcut + w['residual'])
      continue
    y = jax.nn.relu(ops.conv(x, w['conv0']))
    outs = [
      ops.conv(ops.take(y, plan[block][name]), w[name], strides, model.dilations[i])
      for i, name in enumerate(f'branch{i}' for i in range(len(model.kernel_sizes)))
      if name in w
    ]
    y = jax.nn.relu(jax.numpy.concatenate(outs, axis=-1))
    x = jax.nn.relu(shortcut + ops.conv(y, w['conv2']))
  return ops.dense(jax.numpy.mean(x, axis=(1, 2)), weights['classifier'])
