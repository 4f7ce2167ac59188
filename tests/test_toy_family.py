"""A family added as a contributor would add one: its module and its config fields in its
own file (this one) and one registration line, and the whole main job runs on it: config,
training, search, the compact export (derived from its traced program: a family writes no
builder), and the export command's restore."""

import json

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

from pgnas_jax import compact as compact_lib
from pgnas_jax import layers, pipeline, supernets
from pgnas_jax import trained as trained_lib
from pgnas_jax import config as config_lib
from pgnas_jax.compact import candidate
from pgnas_jax.schema import POSITIVE, Field


class ToyNet(nn.Module):
  """A stem, one searchable conv over its channels, pooling and a classifier."""

  num_classes: int
  width: int = 6

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(layers.Conv(self.width, 3, name='stem')(x))
    x = nn.relu(layers.SearchableConv(self.width, 3, name='conv')(x))
    return layers.Dense(self.num_classes, name='head')(jnp.mean(x, axis=(1, 2)))


FIELDS = (Field('width', 6, 'channels of the stem and the searchable conv', check=POSITIVE),)


@pytest.fixture
def toy_family(monkeypatch):
  monkeypatch.setattr(supernets, 'FAMILIES', dict(supernets.FAMILIES))
  supernets.register('toy', supernets.Family(ToyNet, FIELDS))  # the one line


def test_a_registered_family_is_configured_searched_and_exported(toy_family, tmp_path):
  config = tiny.config({'model.family': 'toy', 'search.num_candidates': 6})
  assert config.model.toy.width == 6 and config_lib.validate(config) is None
  config.model.toy.width = 0
  with pytest.raises(config_lib.ConfigError, match=r'model\.toy\.width'):
    config_lib.validate(config)
  config.model.toy.width = 5
  result = pipeline.run(config, str(tmp_path))
  arch = result.arch
  assert json.loads((tmp_path / 'config.json').read_text())['model']['toy'] == {'width': 5}
  assert len(result.records) == 6 and arch['index'] == result.winner['index']
  # the compact network: as many numbers as its kept channels need, the masked logits
  kept = len(arch['kept_channels']['conv/group0'])
  stem, conv, head = 9 * 1 * kept, 9 * kept * 5, 5 * 10 + 10
  assert arch['compact_params'] == (stem + conv + head if kept else 10)  # else: the logits
  described = candidate.from_workdir(str(tmp_path), arch['index'], measure=False)
  assert described['compact_params'] == arch['compact_params']
  run = trained_lib.restore(str(tmp_path), config)
  mask = run.mask(arch['index'])
  net = compact_lib.build(run.model, run.state.variables, mask, (28, 28, 1))
  images = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(np.float32)
  masked = run.model.apply({**run.state.variables, 'masks': mask}, images)
  np.testing.assert_allclose(compact_lib.apply(net, images), masked, rtol=1e-4, atol=1e-5)
