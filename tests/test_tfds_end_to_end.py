"""The CIFAR and ImageNet configs end to end through tfds' mock data (no files, no
TensorFlow), each at a tiny size."""

import json
import math

import pytest
import tensorflow_datasets as tfds
import tiny

from pgnas_jax import config as config_lib
from pgnas_jax import pipeline

# a tiny member of each config's family, and an image size ImageNet's mock images are cut to
TINY_MODELS = {
  'cifar10_m': {
    'model.shake_shake.stem_width': 4,
    'model.shake_shake.widths': (4, 8),
    'model.shake_shake.blocks_per_stage': 1,
  },
  'imagenet_d121': {
    'data.image_size': 32,
    'model.densenet.blocks': (1, 1),
    'model.densenet.stem_width': 8,
    'model.densenet.growth_rate': 4,
    'model.densenet.bottleneck_width': 8,
  },
}
SHORT_RUN = {
  'train.batch_size': 8,
  'train.num_steps': 4,
  'train.log_every_steps': 2,
  'data.validation_size': 16,
  'search.num_candidates': 4,
  'search.chunk_size': 4,
  'search.eval_batch_size': 16,
}


@pytest.mark.parametrize(
  'name, cutout',
  [pytest.param('cifar10_m', 16, marks=pytest.mark.long(19)), ('imagenet_d121', 0)],
)
def test_config_end_to_end_on_mock_data(tmp_path, name, cutout):
  c = config_lib.set_fields(tiny.config_file(name).get_config(), {**TINY_MODELS[name], **SHORT_RUN})
  with tfds.testing.mock_data(num_examples=48):
    arch = pipeline.run(c, str(tmp_path)).arch
  assert (tmp_path / 'report.md').exists()
  metrics = tiny.metrics(tmp_path)
  assert [m['step'] for m in metrics] == [2, 4]
  assert all(math.isfinite(m['loss']) for m in metrics)
  assert len(tiny.candidates(tmp_path)) == 4 and 0.0 <= arch['test_acc'] <= 1.0
  assert json.loads((tmp_path / 'config.json').read_text())['data']['cutout'] == cutout
