"""Compact SupNet-E / EI (``supernets.enas``).

A cell's output concatenates its unread nodes and is read whole by the next cells' 1x1
convs, so it keeps every channel. Inside a cell, a node's channel is computed only if some
reader needs it (``_needed``, from the last node back): a separable op needs the channels
its first conv keeps, a pool or identity needs what its own output must give, a factorized
reduction (strided identity) needs all, and an unread node gives all. Every op then computes
exactly its node's needed channels, so the two ops of a node add as they are; the 1x1 convs
that make the cell's inputs compute only what their node needs. A separable op whose second
conv keeps nothing is its BatchNorm's constant; one whose first conv keeps nothing (the
second some) an image-independent map read off the masked super-network. Constants enter
the network with a batch axis of one and broadcast where they meet image-dependent values.
ENAS's auxiliary head trains the super-network and is not part of it at inference.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pgnas_jax.compact import ops
from pgnas_jax.supernets.enas import AVG_POOL, MAX_POOL, SEPARABLE_KERNEL_SIZES


def _cells(model):
  """(name, arc, reduction) of every cell, in order (``EnasNet``)."""
  out = []
  for stage in range(3):
    kinds = ([True] if stage > 0 else []) + [False] * model.normal_cells_per_stage
    for reduction in kinds:
      arc = tuple(model.reduction_arc if reduction else model.normal_arc)
      out.append((f'cell{len(out)}', arc, reduction))
  return out


def _ops(arc, reduction):
  """(node, side, source, op, strides) of every op of a cell."""
  return [
    (
      j + 2,
      side,
      arc[4 * j + 2 * side],
      arc[4 * j + 2 * side + 1],
      2 if (reduction and arc[4 * j + 2 * side] < 2) else 1,
    )
    for j in range(len(arc) // 4)
    for side in range(2)
  ]


def _kind(op: int, strides: int) -> str:
  if op in SEPARABLE_KERNEL_SIZES:
    return 'sep'
  return {AVG_POOL: 'avg', MAX_POOL: 'max'}.get(op, 'reduce' if strides > 1 else 'identity')


def _sep_keeps(mask):
  return ops.kept(mask['sep0']['group0']), ops.kept(mask['sep1']['group0'])


def _needed(arc, reduction, mask, f: int) -> list:
  """Per node, the sorted channels some reader needs."""
  n = 2 + len(arc) // 4
  read = {src for _, _, src, _, _ in _ops(arc, reduction)}
  needed = [set() if i in read else set(range(f)) for i in range(n)]
  for j, side, src, op, strides in reversed(_ops(arc, reduction)):
    if not needed[j]:
      continue
    kind = _kind(op, strides)
    if kind == 'sep':
      keep0, keep1 = _sep_keeps(mask[f'node{j}_op{side}'])
      needed[src] |= set(keep0.tolist()) if len(keep1) else set()
    else:
      needed[src] |= set(range(f)) if kind == 'reduce' else needed[j]
  return [np.array(sorted(s), np.int64) for s in needed]


def _relu_conv_bn(p, s, cols=None):
  bn = ops.bn_affine(p['bn'], s['bn'])
  if cols is None:
    return ops.folded(p['conv']['kernel'], bn)
  return ops.folded(p['conv']['kernel'], ops.sub_affine(bn, cols), cols=cols)


def _separable(p, bn: tuple, rows, cols):
  """A separable conv reading ``rows``, computing ``cols``, with the BN after it folded."""
  dw = np.swapaxes(np.asarray(p['depthwise'])[:, :, rows], 2, 3)  # to [k, k, 1, channels]
  pw = ops.folded(p['pointwise'], ops.sub_affine(bn, cols), rows=rows, cols=cols)
  return {'depthwise': dw, 'pointwise': pw['kernel'], 'bias': pw['bias']}


def _sep_op(p, s, mask, captured, live_src, cols):
  """(plan entry, weights) of a separable op computing channels ``cols``."""
  keep0, keep1 = _sep_keeps(mask)
  if len(keep1) == 0:
    return ('constant',), {'constant': ops.bn_affine(p['bn1'], s['bn1'])[1][cols]}
  if len(keep0) == 0:
    return ('constant',), {'constant': np.asarray(captured['__call__'][0][0])[..., cols]}
  bn0, bn1 = (ops.bn_affine(p[f'bn{i}'], s[f'bn{i}']) for i in range(2))
  return ('sep', ops.positions(keep0, live_src)), {
    'sep0': _separable(p['sep0'], bn0, keep0, keep1),
    'sep1': _separable(p['sep1'], bn1, keep1, cols),
  }


def _cell(variables: tuple, mask, captured, arc, reduction, f):
  """(plan, weights) of one cell, from its (params, BatchNorm statistics) ``variables``."""
  p, s = variables
  needed = _needed(arc, reduction, mask, f)
  weights, plan = {}, {'computed': tuple(i for i, n in enumerate(needed) if len(n))}
  live = list(needed)
  plan['match_prev_prev'] = 'absent'
  if 'match_prev_prev' not in p:
    live[0] = np.arange(f)
    plan['match_prev_prev'] = None
  elif len(needed[0]):
    reduce = 'path0' in p['match_prev_prev']
    plan['match_prev_prev'] = 'reduce' if reduce else 'conv'
    weights['match_prev_prev'] = (
      ops.folded_reduction(p['match_prev_prev'], s['match_prev_prev'], needed[0])
      if reduce
      else _relu_conv_bn(p['match_prev_prev'], s['match_prev_prev'], needed[0])
    )
  if len(needed[1]):
    if 'match_prev' in p:
      weights['match_prev'] = _relu_conv_bn(p['match_prev'], s['match_prev'])
    weights['base'] = _relu_conv_bn(p['base'], s['base'], needed[1])
  for j, side, src, op, strides in _ops(arc, reduction):
    name, cols = f'node{j}_op{side}', needed[j]
    if not len(cols):
      continue
    kind = _kind(op, strides)
    if kind == 'sep':
      plan[name], weights[name] = _sep_op(
        p[name], s[name], mask[name], captured[name], live[src], cols
      )
    elif kind == 'reduce':
      plan[name], weights[name] = ('reduce', None), ops.folded_reduction(p[name], s[name], cols)
    else:
      plan[name] = (kind, ops.positions(cols, live[src]))
  for i in range(2):
    if f'reduce_input{i}' in p:
      weights[f'reduce_input{i}'] = ops.folded_reduction(
        p[f'reduce_input{i}'], s[f'reduce_input{i}']
      )
  return plan, weights


def compact(model, variables, mask, captured):
  p, s = variables['params'], variables['batch_stats']
  weights = {
    'stem': ops.folded(p['stem']['kernel'], ops.bn_affine(p['stem_bn'], s['stem_bn'])),
    'classifier': dict(p['classifier']['linear']),
  }
  plan, f = {}, model.filters
  for name, arc, reduction in _cells(model):
    f = 2 * f if reduction else f
    cell = (p[name], s[name])
    plan[name], weights[name] = _cell(cell, mask[name], captured[name], arc, reduction, f)
  return plan, weights


def _apply_op(kind, x, w, strides):
  if kind == 'sep':
    for i in range(2):
      x = ops.separable(jax.nn.relu(x), w[f'sep{i}'], strides if i == 0 else 1)
    return x
  if kind == 'avg':
    return nn.avg_pool(x, (3, 3), (strides, strides), 'SAME', count_include_pad=False).astype(
      x.dtype
    )
  if kind == 'max':
    return nn.max_pool(x, (3, 3), (strides, strides), 'SAME')
  if kind == 'reduce':
    return ops.factorized_reduction(x, w, strides)
  return x


def _apply_cell(plan, w, arc, reduction, prev_prev, prev):
  nodes = {}
  if plan['match_prev_prev'] == 'reduce':
    nodes[0] = ops.factorized_reduction(jax.nn.relu(prev_prev), w['match_prev_prev'], 2)
  elif plan['match_prev_prev'] == 'conv':
    nodes[0] = ops.conv(jax.nn.relu(prev_prev), w['match_prev_prev'])
  elif plan['match_prev_prev'] is None:
    nodes[0] = prev_prev
  if 'base' in w:
    if 'match_prev' in w:
      prev = ops.conv(jax.nn.relu(prev), w['match_prev'])
    nodes[1] = ops.conv(jax.nn.relu(prev), w['base'])
  size = prev.shape[1:3] if not reduction else tuple(-(-d // 2) for d in prev.shape[1:3])
  read = set()
  for j, side, src, _, strides in _ops(arc, reduction):
    read.add(src)
    name = f'node{j}_op{side}'
    if j not in plan['computed']:
      continue
    kind, index = plan[name][0], plan[name][-1]
    if kind == 'constant':
      c = jnp.asarray(w[name]['constant'])
      out = jnp.broadcast_to(c, (1,) + tuple(size) + c.shape[-1:])
    else:
      out = _apply_op(kind, ops.take(nodes[src], index), w.get(name), strides)
    nodes[j] = nodes[j] + out if j in nodes else out
  outputs = []
  for i in sorted(nodes):
    if i in read:
      continue
    n = nodes[i]
    if f'reduce_input{i}' in w:
      n = ops.factorized_reduction(n, w[f'reduce_input{i}'], 2)
    outputs.append(jnp.broadcast_to(n, (prev.shape[0],) + n.shape[1:]))
  return jnp.concatenate(outputs, axis=-1)


def apply(model, plan, weights, images):
  x = ops.conv(images, weights['stem'])
  prev_prev = prev = x
  for name, arc, reduction in _cells(model):
    out = _apply_cell(plan[name], weights[name], arc, reduction, prev_prev, prev)
    prev_prev, prev = prev, out
  return ops.dense(jnp.mean(jax.nn.relu(prev), axis=(1, 2)), weights['classifier'])
