"""The searchable and cost-recording layers for Flax NNX modules: ``pgnas_jax.nnx``.

The same layers as ``layers`` (same kernels, shapes, initialisers, costs and pruned mode),
written the NNX way: built with their input sizes and ``rngs``, they hold their variables.
Besides ``nnx.Param`` and ``nnx.BatchStat`` they hold the variable kinds below, one per
collection the pipeline reads from a Linen layer; a searchable layer keeps its per-group
ones in a container named after that collection (``self.masks['group0']``), and
``supernets/nnx_bridge.py`` files each one where the Linen layer puts it
(``masks/<layer path>/group0``), so that the pipeline cannot tell the two apart:
  * ``Masks``: a group's keep mask; ones at construction (the template), then what the
    pipeline passes (``(channels,)`` or one per example ``(batch, channels)``);
  * ``ChannelCosts``: ``[params, MACs]`` one kept input costs, set at every call;
  * ``FixedMacs``: the MACs of a plain ``Conv`` or ``Dense``, set at every call;
  * ``Kept``: in a pruned network, the group's kept input indices (``export.load_weights``);
    every index until then.
"""

import jax.numpy as jnp
from flax import nnx

from pgnas_jax import layers


class Masks(nnx.Variable):
  pass


class ChannelCosts(nnx.Variable):
  pass


class FixedMacs(nnx.Variable):
  pass


class Kept(nnx.Variable):
  pass


COLLECTIONS = {
  Masks: layers.MASKS,
  ChannelCosts: layers.CHANNEL_COSTS,
  FixedMacs: layers.FIXED_MACS,
  Kept: layers.ARCHITECTURE,
}
GROUP_KINDS = (Masks, ChannelCosts, Kept)  # held per group, in a container named after it
for _kind, _collection in COLLECTIONS.items():
  nnx.register_variable_name(_collection, _kind, overwrite=True)


class _Searchable(nnx.Module):
  """Group bookkeeping of a searchable layer reading ``inputs`` channels or features."""

  def _declare_groups(self, groups, inputs: int, unit: str) -> None:
    self.inputs = inputs
    sizes, names = layers.input_groups(groups, inputs, unit, type(self).__name__)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    self.masks = nnx.Dict({n: Masks(jnp.ones((c,), jnp.float32)) for n, c in zip(names, sizes)})
    self.channel_costs = nnx.Dict({n: ChannelCosts(jnp.zeros((2,), jnp.int32)) for n in names})
    self.architecture = nnx.Dict(
      {n: Kept(jnp.arange(o, o + c, dtype=jnp.int32)) for n, c, o in zip(names, sizes, offsets)}
    )

  def _kept(self):
    """Every kept input index over all groups, or None when every input is kept (the
    super-network, or a pruned network that kept them all)."""
    kept = jnp.concatenate([k[...] for k in self.architecture.values()])
    return None if kept.shape[0] == self.inputs else kept

  def _keep(self):
    return jnp.concatenate([m[...] for m in self.masks.values()], -1)

  def _masked(self, x):
    return layers.apply_keep_mask(x, self._keep())

  def _set_costs(self, costs: tuple) -> None:
    for c in self.channel_costs.values():
      c.set_value(jnp.array(costs, jnp.int32))


