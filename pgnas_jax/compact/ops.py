"""The compact network's layers, and the arithmetic that makes them from a super-network.

At run time (``conv``, ``separable``, ``affine``, ``dense``, ``take``): plain functions of
arrays, no flax, no masks. A layer is a dict of arrays: ``kernel`` (HWIO) or ``depthwise``
(HWIO, one filter per channel) and ``pointwise``, and an optional ``bias`` that is either a
vector (one per output channel) or a map ``[H, W, out]`` (only where a removed conv left an
image-independent but not uniform input, see ``compact/__init__.py``).

At export (``bn_affine``, ``folded``, ``positions``): NumPy in float64, cast to float32 once.
A BatchNorm that directly follows a conv is folded into it (kernel scaled, a bias added);
one that does not (DenseNet's pre-activation BN) becomes a per-channel ``affine``.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

EPSILON = 1e-5  # layers.batch_norm's
_counter = []  # while ``counting_macs`` is active: one list that layers append MACs to
_convs = []  # while ``recording_convs`` is active: one list that convolutions append to


@contextlib.contextmanager
def counting_macs():
  """Collects the multiply-accumulates of every conv and dense layer traced inside (per
  image: trace with a batch of one)."""
  _counter.append([])
  try:
    yield _counter[-1]
  finally:
    _counter.pop()


@contextlib.contextmanager
def recording_convs():
  """Collects ``(input shape, kernel shape, strides, dilation, feature groups)`` of every
  convolution traced inside, in order (``latency_table`` looks each up)."""
  _convs.append([])
  try:
    yield _convs[-1]
  finally:
    _convs.pop()


def _record(macs: int) -> None:
  if _counter:
    _counter[-1].append(int(macs))


def _conv(x, kernel, strides, dilation, groups=1):
  if _convs:
    _convs[-1].append((tuple(x.shape), tuple(kernel.shape), strides, dilation, groups))
  return jax.lax.conv_general_dilated(
    x,
    kernel.astype(x.dtype),
    (strides, strides),
    'SAME',
    rhs_dilation=(dilation, dilation),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
  )


def _with_bias(y, layer):
  return y + layer['bias'].astype(y.dtype) if 'bias' in layer else y


def conv(x, layer: dict, strides: int = 1, dilation: int = 1):
  y = _conv(x, layer['kernel'], strides, dilation)
  _record(np.prod(y.shape[1:-1]) * np.prod(layer['kernel'].shape))
  return _with_bias(y, layer)


def separable(x, layer: dict, strides: int = 1, dilation: int = 1):
  """Depthwise conv (``depthwise`` [k, k, 1, C]) then pointwise 1x1 and bias."""
  y = _conv(x, layer['depthwise'], strides, dilation, groups=x.shape[-1])
  _record(np.prod(y.shape[1:-1]) * np.prod(layer['depthwise'].shape))
  return conv(
    y, {k: v for k, v in layer.items() if k != 'depthwise'} | {'kernel': layer['pointwise']}
  )


def affine(x, layer: dict):
  return x * layer['scale'].astype(x.dtype) + layer['bias'].astype(x.dtype)


def dense(x, layer: dict):
  _record(np.prod(layer['kernel'].shape))
  return x @ layer['kernel'].astype(x.dtype) + layer['bias'].astype(x.dtype)


def take(x, index):
  """Channels ``index`` (static) of ``x``; None: all. A run of consecutive channels is a
  slice, anything else a product with a constant 0/1 matrix: exact for finite values, and
  on XLA:CPU it costs next to nothing before a conv, where a gather added a third to a
  3x3 conv's time (benchmarks/export_speed.py, docs/export.md)."""
  if index is None:
    return x
  if len(index) and list(index) == list(range(index[0], index[0] + len(index))):
    return x[..., index[0] : index[0] + len(index)]
  select = np.zeros((x.shape[-1], len(index)), np.float32)
  select[np.asarray(index), np.arange(len(index))] = 1.0
  return x @ select.astype(x.dtype)


def shift_pair(x, strides: int):
  """The two inputs of a factorized reduction: every ``strides``-th pixel, and the same
  shifted by one (``supernets.common.FactorizedReduction``)."""
  a = x[:, ::strides, ::strides, :]
  b = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))[:, 1::strides, 1::strides, :]
  return a, b[:, : a.shape[1], : a.shape[2]]


# ---- export-time arithmetic (NumPy) ----


def kept(mask_leaf) -> np.ndarray:
  return np.flatnonzero(np.asarray(mask_leaf)).astype(np.int64)


def positions(subset, live):
  """Where the channels ``subset`` sit in a feature map holding channels ``live`` (both
  sorted); None when they are all of it, in order."""
  subset, live = np.asarray(subset), np.asarray(live)
  if len(subset) == len(live) and np.array_equal(subset, live):
    return None
  return tuple(int(i) for i in np.searchsorted(live, subset))


def bn_affine(params: dict, stats: dict) -> tuple:
  """(scale, bias) of an inference BatchNorm, float64: y = x * scale + bias."""
  scale = np.asarray(params['scale'], np.float64) / np.sqrt(
    np.asarray(stats['var'], np.float64) + EPSILON
  )
  return scale, np.asarray(params['bias'], np.float64) - np.asarray(
    stats['mean'], np.float64
  ) * scale


def f32(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


def folded(kernel, bn: tuple, rows=None, cols=None, factor: float = 1.0, extra_bias=0.0) -> dict:
  """Conv ``kernel`` (input channels on axis 2) restricted to input ``rows`` and output
  ``cols`` (None: all), followed by the affine ``bn`` (already restricted to ``cols``) and a
  factor, as one conv with a bias. ``extra_bias`` (before the affine) is what constant
  inputs the conv no longer reads contributed."""
  k = np.asarray(kernel, np.float64)
  if rows is not None:
    k = k[:, :, rows]
  if cols is not None:
    k = k[..., cols]
  scale, bias = bn
  return f32(
    {
      'kernel': k * scale * factor,
      'bias': (np.asarray(extra_bias, np.float64) * scale + bias) * factor,
    }
  )


def sub_affine(bn: tuple, index) -> tuple:
  return bn[0][index], bn[1][index]


def folded_reduction(params: dict, stats: dict, cols=None) -> dict:
  """A factorized reduction (``supernets.common.FactorizedReduction``) computing output
  channels ``cols`` (None: all), its BatchNorm folded into the two paths' halves; a path
  none of whose channels is wanted is left out."""
  bn = bn_affine(params['bn'], stats['bn'])
  half = params['path0']['kernel'].shape[-1]
  cols = np.arange(len(bn[0])) if cols is None else np.asarray(cols)
  out = {}
  for name, part in (('path0', cols[cols < half]), ('path1', cols[cols >= half] - half)):
    if len(part):
      shift = 0 if name == 'path0' else half
      out[name] = folded(params[name]['kernel'], sub_affine(bn, part + shift), cols=part)
  return out


def factorized_reduction(x, layer: dict, strides: int):
  a, b = shift_pair(x, strides)
  parts = [conv(v, layer[n]) for n, v in (('path0', a), ('path1', b)) if n in layer]
  return jnp.concatenate(parts, axis=-1)
