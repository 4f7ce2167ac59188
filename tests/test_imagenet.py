"""ImageNet through tfds' mock data (no files, no TensorFlow): streamed splits, crops,
per-process rows, the missing-data message, the ImageNet configs (end to end in
test_tfds_end_to_end.py)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tiny

from pgnas_jax import config as config_lib
from pgnas_jax import data as data_lib
from pgnas_jax import errors
from pgnas_jax.data import crops, imagenet, stream


def _data(validation_size=10, image_size=16, data_dir=''):
  c = config_lib.get_config()
  c.data.name, c.data.data_dir = 'imagenet2012', data_dir
  c.data.validation_size, c.data.image_size = validation_size, image_size
  return c.data


@pytest.fixture(scope='module')
def mock_imagenet():
  """40 mock images of random sizes; train and validation splits hold the same images. The
  mock sources keep working once the context is left (so other tests see tfds unmocked)."""
  with tfds.testing.mock_data(num_examples=40):
    return data_lib.load(_data())


@pytest.mark.xdist_group('mock_imagenet')  # shares a module fixture
def test_splits_sizes_and_disjoint_validation(mock_imagenet):
  d = mock_imagenet
  assert isinstance(d, stream.Streamed) and not d.in_memory
  assert (len(d.train), len(d.validation), len(d.test)) == (30, 10, 40)
  assert d.num_classes == 1000 and d.image_shape == (16, 16, 3)
  assert d.train.source is d.validation.source and d.test.source is not d.train.source
  assert not set(d.train.index) & set(d.validation.index)
  assert sorted(np.concatenate([d.train.index, d.validation.index])) == list(range(40))
  np.testing.assert_allclose(d.mean, imagenet.MEAN)


@pytest.mark.xdist_group('mock_imagenet')  # shares a module fixture
def test_train_and_eval_batches_shapes_dtypes(mock_imagenet):
  d = mock_imagenet
  batch = d.train_batch(_data(), 0, 0, 8)
  assert batch['images'].shape == (8, 16, 16, 3) and batch['images'].dtype == np.float32
  assert batch['labels'].shape == (8,) and batch['labels'].dtype == np.int32
  assert 0 <= batch['labels'].min() and batch['labels'].max() < 1000
  batches = list(d.eval_batches(d.validation, 4))
  assert [b['images'].shape for b in batches] == [(4, 16, 16, 3)] * 3
  np.testing.assert_array_equal(
    np.concatenate([b['weights'] for b in batches]), [1.0] * 10 + [0.0] * 2
  )
  assert (batches[-1]['images'][2:] == 0).all() and (batches[-1]['labels'][2:] == 0).all()
  for i in (0, 5):  # normalised with ImageNet's statistics
    expected = (crops.centre_crop(d.validation[i][0], 16) / 255.0 - imagenet.MEAN) / imagenet.STD
    np.testing.assert_allclose(batches[i // 4]['images'][i % 4], expected, rtol=1e-5, atol=1e-5)
  labels = np.concatenate([b['labels'] for b in batches])[:10]
  np.testing.assert_array_equal(labels, [d.validation[i][1] for i in range(10)])


@pytest.mark.xdist_group('mock_imagenet')  # shares a module fixture
def test_training_order_follows_the_seed(mock_imagenet):
  d = mock_imagenet
  a = [d.train_batch(_data(), 0, s, 8) for s in range(3)]
  b = [d.train_batch(_data(), 0, s, 8) for s in range(3)]
  c = [d.train_batch(_data(), 1, s, 8) for s in range(3)]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['images'], y['images'])
    np.testing.assert_array_equal(x['labels'], y['labels'])
  assert any((x['images'] != z['images']).any() for x, z in zip(a, c))


@pytest.mark.parametrize('count', [2, 4])
@pytest.mark.xdist_group('mock_imagenet')  # shares a module fixture
def test_process_rows_concatenate_to_the_one_process_batch(mock_imagenet, count):
  d = mock_imagenet
  whole = d.train_batch(_data(), 3, 5, 8)
  parts = [d.train_batch(_data(), 3, 5, 8, i, count) for i in range(count)]
  assert all(p['images'].shape[0] == 8 // count for p in parts)
  for key in ('images', 'labels'):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  whole_eval = list(d.eval_batches(d.test, 8))
  parts_eval = [list(d.eval_batches(d.test, 8, i, count)) for i in range(count)]
  for j, batch in enumerate(whole_eval):
    for key in ('images', 'labels', 'weights'):
      np.testing.assert_array_equal(np.concatenate([p[j][key] for p in parts_eval]), batch[key])


@pytest.mark.xdist_group('mock_imagenet')  # shares a module fixture
def test_eval_preprocessing_is_deterministic(mock_imagenet):
  d = mock_imagenet
  first, second = (list(d.eval_batches(d.validation, 4)) for _ in range(2))
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a['images'], b['images'])


def test_centre_crop_is_the_centre_of_the_resized_image():
  rng = np.random.default_rng(0)
  # resizing to a shorter side of 256 leaves these images as they are: the crop is a slice
  for h, w in ((256, 256), (300, 256), (256, 312)):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    top, left = (h - 224) // 2, (w - 224) // 2
    np.testing.assert_array_equal(
      crops.centre_crop(image, 224), image[top : top + 224, left : left + 224]
    )
  # a larger image is shrunk first: constant columns stay constant, centred
  ramp = np.broadcast_to((np.arange(512) // 2).astype(np.uint8)[None, :, None], (512, 512, 3))
  out = crops.centre_crop(np.ascontiguousarray(ramp), 112)
  assert out.shape == (112, 112, 3) and out.dtype == np.uint8
  # shorter side 128, so the crop is the centre 448 of the 512 columns, 4 per output column
  assert (out == out[:1]).all()
  np.testing.assert_allclose(out[0, :, 0], (32 + 4 * np.arange(112) + 1.5) / 2, atol=1)


def test_random_boxes_cover_the_documented_range():
  rng = np.random.default_rng(0)
  areas, aspects = [], []
  for _ in range(2000):
    left, top, right, bottom = crops.random_box(350, 400, rng)
    assert 0 <= left < right <= 400 and 0 <= top < bottom <= 350
    areas.append((right - left) * (bottom - top) / (350 * 400))
    aspects.append((right - left) / (bottom - top))
  assert min(areas) >= 0.079 and max(areas) <= 1.0 and max(areas) > 0.9
  assert min(aspects) >= 0.74 and max(aspects) <= 1.35
  assert min(aspects) < 0.8 and max(aspects) > 1.25 and min(areas) < 0.1
  # an image too elongated for any draw: the largest centred box of allowed aspect ratio
  assert crops.random_box(1000, 10, rng) == (0, 493, 10, 506)


def test_random_resized_crop_reads_its_box():
  # pixel value = column index, so the crop's values show which columns it read
  image = np.ascontiguousarray(
    np.broadcast_to(np.arange(200, dtype=np.uint8)[None, :, None], (150, 200, 3))
  )
  for seed in range(20):
    left, _, right, _ = crops.random_box(150, 200, np.random.default_rng(seed))
    out = crops.random_resized_crop(image, 24, np.random.default_rng(seed))
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    assert left - 1 <= out.min() and out.max() <= right


def test_missing_imagenet_says_how_to_prepare_it(tmp_path):
  with pytest.raises(errors.MissingDataError) as e:
    data_lib.load(_data(data_dir=str(tmp_path)))
  message = str(e.value)
  assert 'tfds build imagenet2012 --manual_dir=MANUAL_DIR --file_format=array_record' in message
  assert 'ILSVRC2012_img_train.tar' in message and f'--config.data.data_dir={tmp_path}' in message
  assert list(tmp_path.iterdir()) == []


def test_imagenet_refuses_cifar_augmentations():
  c = tiny.config_file('imagenet_r50').get_config()
  c.data.cutout = 16
  with pytest.raises(errors.ConfigError, match='data.cutout=16 do not fit together'):
    config_lib.validate(c)
  c = tiny.config_file('imagenet_r50').get_config()
  c.data.image_size = 0
  with pytest.raises(errors.ConfigError, match='data.image_size=0 is out of range'):
    config_lib.validate(c)


@pytest.mark.parametrize(
  'name, family, l2, batch, epochs, step_epochs',
  [
    ('imagenet_r50', 'resnet', 80.0, 256, 90.0, (30, 60)),
    ('imagenet_d121', 'densenet', 100.0, 300, 180.0, (90, 140, 160)),
  ],
)
def test_imagenet_configs_hold_the_papers_setup(name, family, l2, batch, epochs, step_epochs):
  module = tiny.config_file(name)
  assert f'python -m pgnas_jax.main --config=configs/{name}.py' in module.__doc__
  c = module.get_config()
  config_lib.validate(c)
  assert (c.data.name, c.model.family, c.data.image_size) == ('imagenet2012', family, 224)
  assert c.data.validation_size == 50000 and c.search.num_candidates == 1500
  assert (c.objective.weight_prior_l2, c.objective.num_train_effective) == (l2, 1.2e6)
  assert (c.drop.tau, c.drop.init_p, c.objective.weight_decay) == (0.2, 0.1, 0.0)
  assert (c.train.batch_size, c.train.num_epochs, c.train.learning_rate) == (batch, epochs, 0.1)
  assert (c.train.schedule, tuple(c.train.step_epochs), c.train.step_factor) == (
    'step',
    step_epochs,
    10.0,
  )
  assert (c.train.momentum, c.train.nesterov) == (0.9, True)


def test_synthetic_imagenet_is_read_as_prepared_imagenet(tmp_path):
  # benchmarks/synthetic_imagenet.py writes tfds' own array_record form: the real reader
  # opens it, decodes its JPEGs of varied sizes and crops them as the real data set's
  from benchmarks import synthetic_imagenet

  folder = synthetic_imagenet.write(str(tmp_path), train=24, validation=8)
  assert folder.endswith('imagenet2012/5.1.0')
  d = data_lib.load(_data(validation_size=4, image_size=32, data_dir=str(tmp_path)))
  assert (len(d.train), len(d.validation), len(d.test), d.num_classes) == (20, 4, 8, 1000)
  shapes = {d.test[i][0].shape for i in range(8)}
  assert len(shapes) == 8 and all(s[2] == 3 for s in shapes)  # every picture its own size
  assert [d.test[i][1] for i in range(8)] == list(range(8))
  batch = d.train_batch(_data(image_size=32), 0, 0, 8)
  assert batch['images'].shape == (8, 32, 32, 3) and np.isfinite(batch['images']).all()
  expected = (crops.centre_crop(d.test[3][0], 32) / 255.0 - imagenet.MEAN) / imagenet.STD
  test_batch = next(iter(d.eval_batches(d.test, 8)))
  np.testing.assert_allclose(test_batch['images'][3], expected, rtol=1e-5, atol=1e-5)
