"""The searchable convolution and dense layer, plain layers that record their cost, and kernel
bookkeeping.

A ``SearchableConv`` is a plain conv, or (``separable=True``) a depthwise conv followed by a
pointwise 1x1 conv (the separable conv of ENAS). Every one of its parameters is a kernel whose
axis 2 is the op's input channels, so dropping input channel ``k`` removes the slice
``w[:, :, k, :]`` of each of them (SPEC section 1): for a separable conv, depthwise filter ``k``
and the pointwise weights that read its output. It splits its input channels into groups and
declares, at init:
  * ``masks/<path>/group<i>``: a template of ones, shape ``(channels,)``: the tree that
    every mask (relaxed or hard) and the drop logits mirror;
  * ``channel_costs/<path>/group<i>``: ``[params, MACs]`` that one kept input channel costs.
At apply it reads its masks from the ``masks`` collection when the caller passes one
(keep masks of shape ``(channels,)`` or ``(batch, channels)``), and runs unmasked when not.
A pruned network (export) passes an ``architecture`` collection instead: per group, the kept
channel indices; its kernels then hold only those input channels, and a conv that keeps
none is removed (its output is zero).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


PyTree = Any
MASKS = 'masks'
ARCHITECTURE = 'architecture'
CHANNEL_COSTS = 'channel_costs'
FIXED_MACS = 'fixed_macs'
AUXILIARY_LOGITS = 'auxiliary_logits'  # training-only classifiers sow their logits here

conv_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
dense_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')


def group_name(i: int) -> str:
  return f'group{i}'


def xla_conv(x, kernel, stride: int, dilation: int, groups: int = 1):
  """XLA's SAME-padded NHWC x HWIO convolution."""
  return jax.lax.conv_general_dilated(
    x, kernel, (stride, stride), 'SAME', rhs_dilation=(dilation, dilation),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups,
  )  # fmt: skip


class Convolving(nn.Module):
  """A layer whose convolutions go through ``convolve``: XLA's, unless a step builder
  chooses another implementation for what it traces (``backends.cpu.ops.in_use``)."""

  def convolve(self, x, kernel, stride: int, dilation: int, groups: int):
    return xla_conv(x, kernel, stride, dilation, groups)


def layer_macs(y_shape, kernel_shape) -> int:
  """Multiply-accumulates of one image through a conv (or dense) layer."""
  spatial = int(np.prod(y_shape[1:-1])) if len(y_shape) > 2 else 1
  return spatial * int(np.prod(kernel_shape))


def apply_keep_mask(x, keep):
  """``x`` (channels last) times keep masks of one architecture ``(channels,)`` or one per
  example ``(batch, channels)`` (training), over every axis between."""
  if keep.ndim == 1:  # one architecture for every image
    return x * keep.astype(x.dtype)
  between = (1,) * (x.ndim - 2)
  return x * keep.astype(x.dtype).reshape(keep.shape[:1] + between + keep.shape[1:])


def input_groups(groups, inputs: int, unit: str, layer: str) -> tuple:
  """(sizes, names) of the input groups of a searchable layer (named ``layer`` in errors)
  reading ``inputs`` channels or features: its ``groups``, else one group of every input."""
  sizes = tuple(groups) if groups else (inputs,)
  if sum(sizes) != inputs:
    raise ValueError(f'{layer}: groups {sizes} do not add up to {inputs} {unit}')
  return sizes, [group_name(i) for i in range(len(sizes))]


def _kept_inputs(layer: nn.Module, sizes: tuple, names: list):
  """The input indices the ``architecture`` collection keeps, over all groups."""
  offsets = np.cumsum((0,) + sizes[:-1])
  return jnp.concatenate([layer.get_variable(ARCHITECTURE, n) + o for n, o in zip(names, offsets)])


def _masked(layer: nn.Module, x, names: list):
  """``x`` times the layer's keep masks when the caller passes the ``masks`` collection."""
  if not all(layer.has_variable(MASKS, n) for n in names):
    return x
  return apply_keep_mask(x, jnp.concatenate([layer.get_variable(MASKS, n) for n in names], -1))


def _declare_groups(layer: nn.Module, sizes: tuple, names: list, costs: tuple) -> None:
  """At init: each group's template of ones and ``costs`` (params, MACs) of one kept input."""
  for n, c in zip(names, sizes):
    layer.variable(MASKS, n, jnp.ones, (c,), jnp.float32)
    layer.variable(CHANNEL_COSTS, n, lambda: jnp.array(costs, jnp.int32))


