"""CIFAR-10/100 through tfds' mock data (no files, no TensorFlow), cutout, the CIFAR configs
(end to end in test_tfds_end_to_end.py)."""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tiny

from pgnas_jax import config as config_lib
from pgnas_jax import data as data_lib
from pgnas_jax import errors
from pgnas_jax.data import cifar


def _data(name, validation_size, data_dir=''):
  c = config_lib.get_config()
  c.data.name, c.data.data_dir, c.data.validation_size = name, data_dir, validation_size
  return c.data


@pytest.mark.parametrize('name, classes', [('cifar10', 10), ('cifar100', 100)])
def test_cifar_splits_shapes_and_disjoint_validation(name, classes):
  with tfds.testing.mock_data(num_examples=40):
    raw_images, raw_labels = cifar.load(name, '', 'train')
    dataset = data_lib.load(_data(name, 10))
  assert raw_images.shape == (40, 32, 32, 3) and raw_images.dtype == np.uint8
  assert raw_labels.dtype == np.int32
  assert dataset.num_classes == classes
  assert dataset.train.images.shape == (30, 32, 32, 3) and dataset.train.images.dtype == np.uint8
  assert dataset.validation.images.shape == (10, 32, 32, 3)
  assert dataset.test.images.shape == (40, 32, 32, 3)
  for split in dataset:
    if isinstance(split, data_lib.Split):
      assert split.labels.dtype == np.int32 and split.labels.shape == split.images.shape[:1]
      assert 0 <= split.labels.min() and split.labels.max() < classes
  # together train and validation are the training split, each image exactly once
  key = lambda images: sorted(x.tobytes() for x in images)
  assert key(np.concatenate([dataset.train.images, dataset.validation.images])) == key(raw_images)
  assert not set(key(dataset.train.images)) & set(key(dataset.validation.images))
  assert dataset.mean.shape == dataset.std.shape == (3,)


def test_missing_cifar_says_how_to_get_it(tmp_path):
  with pytest.raises(errors.MissingDataError) as e:
    data_lib.load(_data('cifar10', 10, str(tmp_path)))
  message = str(e.value)
  assert 'tfds build cifar10' in message and f'--config.data.data_dir={tmp_path}' in message
  assert 'internet' in message
  assert list(tmp_path.iterdir()) == []  # nothing written, nothing downloaded


def test_fashion_mnist_path_does_not_import_tfds():
  code = (
    'import sys, pgnas_jax.main, pgnas_jax.data; '
    'assert "tensorflow_datasets" not in sys.modules, "tfds imported"'
  )
  subprocess.run([sys.executable, '-c', code], check=True, cwd=tiny.ROOT)


def _windows(size, h, w, rng):
  """The windows cutout should zero, from the same draws: (top, bottom, left, right)."""
  return [
    (
      max(y - size // 2, 0),
      min(y - size // 2 + size, h),
      max(x - size // 2, 0),
      min(x - size // 2 + size, w),
    )
    for y, x in zip(*rng)
  ]


@pytest.mark.parametrize('size', [16, 5])
def test_cutout_zeroes_one_clipped_window_per_image(size):
  n, h, w = 200, 32, 32
  images = np.random.default_rng(1).uniform(1, 2, (n, h, w, 3)).astype(np.float32)
  draws = np.random.default_rng(7)
  centres = np.stack([draws.integers(0, h, n), draws.integers(0, w, n)], 1)
  out = data_lib.cutout(images, centres, size)
  expected = _windows(size, h, w, centres.T)
  clipped = 0
  for i, (top, bottom, left, right) in enumerate(expected):
    window = np.zeros((h, w), bool)
    window[top:bottom, left:right] = True
    assert (out[i][window] == 0).all()
    np.testing.assert_array_equal(out[i][~window], images[i][~window])
    clipped += (bottom - top, right - left) != (size, size)
  assert 0 < clipped < n  # both whole and border-clipped windows were checked


def test_cutout_applies_to_training_batches_only():
  rng = np.random.default_rng(0)
  split = lambda m: data_lib.Split(
    rng.integers(0, 256, (m, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, m).astype(np.int32)
  )
  dataset = data_lib.Dataset(
    split(64), split(16), split(16), 10, np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
  )
  c = config_lib.get_config().data
  c.pad_crop = 4
  plain = dataset.train_batch(c, 0, 3, 16)['images']
  c.cutout = 16
  cut = dataset.train_batch(c, 0, 3, 16)['images']
  changed = (cut != plain).any(-1)
  assert (cut[changed] == 0).all()
  per_image = changed.sum((1, 2))
  assert (per_image > 0).all() and (per_image <= 16 * 16).all()
  evals = list(dataset.eval_batches(dataset.validation, 16))
  np.testing.assert_array_equal(
    evals[0]['images'], data_lib.normalise(dataset.validation.images, dataset)
  )


@pytest.mark.parametrize(
  'name, family, size, l2, candidates',
  [
    ('cifar10_m', 'shake_shake', (96, 192, 384), 50.0, 1500),
    ('cifar10_mi', 'shake_shake', (160, 320, 640), 150.0, 1500),
    ('cifar100_mi', 'shake_shake', (160, 320, 640), 2500.0, 5000),
    ('cifar10_e', 'enas', 36, 0.1, 1500),
    ('cifar10_ei', 'enas', 72, 0.1, 1500),
  ],
)
def test_cifar_configs_hold_the_papers_setup(name, family, size, l2, candidates):
  module = tiny.config_file(name)
  assert f'python -m pgnas_jax.main --config=configs/{name}.py' in module.__doc__
  c = module.get_config()
  config_lib.validate(c)
  assert c.data.name == name.split('_')[0] and c.model.family == family
  assert (c.model.shake_shake.widths if family == 'shake_shake' else c.model.enas.filters) == size
  assert (c.data.cutout, c.data.pad_crop, c.data.random_flip) == (16, 4, True)
  assert (c.objective.weight_prior_l2, c.search.num_candidates) == (l2, candidates)
  assert (c.drop.tau, c.drop.init_p, c.objective.num_train_effective) == (0.2, 0.1, 5e5)
  assert c.objective.weight_decay == 0.0 and c.data.validation_size == 5000
  expected = (
    (128, 1800.0, 0.01, 'cosine') if family == 'shake_shake' else (144, 630.0, 0.05, 'sgdr')
  )
  assert (
    c.train.batch_size,
    c.train.num_epochs,
    c.train.learning_rate,
    c.train.schedule,
  ) == expected