class SearchableConv(_Searchable):
  """``pgnas_jax.SearchableConv`` for NNX: a conv (no bias, SAME padding; ``separable``: a
  depthwise conv then a pointwise 1x1) whose input channel groups can be dropped."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int = 3,
    strides: int = 1,
    dilation: int = 1,
    groups=None,
    separable: bool = False,
    *,
    rngs: nnx.Rngs,
  ):
    self._declare_groups(groups, in_features, 'channels')
    self.out_features, self.kernel_size, self.separable = out_features, kernel_size, separable
    self.geometry = (strides, dilation, separable)
    for name, shape in self._kernel_shapes(in_features).items():
      setattr(self, name, nnx.Param(layers.kernel_init(name)(rngs.params(), shape)))

  def _kernel_shapes(self, channels: int) -> dict:
    return layers.conv_kernel_shapes(channels, self.out_features, self.kernel_size, self.separable)

  def __call__(self, x):
    kernels = {n: getattr(self, n)[...] for n in self._kernel_shapes(1)}
    kept = self._kept()
    if kept is None:
      y = layers.conv_op(self._masked(x), kernels, self.geometry, layers.xla_conv)
    elif kept.shape[0] == 0:  # every input dropped: the operation is removed
      return layers.removed_conv_output(x, self._kernel_shapes(x.shape[-1]), self.geometry)
    else:
      y = layers.conv_op(jnp.take(x, kept, axis=-1), kernels, self.geometry, layers.xla_conv)
    self._set_costs(layers.conv_input_costs(self._kernel_shapes(1), y.shape))
    return y


class SearchableDense(_Searchable):
  """``pgnas_jax.SearchableDense`` for NNX: a dense layer whose input features the search
  keeps or drops; kernel stored ``[1, 1, inputs, outputs]``, bias in a child ``bias``."""

  def __init__(
    self, in_features: int, out_features: int, groups=None, use_bias: bool = True, *, rngs: nnx.Rngs
  ):
    self._declare_groups(groups, in_features, 'features')
    self.out_features = out_features
    shape = (1, 1, in_features, out_features)
    self.kernel = nnx.Param(layers.dense_init(rngs.params(), shape))
    self.bias = _Bias(out_features) if use_bias else None

  def __call__(self, x):
    kept = self._kept()
    inputs = self._masked(x) if kept is None else jnp.take(x, kept, axis=-1)
    y = inputs @ self.kernel[0, 0].astype(x.dtype)
    self._set_costs(layers.dense_input_costs(self.out_features, x.shape))
    return y if self.bias is None else self.bias(y)


class SearchableAttention(_Searchable):
  """``pgnas_jax.SearchableAttention`` for NNX: multi-head self-attention over tokens whose
  heads the search keeps or drops whole; same kernels, bias child and costs."""

  def __init__(
    self,
    in_features: int,
    num_heads: int,
    head_dim: int,
    out_features: int | None = None,
    *,
    rngs: nnx.Rngs,
  ):
    self._declare_groups(None, num_heads, 'heads')
    out_features = out_features or in_features
    self.head_shapes = layers.attention_kernel_shapes(in_features, 1, head_dim, out_features)
    shapes = layers.attention_kernel_shapes(in_features, num_heads, head_dim, out_features)
    for name, shape in shapes.items():
      setattr(self, name, nnx.Param(layers.attention_init(name)(rngs.params(), shape)))
    self.bias = _Bias(out_features)

  def __call__(self, x):
    kernels = {n: getattr(self, n)[...] for n in self.head_shapes}
    kept = self._kept()
    if kept is not None and kept.shape[0] == 0:  # every head dropped: the layer is removed
      y = jnp.zeros(x.shape[:-1] + (self.bias.bias.shape[0],), x.dtype)
    else:  # a pruned network's kernels hold its kept heads only
      y = layers.attend(x, kernels, self._keep() if kept is None else None)
    self._set_costs(layers.attention_head_costs(self.head_shapes, x.shape[1]))
    return self.bias(y)


class _Bias(nnx.Module):
  def __init__(self, features: int):
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))

  def __call__(self, y):
    return y + self.bias[...].astype(y.dtype)


class Conv(nnx.Module):
  """``pgnas_jax.Conv`` for NNX: a plain conv (no bias, SAME padding) recording its MACs."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int = 3,
    strides: int = 1,
    *,
    rngs: nnx.Rngs,
  ):
    shape = (kernel_size, kernel_size, in_features, out_features)
    self.kernel = nnx.Param(layers.conv_init(rngs.params(), shape))
    self.strides = strides
    self.macs = FixedMacs(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    kernel = self.kernel[...]
    y = layers.xla_conv(x, kernel.astype(x.dtype), self.strides, 1, 1)
    self.macs.set_value(jnp.array(layers.layer_macs(y.shape, kernel.shape), jnp.int32))
    return y


class Dense(nnx.Module):
  """``pgnas_jax.Dense`` for NNX: a dense layer (with bias) recording its MACs (at every
  position of ``[batch, ..., features]``)."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(in_features, out_features, rngs=rngs)
    self.macs = FixedMacs(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    y = self.linear(x)
    self.macs.set_value(jnp.array(layers.layer_macs(y.shape, self.linear.kernel.shape), jnp.int32))
    return y


def batch_norm(num_features: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """The BatchNorm of ``pgnas_jax.batch_norm`` (momentum 0.9, epsilon 1e-5) for NNX; call it
  with ``use_running_average=not train``."""
  return nnx.BatchNorm(num_features, momentum=0.9, epsilon=1e-5, rngs=rngs)