def conv_kernel_shapes(channels: int, features: int, kernel_size: int, separable: bool) -> dict:
  """Every kernel of a searchable conv reading ``channels`` inputs, input channels on axis 2."""
  window = (kernel_size, kernel_size)
  if separable:
    # depthwise stored [k, k, channels, 1] (not HWIO's [k, k, 1, channels]) so that axis 2
    # is the input channel, as for every other searchable kernel
    return {'depthwise': window + (channels, 1), 'pointwise': (1, 1, channels, features)}
  return {'kernel': window + (channels, features)}


def conv_op(x, kernels: dict, geometry: tuple, convolve):
  """A searchable conv's op on ``x``: ``geometry`` is (strides, dilation, separable)."""
  strides, dilation, separable = geometry
  kernels = {n: k.astype(x.dtype) for n, k in kernels.items()}
  if separable:
    depthwise = jnp.swapaxes(kernels['depthwise'], 2, 3)
    x = convolve(x, depthwise, strides, dilation, x.shape[-1])
    return convolve(x, kernels['pointwise'], 1, 1, 1)
  return convolve(x, kernels['kernel'], strides, dilation, 1)


def removed_conv_output(x, kernel_shapes: dict, geometry: tuple):
  """What a searchable conv whose every input is dropped outputs: zeros of the shape its op
  (``kernel_shapes`` for all of ``x``'s channels, ``geometry`` as ``conv_op``'s) gives."""
  full = {n: jnp.zeros(s, x.dtype) for n, s in kernel_shapes.items()}
  shape = jax.eval_shape(lambda a: conv_op(a, full, geometry, xla_conv), x).shape
  return jnp.zeros(shape, x.dtype)


