"""Flax NNX networks (docs/library.md): ``pgnas_jax.nnx``'s layers compute, cost and prune
exactly as the Linen ones, ``from_nnx`` runs an NNX network as the module the pipeline
searches, and what it cannot search is refused in one line."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from flax import nnx, traverse_util

import pgnas_jax
from examples import tiny_cnn_nnx
from pgnas_jax import config as config_lib
from pgnas_jax import errors, export, masks, space as space_lib
from pgnas_jax.supernets import custom

TINY = tiny.CUSTOM_RUN


class LinenNet(nn.Module):
  """Every layer kind of ``pgnas_jax``, named as ``NnxNet``'s attributes."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = pgnas_jax.Conv(6, 3, strides=2, name='stem')(x)
    x = nn.relu(pgnas_jax.batch_norm(train, name='stem_bn')(x))
    x = pgnas_jax.SearchableConv(8, 3, groups=(2, 4), name='grouped')(x)
    x = pgnas_jax.SearchableConv(8, 5, strides=2, dilation=2, separable=True, name='sep')(x)
    x = nn.relu(pgnas_jax.batch_norm(train, name='sep_bn')(x))
    x = pgnas_jax.SearchableConv(8, 3, dilation=2, name='dilated')(x)
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    tokens = nn.relu(pgnas_jax.SearchableDense(12, name='mlp_in')(tokens))
    tokens = pgnas_jax.SearchableDense(8, groups=(5, 7), use_bias=False, name='mlp_out')(tokens)
    tokens = tokens + pgnas_jax.SearchableAttention(2, 4, name='attention')(tokens)
    return pgnas_jax.Dense(10, name='head')(jnp.mean(tokens, axis=1))


