"""Which ops of a traced step run on the CPU kernels: ``in_use(mesh)``, entered by a step
builder around what it traces, installs a flax method interceptor that hands every
``layers.Convolving`` convolution, and every flax BatchNorm in training mode, to
``kernels`` where they can take it, and leaves everything else to the module's own code.
Nothing is read from global state inside the layers: outside ``in_use`` they are plain
XLA, and reading a layer tells what runs unless a step builder says otherwise."""

import contextlib
import functools

import flax.linen as nn
import jax.numpy as jnp

from pgnas_jax import layers
from pgnas_jax.backends.cpu import kernels


@contextlib.contextmanager
def in_use(mesh, per_device: bool = False):
  """While a function is traced in this context on a CPU ``mesh`` (with the kernels
  available), its float32 convolutions and training-mode BatchNorms run on ``kernels``.
  ``per_device``: the caller is already per device (inside a ``shard_map``); else the calls
  are split over the mesh's batch axis here."""
  if mesh.devices.flat[0].platform != 'cpu' or not kernels.available():
    yield
    return
  split = None if per_device or mesh.size == 1 else mesh
  with nn.intercept_methods(functools.partial(_intercept, split)):
    yield


def _intercept(mesh, next_fun, args, kwargs, context):
  module, method = context.module, context.method_name
  if method == 'convolve' and isinstance(module, layers.Convolving):
    x, kernel, strides, dilation, groups = args
    if kernels.handles_conv(x, kernel, strides, dilation, groups, mesh):
      return kernels.conv(x, kernel, strides, dilation, groups, mesh)
  if method == '__call__' and isinstance(module, nn.BatchNorm):
    return _batch_norm(module, mesh, next_fun, args, kwargs)
  return next_fun(*args, **kwargs)


def fits(bn: nn.BatchNorm, x) -> bool:
  """Whether the kernels compute what this BatchNorm does in training mode: float32 input,
  parameters and output, the last axis normalised with a scale and a bias, flax's fast
  variance, and its statistics over this call's batch (no ``axis_name``: the kernels sum
  over the mesh themselves)."""
  return (
    x.dtype == jnp.float32
    and bn.axis in (-1, x.ndim - 1)
    and bn.axis_name is None
    and bn.axis_index_groups is None
    and bn.use_bias
    and bn.use_scale
    and bn.use_fast_variance
    and bn.dtype in (None, jnp.float32)
    and bn.param_dtype == jnp.float32
  )


def _batch_norm(bn: nn.BatchNorm, mesh, next_fun, args, kwargs):
  """flax's BatchNorm in training mode with its sums on the kernels; flax's own code where
  it runs on its running statistics, initialises, is given a mask, or does not ``fit``."""
  x, *rest = args
  use_running_average = kwargs.get('use_running_average', rest[0] if rest else None)
  running = nn.merge_param('use_running_average', bn.use_running_average, use_running_average)
  plain = running or bn.is_initializing() or kwargs.get('mask') is not None
  if plain or not fits(bn, x) or not kernels.handles_batch_norm(x, mesh):
    return next_fun(*args, **kwargs)
  features = (x.shape[-1],)
  ra_mean = bn.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
  ra_var = bn.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
  scale = bn.param('scale', bn.scale_init, features, bn.param_dtype)
  bias = bn.param('bias', bn.bias_init, features, bn.param_dtype)
  y, mean, var = kernels.batch_norm(x, scale, bias, bn.epsilon, mesh)
  ra_mean.value = bn.momentum * ra_mean.value + (1 - bn.momentum) * mean
  ra_var.value = bn.momentum * ra_var.value + (1 - bn.momentum) * var
  return y