def conv_input_costs(one_channel_kernels: dict, y_shape) -> tuple:
  """(params, MACs) one kept input channel costs a conv whose kernels for one input are
  ``one_channel_kernels`` (shapes) and whose output is ``y_shape``: its kernel slices, each
  weight one MAC per output pixel."""
  per_channel = sum(int(np.prod(s)) // s[2] for s in one_channel_kernels.values())
  return per_channel, int(np.prod(y_shape[1:-1])) * per_channel


def dense_input_costs(features: int, x_shape) -> tuple:
  """(params, MACs) one kept input feature costs a dense layer of ``features`` outputs
  reading ``x_shape``: a kernel row, one MAC per output at every position."""
  return features, int(np.prod(x_shape[1:-1])) * features


class SearchableConv(Convolving):
  """Conv (no bias, SAME padding) whose input channel groups can be dropped."""

  features: int
  kernel_size: int = 3
  strides: int = 1
  dilation: int = 1
  groups: Sequence[int] | None = None  # input channels per group; None: one group
  separable: bool = False  # depthwise kernel_size conv (strided, dilated), then pointwise 1x1

  def _kernel_shapes(self, channels: int) -> dict:
    return conv_kernel_shapes(channels, self.features, self.kernel_size, self.separable)

  @property
  def _geometry(self) -> tuple:
    return self.strides, self.dilation, self.separable

  def _op(self, x, kernels: dict, convolve):
    return conv_op(x, kernels, self._geometry, convolve)

  @nn.compact
  def __call__(self, x):
    sizes, names = input_groups(self.groups, x.shape[-1], 'channels', self.name)
    if self.has_variable(ARCHITECTURE, names[0]):
      kept = _kept_inputs(self, sizes, names)
      # pruned weights are sliced from a trained super-network, never initialised here
      kernels = {
        n: self.param(n, nn.initializers.zeros, s)
        for n, s in self._kernel_shapes(kept.shape[0]).items()
      }
      if kept.shape[0] == 0:  # every input dropped: the operation is removed
        return removed_conv_output(x, self._kernel_shapes(x.shape[-1]), self._geometry)
      return self._op(jnp.take(x, kept, axis=-1), kernels, self.convolve)

    kernels = {
      n: self.param(n, kernel_init(n), s) for n, s in self._kernel_shapes(x.shape[-1]).items()
    }
    y = self._op(_masked(self, x, names), kernels, self.convolve)
    if self.is_initializing():
      _declare_groups(self, sizes, names, conv_input_costs(self._kernel_shapes(1), y.shape))
    return y


class SearchableDense(nn.Module):
  """A dense layer whose input features the search keeps or drops (an MLP's hidden units,
  read by the layer after them): features on the last axis of ``x`` (``[batch, features]``
  or ``[batch, ..., features]``, e.g. tokens), split into groups as ``SearchableConv``'s
  channels. Its kernel is stored ``[1, 1, inputs, features]`` (axis 2 the input, as every
  searchable kernel), its bias in a child ``bias`` (never searched). Pruned mode as
  ``SearchableConv``: the kernel holds the kept inputs; keeping none leaves the bias."""

  features: int
  groups: Sequence[int] | None = None  # input features per group; None: one group
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    sizes, names = input_groups(self.groups, x.shape[-1], 'features', self.name)
    if self.has_variable(ARCHITECTURE, names[0]):
      kept = _kept_inputs(self, sizes, names)
      kernel = self.param('kernel', nn.initializers.zeros, (1, 1, kept.shape[0], self.features))
      y = jnp.take(x, kept, axis=-1) @ kernel[0, 0].astype(x.dtype)
    else:
      kernel = self.param('kernel', dense_init, (1, 1, x.shape[-1], self.features))
      y = _masked(self, x, names) @ kernel[0, 0].astype(x.dtype)
      if self.is_initializing():
        _declare_groups(self, sizes, names, dense_input_costs(self.features, x.shape))
    return _Bias(self.features, name='bias')(y) if self.use_bias else y


def attention_kernel_shapes(features: int, heads: int, head_dim: int, out_features: int) -> dict:
  """The kernels of a searchable attention layer with ``heads`` heads, heads on axis 2."""
  qkv = (1, features, heads, head_dim)
  return {'query': qkv, 'key': qkv, 'value': qkv, 'out': (1, head_dim, heads, out_features)}


def attention_init(name: str):
  """Fan-in: a token's features for the query, key and value; every head's output for out."""
  if name == 'out':
    return nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal', (1, 2), 3)
  return nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal', 1, (2, 3))


def attend(x, kernels: dict, keep=None):
  """Multi-head self-attention of tokens ``x`` [batch, tokens, features] through
  ``kernels`` (``attention_kernel_shapes``), each head's output times its ``keep`` entry
  (``(heads,)`` or one per example ``(batch, heads)``; None: every head) before the output
  projection; no bias."""
  q, k, v = (
    jnp.einsum('btd,dhk->bthk', x, kernels[n][0].astype(x.dtype)) for n in ('query', 'key', 'value')
  )
  scores = jnp.einsum('bthk,bshk->bhts', q, k) / np.sqrt(q.shape[-1]).astype(x.dtype)
  heads = jnp.einsum('bhts,bshk->bthk', jax.nn.softmax(scores, axis=-1), v)
  if keep is not None:
    keep = keep.astype(x.dtype)
    heads = heads * (keep[:, None] if keep.ndim == 1 else keep[:, None, :, None])
  return jnp.einsum('bthk,khf->btf', heads, kernels['out'][0].astype(x.dtype))


def attention_head_costs(kernels_of_one_head: dict, tokens: int) -> tuple:
  """(params, MACs) one kept head costs: its kernel slices, each weight one MAC per token,
  and its scores and weighted sum, ``tokens`` x ``tokens`` x head_dim each."""
  params = sum(int(np.prod(s)) for s in kernels_of_one_head.values())
  head_dim = kernels_of_one_head['query'][-1]
  return params, tokens * params + 2 * tokens * tokens * head_dim


class SearchableAttention(nn.Module):
  """Multi-head self-attention over tokens ``[batch, tokens, features]`` whose heads the
  search keeps or drops whole: one group, a head per "channel" (its keep mask ``(heads,)``,
  one drop probability for all). Kernels ``query``, ``key``, ``value`` stored
  ``[1, features, heads, head_dim]`` and ``out`` ``[1, head_dim, heads, out_features]``
  (axis 2 the head, as a searchable kernel's input channel), the output bias in a child
  ``bias``. A head costs its kernel slices and its attention over the tokens. Pruned mode
  as ``SearchableConv``: the kernels hold the kept heads; keeping none leaves the bias."""

  num_heads: int
  head_dim: int
  out_features: int | None = None  # None: the input's features

  @nn.compact
  def __call__(self, x):
    if x.ndim != 3:
      raise ValueError(
        f'{self.name}: attention reads tokens [batch, tokens, features], not {x.shape}'
      )
    out_features = self.out_features or x.shape[-1]
    names = [group_name(0)]
    pruned = self.has_variable(ARCHITECTURE, names[0])
    heads = self.get_variable(ARCHITECTURE, names[0]).shape[0] if pruned else self.num_heads
    init = (lambda n: nn.initializers.zeros) if pruned else attention_init
    shapes = attention_kernel_shapes(x.shape[-1], heads, self.head_dim, out_features)
    kernels = {n: self.param(n, init(n), s) for n, s in shapes.items()}
    if heads == 0:  # every head dropped: the layer is removed
      y = jnp.zeros(x.shape[:-1] + (out_features,), x.dtype)
    else:
      passed = not pruned and self.has_variable(MASKS, names[0])
      y = attend(x, kernels, self.get_variable(MASKS, names[0]) if passed else None)
    if self.is_initializing():
      one = attention_kernel_shapes(x.shape[-1], 1, self.head_dim, out_features)
      _declare_groups(self, (self.num_heads,), names, attention_head_costs(one, x.shape[1]))
    return _Bias(out_features, name='bias')(y)


class _Bias(nn.Module):
  features: int

  @nn.compact
  def __call__(self, y):
    return y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(y.dtype)


def kernel_init(name: str):
  if name == 'depthwise':  # fan-in of one depthwise filter is its window, not window x channels
    return nn.initializers.variance_scaling(2.0, 'fan_in', 'normal', in_axis=-1, out_axis=-2)
  return conv_init


class Conv(Convolving):
  """A plain (not searchable) conv, no bias, SAME padding, that records its MACs."""

  features: int
  kernel_size: int = 3
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    window = (self.kernel_size, self.kernel_size)
    kernel = self.param('kernel', conv_init, window + (x.shape[-1], self.features))
    y = self.convolve(x, kernel.astype(x.dtype), self.strides, 1, 1)
    if self.is_initializing():
      self.variable(
        FIXED_MACS, 'macs', lambda: jnp.array(layer_macs(y.shape, kernel.shape), jnp.int32)
      )
    return y


class Dense(nn.Module):
  """A dense layer that records its MACs (at every position of ``[batch, ..., features]``)."""

  features: int

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.features, name='linear')(x)
    if self.is_initializing():
      macs = layer_macs(y.shape, (x.shape[-1], self.features))
      self.variable(FIXED_MACS, 'macs', lambda: jnp.array(macs, jnp.int32))
    return y


