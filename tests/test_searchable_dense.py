"""``SearchableDense`` (issue 31, dense layers): the search drops input features of a dense
layer as it drops a conv's input channels. Its masked output equals its pruned output, on
feature vectors and on tokens; its cost is what the pruned layer holds and computes; a module
whose only searchable layer is dense (an MLP's hidden units) is searched end to end, and the
winner's pruned weights give its test accuracy in the module itself."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

import pgnas_jax
from pgnas_jax import export, layers
from pgnas_jax import space as space_lib


class MLP(nn.Module):
  """Flattened images, a dense layer to ``hidden`` units and ReLU, then a searchable dense
  layer that reads them in two groups (of 8 and the rest) to the classes."""

  num_classes: int = 10
  hidden: int = 24

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = pgnas_jax.Dense(self.hidden)(x.reshape(x.shape[0], -1))
    groups = (8, self.hidden - 8)
    return pgnas_jax.SearchableDense(self.num_classes, groups=groups)(jax.nn.relu(x))


class TokenMixer(nn.Module):
  """Tokens ``[batch, 6, 12]``: a searchable dense layer per token (an MLP block's second
  layer), then the mean over tokens."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    tokens = x.reshape(x.shape[0], 6, -1)
    return pgnas_jax.SearchableDense(5, use_bias=False)(tokens).mean(axis=1)


def _mask(space, seed: int):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda t: (rng.random(t.shape) < 0.6).astype(np.float32), space.template)


@pytest.mark.parametrize('module, shape', [(MLP(), (3, 8, 9)), (TokenMixer(), (3, 6, 12))])
def test_masked_output_equals_pruned_output_and_costs_are_what_it_holds(module, shape):
  images = jax.random.normal(jax.random.key(0), shape)
  variables = module.init({'params': jax.random.key(1)}, images)
  space = space_lib.from_variables(variables)
  for seed in range(4):
    mask = _mask(space, seed)
    masked = module.apply({**variables, layers.MASKS: mask}, images)
    pruned = export.pruned_variables({**variables, 'batch_stats': {}}, space, mask)
    out = module.apply(
      {'params': pruned['params'], layers.ARCHITECTURE: pruned[layers.ARCHITECTURE]}, images
    )
    np.testing.assert_allclose(np.asarray(out), np.asarray(masked), rtol=1e-5, atol=1e-6)
    params, macs = space_lib.costs(space, mask)
    assert params == space_lib.count_params(pruned['params'])
    kept = int(space_lib.kept_counts(mask).sum())
    positions = 6 if isinstance(module, TokenMixer) else 1
    outputs = 5 if isinstance(module, TokenMixer) else 10
    assert macs == space.fixed_macs + positions * kept * outputs


def test_training_masks_are_per_example_over_tokens():
  """A training mask per example ``[batch, features]`` drops that example's features in
  every token; another example's are untouched."""
  module = TokenMixer()
  images = jax.random.normal(jax.random.key(0), (2, 6, 12))
  variables = module.init({'params': jax.random.key(1)}, images)
  keep = jnp.ones((2, 12)).at[0, :6].set(0.0)
  out = module.apply({**variables, layers.MASKS: {'SearchableDense_0': {'group0': keep}}}, images)
  first = module.apply(
    {**variables, layers.MASKS: {'SearchableDense_0': {'group0': keep[0]}}}, images[:1]
  )
  np.testing.assert_allclose(np.asarray(out[:1]), np.asarray(first), rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(out[1:]), np.asarray(module.apply(variables, images[1:])), rtol=1e-6
  )


def test_a_module_searched_on_its_dense_layer_alone(tmp_path):
  rng = np.random.default_rng(0)
  data = pgnas_jax.from_arrays(
    rng.integers(0, 256, (300, 8, 9), np.uint8),
    rng.integers(0, 10, 300),
    rng.integers(0, 256, (100, 8, 9), np.uint8),
    rng.integers(0, 10, 100),
    num_classes=10,
    validation_size=100,
  )
  config = tiny.default_config(
    {
      'train.num_steps': 6,
      'train.batch_size': 32,
      'search.num_candidates': 4,
      'search.chunk_size': 4,
      'search.eval_batch_size': 100,
      'export.latency': False,
    }
  )
  module = MLP()
  arch = pgnas_jax.search_network(module, data, config, str(tmp_path)).arch
  assert set(arch['kept_channels']) == {'SearchableDense_0/group0', 'SearchableDense_0/group1'}
  pruned = export.load_weights(str(tmp_path / 'search' / 'winner_weights.msgpack'))
  batch = next(data.eval_batches(data.test, 100))
  logits = module.apply(pruned, batch['images'], train=False)
  accuracy = float(np.mean(np.argmax(logits, -1) == batch['labels']))
  assert accuracy == pytest.approx(arch['test_acc'], abs=1e-6)
