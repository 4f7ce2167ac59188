"""Compact SupNet-D-121 (``supernets.densenet``).

A dense block's feature map is the concatenation of its input and every layer's growth
chunk. The transition (or the final BatchNorm and classifier) reads all of it, so a chunk
keeps every channel; each later layer's 1x1 conv takes the channels its masks keep, and its
pre-activation BatchNorm is applied to those alone. A layer's 1x1 conv computes only the
channels its 3x3 conv keeps. A layer whose 3x3 conv keeps nothing adds a chunk of zeros;
one whose 1x1 conv reads nothing computed from the image adds an image-independent map
(read off the masked super-network). Such constant chunks are not concatenated: what each
reader makes of them (BatchNorm, ReLU, its 1x1 kernel) is folded into the reader's bias.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pgnas_jax.compact import ops, resnet


class _Pieces:
  """The block's feature map at export: per part (input, then each chunk) its width and,
  for a constant part, its value ([C] or [H, W, C]); live parts are concatenated."""

  def __init__(self, width: int):
    self.widths, self.constants = [width], [None]

  def add(self, width: int, constant=None):
    self.widths.append(width)
    self.constants.append(constant)

  def offsets(self):
    return np.cumsum([0] + self.widths[:-1])

  def live(self) -> np.ndarray:
    return np.concatenate(
      [
        o + np.arange(w)
        for o, w, c in zip(self.offsets(), self.widths, self.constants)
        if c is None
      ]
    )

  def constant_values(self, rows):
    """Values of constant channels ``rows`` (channels on the last axis)."""
    parts = {}
    for o, w, c in zip(self.offsets(), self.widths, self.constants):
      if c is not None:
        for k in range(w):
          parts[o + k] = np.asarray(c, np.float64)[..., k]
    return np.stack(np.broadcast_arrays(*[parts[r] for r in rows]), axis=-1)


def _read(pieces: _Pieces, rows, bn: tuple, kernel) -> tuple:
  """A reader of the feature map (BN, ReLU, 1x1 ``kernel`` over its logical channels)
  reading channels ``rows``: (positions in the concatenation, its BN on the live ones,
  its kernel on them, and the bias its constant ones contribute)."""
  live = pieces.live()
  is_live = np.isin(rows, live)
  rows_live, rows_const = rows[is_live], rows[~is_live]
  w = np.asarray(kernel, np.float64)[0, 0]
  extra = np.zeros(w.shape[-1])
  if len(rows_const):
    values = pieces.constant_values(rows_const) * bn[0][rows_const] + bn[1][rows_const]
    extra = np.maximum(values, 0.0) @ w[rows_const]
  return (ops.positions(rows_live, live), ops.sub_affine(bn, rows_live), rows_live, extra)


def _affine(bn):
  return {'scale': bn[0], 'bias': bn[1]}


def _layer(p, s, mask, pieces: _Pieces, captured):
  """(plan, weights or None, chunk constant or None) of one dense layer."""
  keep3 = ops.kept(mask['conv3x3']['group0'])
  growth = p['conv3x3']['kernel'].shape[-1]
  if len(keep3) == 0:  # the 3x3 conv is removed: a chunk of zeros, the layer is gone
    return None, None, np.zeros(growth)
  groups = sorted(mask['conv1x1'], key=lambda g: int(g[len('group') :]))
  rows = np.concatenate(
    [o + ops.kept(mask['conv1x1'][g]) for o, g in zip(pieces.offsets(), groups)]
  )
  bn0 = ops.bn_affine(p['bn0'], s['bn0'])
  index, bn0_live, rows_live, extra = _read(pieces, rows, bn0, p['conv1x1']['kernel'])
  if len(rows_live) == 0:  # nothing from the image reaches it
    return None, None, np.asarray(captured['__call__'][0][0], np.float64)
  bn1 = ops.sub_affine(ops.bn_affine(p['bn1'], s['bn1']), keep3)
  return (
    index,
    {
      'bn0': _affine(bn0_live),
      'conv1x1': ops.folded(
        p['conv1x1']['kernel'], bn1, rows=rows_live, cols=keep3, extra_bias=extra[..., keep3]
      ),
      'conv3x3': {'kernel': np.asarray(p['conv3x3']['kernel'])[:, :, keep3]},
    },
    None,
  )


def _reader(bn_params, bn_stats, kernel, pieces: _Pieces) -> dict:
  """The transition's BN-ReLU-Conv1x1 (or the final BN with the classifier) over every
  channel: the live ones computed, the constant ones folded into a bias."""
  width = sum(pieces.widths)
  _, bn_live, rows_live, extra = _read(
    pieces, np.arange(width), ops.bn_affine(bn_params, bn_stats), kernel
  )
  return {
    'bn': _affine(bn_live),
    'kernel': np.asarray(kernel, np.float64)[:, :, rows_live],
    'extra': extra,
  }


def compact(model, variables, mask, captured):
  p, s = variables['params'], variables['batch_stats']
  weights, plan = {'stem': resnet._stem(p['stem'], s['stem'])}, {}
  width = p['stem']['conv']['kernel'].shape[-1]
  for b, num_layers in enumerate(model.blocks):
    pieces = _Pieces(width)
    for i in range(num_layers):
      name = f'block{b}_layer{i}'
      index, layer, constant = _layer(p[name], s[name], mask[name], pieces, captured[name])
      if layer is not None:
        plan[name], weights[name] = index, layer
      pieces.add(model.growth_rate, constant)
    if b < len(model.blocks) - 1:
      t = f'transition{b}'
      r = _reader(p[t]['bn'], s[t]['bn'], p[t]['conv']['kernel'], pieces)
      weights[t] = {'bn': r['bn'], 'conv': {'kernel': r['kernel']}}
      if np.any(r['extra']):
        weights[t]['conv']['bias'] = r['extra']
      width = p[t]['conv']['kernel'].shape[-1]
  classifier = p['classifier']['linear']
  r = _reader(p['final_bn'], s['final_bn'], np.asarray(classifier['kernel'])[None, None], pieces)
  # constant channels reach the classifier through the global mean
  extra = np.mean(r['extra'], axis=tuple(range(r['extra'].ndim - 1)))
  weights['final_bn'] = r['bn']
  weights['classifier'] = {
    'kernel': r['kernel'][0, 0],
    'bias': np.asarray(classifier['bias'], np.float64) + extra,
  }
  return plan, weights


def apply(model, plan, weights, images):
  x = resnet.apply_stem(weights['stem'], images)
  for b, num_layers in enumerate(model.blocks):
    for i in range(num_layers):
      name = f'block{b}_layer{i}'
      if name not in weights:
        continue
      w = weights[name]
      y = jax.nn.relu(ops.affine(ops.take(x, plan[name]), w['bn0']))
      y = jax.nn.relu(ops.conv(y, w['conv1x1']))
      x = jnp.concatenate([x, ops.conv(y, w['conv3x3'])], axis=-1)
    t = f'transition{b}'
    if t in weights:
      x = ops.conv(jax.nn.relu(ops.affine(x, weights[t]['bn'])), weights[t]['conv'])
      x = nn.avg_pool(x, (2, 2), (2, 2))
  x = jnp.mean(jax.nn.relu(ops.affine(x, weights['final_bn'])), axis=(1, 2))
  return ops.dense(x, weights['classifier'])