def batch_norm(train: bool, name: str | None = None):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def groups_by_conv(template: PyTree) -> dict:
  """Searchable conv path -> its group paths in group order."""
  by_conv = {}
  for path in traverse_util.flatten_dict(template):
    by_conv.setdefault(path[:-1], []).append(path)
  return {
    conv: sorted(groups, key=lambda p: int(p[-1][len('group') :]))
    for conv, groups in by_conv.items()
  }


def searchable_conv_paths(template: PyTree) -> set:
  """Paths of the searchable convs; all their parameters are searchable kernels."""
  return set(groups_by_conv(template))


def group_sq_norms(params: PyTree, template: PyTree) -> PyTree:
  """Per searchable group, ``sum ||w[:, :, group channels, :]||^2`` over the conv's kernels."""
  flat_template = traverse_util.flatten_dict(template)
  flat_params = traverse_util.flatten_dict(params)
  out = {}
  for conv, groups in groups_by_conv(template).items():
    kernels = [w for path, w in flat_params.items() if path[:-1] == conv]
    start = 0
    for g in groups:
      size = flat_template[g].shape[-1]
      out[g] = sum(jnp.sum(jnp.square(w[:, :, start : start + size, :])) for w in kernels)
      start += size
  return traverse_util.unflatten_dict(out)


def mask_params(params: PyTree, template: PyTree, mask: PyTree) -> PyTree:
  """Searchable kernels with the input channels that the hard ``mask`` drops set to zero:
  the weights one architecture has (``prune_params`` without removing them)."""
  flat = dict(traverse_util.flatten_dict(params))
  flat_mask = traverse_util.flatten_dict(mask)
  for conv, groups in groups_by_conv(template).items():
    keep = jnp.concatenate([flat_mask[g] for g in groups])
    for path in [p for p in flat if p[:-1] == conv]:
      flat[path] = flat[path] * keep.astype(flat[path].dtype)[None, None, :, None]
  return traverse_util.unflatten_dict(flat)


def prune_params(params: PyTree, template: PyTree, kept: PyTree) -> PyTree:
  """Weights of the pruned network: each searchable kernel keeps its kept input channels."""
  flat = dict(traverse_util.flatten_dict(params))
  flat_template = traverse_util.flatten_dict(template)
  flat_kept = traverse_util.flatten_dict(kept)
  for conv, groups in groups_by_conv(template).items():
    offset, index = 0, []
    for g in groups:
      index.append(np.asarray(flat_kept[g], np.int64) + offset)
      offset += flat_template[g].shape[-1]
    index = np.concatenate(index)
    for path in [p for p in flat if p[:-1] == conv]:
      flat[path] = jnp.take(flat[path], index, axis=2)
  return traverse_util.unflatten_dict(flat)