class NnxNet(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    P = pgnas_jax.nnx
    self.stem = P.Conv(3, 6, 3, strides=2, rngs=rngs)
    self.stem_bn = P.batch_norm(6, rngs=rngs)
    self.grouped = P.SearchableConv(6, 8, 3, groups=(2, 4), rngs=rngs)
    self.sep = P.SearchableConv(8, 8, 5, strides=2, dilation=2, separable=True, rngs=rngs)
    self.sep_bn = P.batch_norm(8, rngs=rngs)
    self.dilated = P.SearchableConv(8, 8, 3, dilation=2, rngs=rngs)
    self.mlp_in = P.SearchableDense(8, 12, rngs=rngs)
    self.mlp_out = P.SearchableDense(12, 8, groups=(5, 7), use_bias=False, rngs=rngs)
    self.attention = P.SearchableAttention(8, 2, 4, rngs=rngs)
    self.head = P.Dense(8, 10, rngs=rngs)

  def __call__(self, x, train: bool = False):
    x = nnx.relu(self.stem_bn(self.stem(x), use_running_average=not train))
    x = self.sep(self.grouped(x))
    x = self.dilated(nnx.relu(self.sep_bn(x, use_running_average=not train)))
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    tokens = self.mlp_out(nnx.relu(self.mlp_in(tokens)))
    tokens = tokens + self.attention(tokens)
    return self.head(jnp.mean(tokens, axis=1))


def _pair():
  """(linen, nnx) networks and the NNX one's init variables, with trained-looking batch
  statistics."""
  images = jnp.zeros((2, 16, 16, 3))
  bridged = pgnas_jax.from_nnx(NnxNet)
  variables = bridged.init({'params': jax.random.key(1)}, images)
  stats = jax.tree.map(lambda s: s + 0.3, variables['batch_stats'])
  return LinenNet(), bridged, {**variables, 'batch_stats': stats}


def _shapes(tree):
  return jax.tree.map(jnp.shape, tree)


def test_nnx_layers_declare_the_linen_layers_variables_and_costs():
  linen, _, variables = _pair()
  reference = linen.init({'params': jax.random.key(1)}, jnp.zeros((2, 16, 16, 3)))
  assert set(variables) == set(reference)
  for collection in ('params', 'batch_stats', 'masks'):
    assert _shapes(variables[collection]) == _shapes(reference[collection]), collection
  for collection in ('channel_costs', 'fixed_macs'):  # values: what the layers cost
    jax.tree.map(np.testing.assert_array_equal, variables[collection], reference[collection])
  assert len(jax.tree.leaves(variables['masks'])) == 8  # 2 + 1 + 1 + 1 + 2 + 1 groups


def _random_mask(template, key, per_example=0):
  """A hard mask per group (one per example when ``per_example``), a quarter dropped."""
  leaves, tree = jax.tree.flatten(template)
  keys = jax.random.split(key, len(leaves))
  shape = (lambda c: (per_example, c)) if per_example else (lambda c: (c,))
  drawn = [jax.random.bernoulli(k, 0.75, shape(x.shape[0])).astype(jnp.float32)
           for k, x in zip(keys, leaves)]  # fmt: skip
  return jax.tree.unflatten(tree, drawn)


def test_nnx_network_computes_what_the_linen_one_computes_masked_and_in_training():
  linen, bridged, variables = _pair()
  images = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
  trained = {c: variables[c] for c in ('params', 'batch_stats')}
  # no masks (the super-network), one mask, and per-example masks while training
  for given in ({}, {'masks': _random_mask(variables['masks'], jax.random.key(3))}):
    np.testing.assert_array_equal(
      bridged.apply({**trained, **given}, images), linen.apply({**trained, **given}, images)
    )
  per_example = {**trained, 'masks': _random_mask(variables['masks'], jax.random.key(4), 4)}
  outputs = [
    net.apply(per_example, images, train=True, mutable=['batch_stats']) for net in (bridged, linen)
  ]
  jax.tree.map(np.testing.assert_array_equal, *outputs)
  assert not np.allclose(outputs[0][1]['batch_stats']['sep_bn']['mean'], 0.3)  # they moved


def test_nnx_pruned_network_gives_the_masked_logits_and_a_removed_conv_outputs_zero():
  linen, bridged, variables = _pair()
  trained = {c: variables[c] for c in ('params', 'batch_stats')}
  space = space_lib.from_variables(variables)
  mask = _random_mask(variables['masks'], jax.random.key(5))
  flat = traverse_util.flatten_dict(mask)
  flat[('dilated', 'group0')] = jnp.zeros(8)  # every input of a conv dropped
  flat[('mlp_out', 'group1')] = jnp.ones(7)  # a group kept whole
  flat[('attention', 'group0')] = jnp.array([0.0, 1.0])  # a head dropped
  mask = traverse_util.unflatten_dict(flat)
  pruned = export.pruned_variables(trained, space, mask)
  images = jax.random.normal(jax.random.key(6), (4, 16, 16, 3))
  logits = bridged.apply(pruned, images)
  np.testing.assert_array_equal(logits, linen.apply(pruned, images))
  masked = bridged.apply({**trained, 'masks': mask}, images)
  np.testing.assert_allclose(logits, masked, rtol=1e-5, atol=1e-5)
  assert space_lib.count_params(pruned['params']) == space_lib.costs(space, mask)[0]
  assert sorted(masks.channel_counts(space.template)) == [2, 2, 4, 5, 7, 8, 8, 8]


def test_nnx_network_changing_batch_stats_outside_training_is_an_error():
  _, bridged, variables = _pair()
  trained = {c: variables[c] for c in ('params', 'batch_stats')}
  with pytest.raises(ValueError, match='changed batch_stats/sep_bn/mean'):
    bridged.apply(trained, jnp.ones((2, 16, 16, 3)), train=True)  # batch_stats not mutable


def test_nnx_example_is_searched_end_to_end_and_its_pruned_and_compact_weights_run(tmp_path):
  config, data = tiny.default_config({**TINY, 'export.latency': True}), tiny.small_arrays()
  # a list argument, as JSON gives it: held as a tuple (the module keys compiled functions)
  module = pgnas_jax.from_nnx(tiny_cnn_nnx.SmallVGG, num_classes=10, widths=[4, 6])
  arch = pgnas_jax.search_network(module, data, config, str(tmp_path)).arch
  saved = json.loads((tmp_path / 'config.json').read_text())['model']
  assert saved['custom'] == {
    'module': 'examples.tiny_cnn_nnx:SmallVGG',
    'kwargs': '{"widths": [4, 6]}',
  }
  # the command line rebuilds the same module from config.json
  rebuilt = config_lib.get_config()
  rebuilt.model.custom.update(saved['custom'])
  assert custom.build(rebuilt.model.custom, 10) == module
  # the input-sliced pruned weights give the winner's test accuracy in the module itself;
  # its compact network, the masked module's logits, and its latency is measured
  tiny.check_pruned_winner(module, data, tmp_path, arch)
  tiny.check_compact_winner(module, data, tmp_path, arch, latency=True)
  assert pgnas_jax.search_network(module, data, config, str(tmp_path)).arch == arch


class WithLinear(nnx.Module):
  def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
    self.conv = pgnas_jax.nnx.SearchableConv(1, 4, rngs=rngs)
    self.head = nnx.Linear(4, num_classes, rngs=rngs)

  def __call__(self, x, train: bool = False):
    return self.head(jnp.mean(self.conv(x), axis=(1, 2)))


class NothingSearched(nnx.Module):
  def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
    self.head = pgnas_jax.nnx.Dense(1, num_classes, rngs=rngs)

  def __call__(self, x, train: bool = False):
    return self.head(jnp.mean(x, axis=(1, 2)))


@pytest.mark.parametrize(
  'module, overrides, message',
  [
    (
      tiny_cnn_nnx.SmallVGG(10, (4, 6), rngs=nnx.Rngs(0)),
      {},
      r'search_network takes an NNX network as pgnas_jax.from_nnx\(SmallVGG, \*\*kwargs\)',
    ),
    (
      pgnas_jax.from_nnx(WithLinear, num_classes=10),
      {},
      "WithLinear: layer 'head' holds a kernel the cost model does not count",
    ),
    (
      pgnas_jax.from_nnx(NothingSearched, num_classes=10),
      {},
      'NothingSearched has no pgnas_jax.SearchableConv or SearchableDense',
    ),
    (
      pgnas_jax.from_nnx(tiny_cnn_nnx.SmallVGG, num_classes=10, widths=(4, 6)),
      {'search.bn_recalibration_batches': 2},
      'not available for an NNX network',
    ),
    (
      pgnas_jax.from_nnx(tiny_cnn_nnx.SmallVGG, num_classes=10, widths=(4, 6), channels=3),
      {},
      'SmallVGG fails at init on images of shape',
    ),
  ],
)
def test_an_nnx_network_the_pipeline_cannot_search_is_refused(tmp_path, module, overrides, message):
  config = tiny.default_config({**TINY, **overrides})
  with pytest.raises(errors.ConfigError, match=message):
    pgnas_jax.search_network(module, tiny.small_arrays(), config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_a_config_naming_an_nnx_class_with_unknown_arguments_is_refused():
  config = config_lib.get_config()
  config.model.custom.module = 'examples.tiny_cnn_nnx:SmallVGG'
  config.model.custom.kwargs = '{"depth": 3}'
  with pytest.raises(errors.ConfigError, match='is refused by examples.tiny_cnn_nnx:SmallVGG'):
    custom.build(config.model.custom, 10)
