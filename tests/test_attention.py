"""``SearchableAttention`` (a head kept or dropped whole) and the vision transformer example
searched end to end (docs/library.md)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

import pgnas_jax
from examples import tiny_vit
from pgnas_jax import export, layers
from pgnas_jax import space as space_lib

TOKENS, FEATURES, HEADS, HEAD_DIM, OUT = 5, 8, 3, 4, 6


def _layer():
  x = jax.random.normal(jax.random.key(0), (4, TOKENS, FEATURES))
  layer = pgnas_jax.SearchableAttention(HEADS, HEAD_DIM, OUT)
  variables = layer.init(jax.random.key(1), x)
  bias = {'bias': {'bias': jax.random.normal(jax.random.key(2), (OUT,))}}
  return layer, {**variables, 'params': {**variables['params'], **bias}}, x


def test_attention_with_every_head_is_flax_multi_head_attention():
  layer, variables, x = _layer()
  p = variables['params']
  reference = nn.MultiHeadDotProductAttention(
    num_heads=HEADS, qkv_features=HEADS * HEAD_DIM, out_features=OUT, use_bias=False
  )
  weights = {n: {'kernel': p[n][0]} for n in ('query', 'key', 'value')}
  weights['out'] = {'kernel': jnp.transpose(p['out'][0], (1, 0, 2))}  # [heads, head_dim, out]
  expected = reference.apply({'params': weights}, x) + p['bias']['bias']
  np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('keep', [(1.0, 0.0, 1.0), (0.0, 1.0, 0.0), (0.0, 0.0, 0.0)])
def test_a_dropped_head_is_a_removed_head(keep):
  layer, variables, x = _layer()
  keep = jnp.array(keep)
  masked = layer.apply({**variables, 'masks': {'group0': keep}}, x)
  kept = np.flatnonzero(keep).astype(np.int32)
  pruned = export.pruned_variables(
    {**variables, 'batch_stats': {}}, space_lib.from_variables(variables), {'group0': keep}
  )
  np.testing.assert_allclose(layer.apply(pruned, x), masked, rtol=1e-5, atol=1e-6)
  assert pruned['params']['query'].shape == (1, FEATURES, len(kept), HEAD_DIM)
  # the same head zeroed in the kernels
  zeroed = layers.mask_params(variables['params'], variables['masks'], {'group0': keep})
  np.testing.assert_allclose(layer.apply({'params': zeroed}, x), masked, rtol=1e-5, atol=1e-6)
  if not kept.size:  # every head dropped: the bias alone
    np.testing.assert_array_equal(
      masked, jnp.broadcast_to(variables['params']['bias']['bias'], masked.shape)
    )


def test_per_example_head_masks_mask_each_example_on_its_own():
  layer, variables, x = _layer()
  keeps = jax.random.bernoulli(jax.random.key(3), 0.5, (4, HEADS)).astype(jnp.float32)
  together = layer.apply({**variables, 'masks': {'group0': keeps}}, x)
  for i in range(4):
    alone = layer.apply({**variables, 'masks': {'group0': keeps[i]}}, x[i : i + 1])
    np.testing.assert_allclose(together[i : i + 1], alone, rtol=1e-5, atol=1e-6)


def _dot_macs(fn, *args) -> int:
  """Multiply-accumulates of every dot_general ``fn`` traces, from its jaxpr."""
  total = 0
  for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in contracting]))
  return total


def test_a_head_costs_its_kernel_slices_and_its_attention():
  layer, variables, x = _layer()
  params, macs = np.asarray(variables['channel_costs']['group0'])
  one = x[:1]
  full = _dot_macs(lambda v: layer.apply(v, one), variables)
  less = {'group0': jnp.array([1.0, 1.0, 0.0])}
  pruned = export.pruned_variables(
    {**variables, 'batch_stats': {}}, space_lib.from_variables(variables), less
  )
  assert full - _dot_macs(lambda v: layer.apply(v, one), pruned) == macs
  assert (
    space_lib.count_params(variables['params']) - space_lib.count_params(pruned['params']) == params
  )


def test_vit_example_is_searched_end_to_end_and_its_pruned_and_compact_weights_run(tmp_path):
  config = tiny.default_config({**tiny.CUSTOM_RUN, 'export.latency': True})
  data = tiny.small_arrays()
  module = tiny_vit.TinyViT(num_classes=10, width=8, depth=1, num_heads=2)
  arch = pgnas_jax.search_network(module, data, config, str(tmp_path)).arch
  assert set(arch['kept_channels']) == {'block0_attention/group0', 'block0_mlp_out/group0'}
  saved = json.loads((tmp_path / 'config.json').read_text())['model']['custom']
  assert saved == {
    'module': 'examples.tiny_vit:TinyViT',
    'kwargs': '{"width": 8, "depth": 1, "num_heads": 2}',
  }
  # the input-sliced pruned weights give the winner's test accuracy in the module itself;
  # its compact network, the masked module's logits, and its latency is measured
  tiny.check_pruned_winner(module, data, tmp_path, arch)
  tiny.check_compact_winner(module, data, tmp_path, arch, latency=True)
