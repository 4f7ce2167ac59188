"""The searchable convolution, plain layers that record their cost, and kernel bookkeeping.

A ``SearchableConv`` splits its input channels into groups. It declares, at init:
  * ``masks/<path>/group<i>``: a template of ones, shape ``(channels,)``: the tree that
    every mask (relaxed or hard) and the drop logits mirror;
  * ``channel_costs/<path>/group<i>``: ``[params, MACs]`` that one kept input channel costs.
At apply it reads its masks from the ``masks`` collection when the caller passes one
(keep masks of shape ``(channels,)`` or ``(batch, channels)``), and runs unmasked when not.
A pruned network (export) passes an ``architecture`` collection instead: per group, the kept
channel indices; the kernel then holds only those input channels, and a conv that keeps
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

conv_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def group_name(i: int) -> str:
  return f'group{i}'


def _conv(x, kernel, strides, dilation):
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), 'SAME', rhs_dilation=(dilation, dilation),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _macs(y_shape, kernel_shape) -> int:
  """Multiply-accumulates of one image through a conv (or dense) layer."""
  spatial = int(np.prod(y_shape[1:-1])) if len(y_shape) > 2 else 1
  return spatial * int(np.prod(kernel_shape))


def _apply_keep_mask(x, keep):
  if keep.ndim == 1:  # one architecture for every image
    return x * keep.astype(x.dtype)
  return x * keep.astype(x.dtype)[:, None, None, :]  # per-example masks in training


class SearchableConv(nn.Module):
  """Conv (no bias, SAME padding) whose input channel groups can be dropped."""
  features: int
  kernel_size: int = 3
  strides: int = 1
  dilation: int = 1
  groups: Sequence[int] | None = None  # input channels per group; None: one group

  @nn.compact
  def __call__(self, x):
    sizes = tuple(self.groups) if self.groups else (x.shape[-1],)
    if sum(sizes) != x.shape[-1]:
      raise ValueError(f'{self.name}: groups {sizes} do not add up to {x.shape[-1]} channels')
    names = [group_name(i) for i in range(len(sizes))]
    window = (self.kernel_size, self.kernel_size)

    if self.has_variable(ARCHITECTURE, names[0]):
      offsets = np.cumsum((0,) + sizes[:-1])
      kept = jnp.concatenate([self.get_variable(ARCHITECTURE, n) + o
                              for n, o in zip(names, offsets)])
      # pruned weights are sliced from a trained super-network, never initialised here
      kernel = self.param('kernel', nn.initializers.zeros, window + (kept.shape[0], self.features))
      if kept.shape[0] == 0:  # every input dropped: the operation is removed
        y_shape = jax.eval_shape(
            lambda a: _conv(a, jnp.zeros(window + (x.shape[-1], self.features), x.dtype),
                            self.strides, self.dilation), x).shape
        return jnp.zeros(y_shape, x.dtype)
      return _conv(jnp.take(x, kept, axis=-1), kernel, self.strides, self.dilation)

    kernel = self.param('kernel', conv_init, window + (x.shape[-1], self.features))
    if all(self.has_variable(MASKS, n) for n in names):
      keep = jnp.concatenate([self.get_variable(MASKS, n) for n in names], axis=-1)
      x = _apply_keep_mask(x, keep)
    y = _conv(x, kernel.astype(x.dtype), self.strides, self.dilation)

    if self.is_initializing():
      per_channel = self.kernel_size**2 * self.features
      for n, c in zip(names, sizes):
        self.variable(MASKS, n, jnp.ones, (c,), jnp.float32)
        self.variable(CHANNEL_COSTS, n, lambda: jnp.array(
            [per_channel, _macs(y.shape, window + (1, self.features))], jnp.int32))
    return y


class Conv(nn.Module):
  """A plain (not searchable) conv, no bias, SAME padding, that records its MACs."""
  features: int
  kernel_size: int = 3
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    window = (self.kernel_size, self.kernel_size)
    kernel = self.param('kernel', conv_init, window + (x.shape[-1], self.features))
    y = _conv(x, kernel.astype(x.dtype), self.strides, 1)
    if self.is_initializing():
      self.variable(FIXED_MACS, 'macs', lambda: jnp.array(_macs(y.shape, kernel.shape), jnp.int32))
    return y


class Dense(nn.Module):
  """A dense layer that records its MACs."""
  features: int

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.features, name='linear')(x)
    if self.is_initializing():
      self.variable(FIXED_MACS, 'macs', lambda: jnp.array(x.shape[-1] * self.features, jnp.int32))
    return y


def batch_norm(train: bool, name: str | None = None):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _kernel_path(group_path):
  return group_path[:-1] + ('kernel',)


def group_kernels(params: PyTree, template: PyTree) -> PyTree:
  """Per searchable group, its slice ``w[:, :, group channels, :]`` of the conv kernel."""
  flat_template = traverse_util.flatten_dict(template)
  flat_params = traverse_util.flatten_dict(params)
  out = {}
  offsets = {}
  for path in sorted(flat_template, key=lambda p: (p[:-1], int(p[-1][len('group'):]))):
    start = offsets.get(path[:-1], 0)
    size = flat_template[path].shape[-1]
    out[path] = flat_params[_kernel_path(path)][:, :, start:start + size, :]
    offsets[path[:-1]] = start + size
  return traverse_util.unflatten_dict(out)


def searchable_kernel_paths(template: PyTree) -> set:
  return {_kernel_path(p) for p in traverse_util.flatten_dict(template)}


def prune_params(params: PyTree, template: PyTree, kept: PyTree) -> PyTree:
  """Weights of the pruned network: each searchable kernel keeps its kept input channels."""
  flat = dict(traverse_util.flatten_dict(params))
  flat_template = traverse_util.flatten_dict(template)
  flat_kept = traverse_util.flatten_dict(kept)
  for kernel_path in searchable_kernel_paths(template):
    conv = kernel_path[:-1]
    groups = sorted((p for p in flat_template if p[:-1] == conv),
                    key=lambda p: int(p[-1][len('group'):]))
    offset, index = 0, []
    for g in groups:
      index.append(np.asarray(flat_kept[g], np.int64) + offset)
      offset += flat_template[g].shape[-1]
    flat[kernel_path] = jnp.take(flat[kernel_path], np.concatenate(index), axis=2)
  return traverse_util.unflatten_dict(flat)
