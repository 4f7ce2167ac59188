"""Your own data (.npz files, any tfds data set by name) and the checks every data set passes
before training: each bad input is one line naming the file or split and the fix, exit
status 2, and a workdir holding only what the user put there."""

import gzip
import io
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import tiny
import tensorflow_datasets as tfds

from pgnas_jax import config as config_lib
from pgnas_jax import data as data_lib
from pgnas_jax import errors, pipeline
from pgnas_jax.data import checks, npz, stream, tfds_source

FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


def _arrays(n_train=60, n_test=20, classes=3, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  return {
    'x_train': rng.integers(0, 256, (n_train, 8, 8), dtype=np.uint8),
    'y_train': np.arange(n_train) % classes,
    'x_test': rng.integers(0, 256, (n_test, 8, 8), dtype=np.uint8),
    'y_test': np.arange(n_test) % classes,
  }


def _save(path, arrays) -> str:
  with open(path, 'wb') as f:
    np.savez(f, **arrays)
  return str(path)


SMALL_RUN = {  # a tiny run, so a case that is wrongly not refused costs seconds
  **tiny.NET,
  'train.num_steps': 2,
  'train.log_every_steps': 2,
  'search.num_candidates': 4,
  'search.chunk_size': 4,
  'search.eval_batch_size': 100,
}


def _npz_config(path, validation_size=10, num_classes=0):
  c = tiny.default_config(SMALL_RUN)
  c.data.name, c.data.path = 'npz', str(path)
  c.data.validation_size, c.data.num_classes = validation_size, num_classes
  return c


def _label(a, split, i, value):
  a[f'y_{split}'] = a[f'y_{split}'].copy()
  a[f'y_{split}'][i] = value


def _nan(a):
  a['x_train'] = a['x_train'].astype(np.float32)
  a['x_train'][4, 2, 3] = np.nan


BAD_NPZ = [
  (
    'missing key',
    lambda a: a.pop('y_test'),
    "has no key 'y_test' (it holds x_train, y_train, x_test): write it with numpy.savez(",
  ),
  (
    'lengths',
    lambda a: a.update(y_train=a['y_train'][:59]),
    (
      "key 'y_train' holds 59 labels but {path}, key 'x_train' holds 60 images: give every "
      'image one label'
    ),
  ),
  (
    'test label too large',
    lambda a: _label(a, 'test', 5, 7),
    (
      "{path}, key 'y_test': label 7 of example 5 is outside [0, 3) (1 such labels); fix the "
      'arrays and save'
    ),
  ),
  (
    'negative training label',
    lambda a: _label(a, 'train', 2, -1),
    "{path}, key 'y_train': label -1 of example 2 is outside [0, 3)",
  ),
  (
    'non-finite pixels',
    _nan,
    (
      "{path}, key 'x_train': 1 pixels are NaN or infinite (the first in image 4): replace "
      'them by finite values'
    ),
  ),
  (
    'test shape',
    lambda a: a.update(x_test=np.zeros((20, 9, 8), np.uint8)),
    (
      "{path}, key 'x_test' holds images of 9x8x1 but the training images are 8x8x1: every "
      "split needs the training images' shape"
    ),
  ),
  (
    'flat images',
    lambda a: a.update(x_train=a['x_train'].reshape(60, 64)),
    (
      "{path}, key 'x_train' holds an array of shape (60, 64): images must be [n, height, "
      'width] or [n, height, width, channels]'
    ),
  ),
  (
    'float labels',
    lambda a: a.update(y_train=a['y_train'].astype(np.float32)),
    (
      "{path}, key 'y_train' holds float32 values of shape (60,): labels must be one whole "
      'number per image'
    ),
  ),
  (
    'int64 images',
    lambda a: a.update(x_train=a['x_train'].astype(np.int64)),
    "{path}, key 'x_train' holds int64 values: images must be uint8 (0 to 255) or float",
  ),
  (
    'constant images',
    lambda a: a.update(x_train=np.full((60, 8, 8), 7, np.uint8)),
    "{path}, key 'x_train': channel 0 of the training images is the same value everywhere",
  ),
]


@pytest.mark.parametrize('num_classes', [3, 0], ids=['classes_set', 'classes_inferred'])
def test_labels_beyond_int32_are_refused_not_wrapped(tmp_path, capsys, num_classes):
  """A label of 2**32 + 1 would train as class 1 once cast to int32: labels are checked in
  the type they were stored in, whether the number of classes is set or inferred."""
  arrays = _arrays()
  arrays['y_train'] = arrays['y_train'].astype(np.uint64)
  arrays['y_train'][5] = 2**32 + 1
  path = _save(tmp_path / 'mine.npz', arrays)
  err = tiny.refused(_npz_config(path, num_classes=num_classes), tmp_path / 'workdir', capsys)
  assert f"{path}, key 'y_train': label 4294967297 of example 5 is larger than 2147483647" in err


def test_an_npz_header_claiming_more_than_memory_is_one_line(tmp_path, capsys):
  arrays = _arrays()
  path = _save(tmp_path / 'mine.npz', arrays)
  header = io.BytesIO()  # x_train claims 2**44 bytes (16 TiB) and holds one
  np.lib.format.write_array_header_1_0(
    header, {'descr': '|u1', 'fortran_order': False, 'shape': (2**44,)}
  )
  with zipfile.ZipFile(path, 'w') as f:
    f.writestr('x_train.npy', header.getvalue() + b'\0')
    for key in ('y_train', 'x_test', 'y_test'):
      member = io.BytesIO()
      np.save(member, arrays[key])
      f.writestr(f'{key}.npy', member.getvalue())
  err = tiny.refused(_npz_config(path), tmp_path / 'workdir', capsys)
  assert f'{path} holds arrays larger than this machine can hold in memory' in err


def test_float_pixels_of_any_finite_scale_are_normalised(tmp_path):
  """Pixels scaled by 1e20 overflowed float32 statistics: every image became 0."""
  arrays = _arrays()
  for split in ('train', 'test'):
    arrays[f'x_{split}'] = arrays[f'x_{split}'].astype(np.float32) * np.float32(1e20)
  dataset = data_lib.load(_npz_config(_save(tmp_path / 'big.npz', arrays), num_classes=3).data)
  assert np.all(np.isfinite(dataset.std)) and np.all(dataset.std > 0)
  images = next(dataset.eval_batches(dataset.test, 20))['images']
  assert np.all(np.isfinite(images)) and 0.5 < float(images.std()) < 2.0


@pytest.mark.parametrize('case, spoil, message', BAD_NPZ, ids=[c[0] for c in BAD_NPZ])
def test_bad_npz_values_are_refused_naming_the_file_and_key(tmp_path, capsys, case, spoil, message):
  arrays = _arrays()
  spoil(arrays)
  path = _save(tmp_path / 'mine.npz', arrays)
  err = tiny.refused(_npz_config(path, num_classes=3), tmp_path / 'workdir', capsys)
  assert message.format(path=path) in err


def _damaged(tmp_path, how) -> str:
  path = _save(tmp_path / 'mine.npz', _arrays())
  body = (tmp_path / 'mine.npz').read_bytes()
  if how == 'truncated':
    body = body[: len(body) // 2]
  elif how == 'not a zip':
    body = b'x_train,y_train\n1,2\n'
  with open(path, 'wb') as f:
    f.write(body)
  return path


@pytest.mark.parametrize('how', ['truncated', 'not a zip'])
def test_a_damaged_npz_is_one_line(tmp_path, capsys, how):
  path = _damaged(tmp_path, how)
  err = tiny.refused(_npz_config(path), tmp_path / 'workdir', capsys)
  assert f'{path} cannot be read as an .npz file of arrays (' in err
  assert 'truncated or damaged: write it with numpy.savez(' in err


def test_a_pickled_npz_is_refused(tmp_path, capsys):
  arrays = _arrays()
  arrays['y_train'] = np.array([{'label': 0}] * 60, dtype=object)
  path = _save(tmp_path / 'mine.npz', arrays)
  assert 'cannot be read as an .npz file of arrays' in tiny.refused(
    _npz_config(path), tmp_path / 'workdir', capsys
  )


def test_a_missing_npz_says_what_to_give(tmp_path, capsys):
  err = tiny.refused(_npz_config(tmp_path / 'nowhere.npz'), tmp_path / 'workdir', capsys)
  assert f"--config.data.path='{tmp_path / 'nowhere.npz'}' is not a file" in err


@pytest.mark.parametrize(
  'fields, message',
  [
    ({'data.path': ''}, "data.name='npz' reads the file data.path, which must be set"),
    ({'data.name': 'fashion_mnist'}, 'reads the file data.path, which must be set then and only'),
    ({'data.name': 'tfds:', 'data.path': ''}, "--config.data.name='tfds:' is out of range"),
  ],
)
def test_npz_fields_are_checked_with_the_config(tmp_path, capsys, fields, message):
  c = _npz_config(_save(tmp_path / 'mine.npz', _arrays()))
  for key, value in fields.items():
    section, leaf = key.split('.')
    c[section][leaf] = value
  assert message in tiny.refused(c, tmp_path / 'workdir', capsys)


def test_a_batch_larger_than_the_training_split_is_refused(tmp_path, capsys):
  c = _npz_config(_save(tmp_path / 'mine.npz', _arrays()), validation_size=20)
  c.train.batch_size = 48
  err = tiny.refused(c, tmp_path / 'workdir', capsys)
  assert (
    '--config.train.batch_size=48 is larger than the training split (40 images once '
    'data.validation_size=20 are held out for ranking): use a batch of at most 40'
  ) in err


def test_npz_of_float_colour_images_normalised_from_the_training_split(tmp_path):
  rng = np.random.default_rng(3)
  arrays = {
    'x_train': rng.normal(5.0, 2.0, (50, 6, 6, 3)),
    'y_train': np.arange(50) % 4,
    'x_test': rng.normal(5.0, 2.0, (10, 6, 6, 3)),
    'y_test': np.arange(10) % 4,
  }
  dataset = data_lib.load(_npz_config(_save(tmp_path / 'f.npz', arrays), 10).data)
  assert dataset.num_classes == 4 and dataset.image_shape == (6, 6, 3)
  assert dataset.train.images.dtype == np.float32
  # the training part is the 40 images not carved out for validation
  in_train = [
    i
    for i, x in enumerate(arrays['x_train'])
    if any(np.allclose(x, t) for t in dataset.train.images)
  ]
  assert len(in_train) == 40
  raw = arrays['x_train'][in_train]
  mean, std = raw.mean((0, 1, 2)), raw.std((0, 1, 2))
  batch = next(dataset.eval_batches(dataset.test, 10))
  np.testing.assert_allclose(batch['images'], (arrays['x_test'] - mean) / std, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(batch['labels'], arrays['y_test'])


def test_npz_from_fashion_mnist_trains_end_to_end(tmp_path):
  path = npz.from_fashion_mnist(str(tmp_path / 'fashion.npz'), 600, 200)
  c = _npz_config(path, validation_size=100)
  c.train.batch_size, c.train.num_steps = 32, 4
  arch = pipeline.run(c, str(tmp_path / 'workdir')).arch
  assert (tmp_path / 'workdir' / 'report.md').exists()
  assert 0.0 <= arch['test_acc'] <= 1.0
  with np.load(path) as f:
    assert f['x_train'].shape == (600, 28, 28) and f['x_test'].shape == (200, 28, 28)
    images, labels = data_lib.fashion_mnist.load(FASHION_MNIST, 'test')
    np.testing.assert_array_equal(f['x_test'], images[:200, ..., 0])
    np.testing.assert_array_equal(f['y_test'], labels[:200])


# Fashion-MNIST's IDX files: tiny ones written here, spoiled as a bad disk or copy would


def _idx(values: np.ndarray) -> bytes:
  header = bytes([0, 0, 8, values.ndim]) + b''.join(d.to_bytes(4, 'big') for d in values.shape)
  return header + values.astype(np.uint8).tobytes()


def _fashion_dir(tmp_path, spoil=None):
  folder = tmp_path / 'fashion'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for split, n in (('train', 40), ('test', 10)):
    images_file, labels_file = data_lib.fashion_mnist.FILES[split]
    files = {
      images_file: _idx(rng.integers(0, 256, (n, 28, 28))),
      labels_file: _idx(np.arange(n) % 10),
    }
    for name, body in files.items():
      body = gzip.compress(body)
      if spoil:
        body = spoil(name, body)
      (folder / name).write_bytes(body)
  return str(folder)


def _gz(f):
  return lambda body: gzip.compress(f(gzip.decompress(body)))


SPOILED = [
  (
    'cut gzip',
    'train-images-idx3-ubyte.gz',
    lambda body: body[: len(body) // 2],
    (
      'Fashion-MNIST file {dir}/train-images-idx3-ubyte.gz cannot be read (Compressed file '
      'ended before the end-of-stream marker was reached); reinstall it'
    ),
  ),
  (
    'not gzip',
    't10k-labels-idx1-ubyte.gz',
    lambda body: b'hello' + body,
    'Fashion-MNIST file {dir}/t10k-labels-idx1-ubyte.gz cannot be read (Not a gzipped file',
  ),
  (
    'cut IDX',
    'train-labels-idx1-ubyte.gz',
    _gz(lambda raw: raw[:-3]),
    (
      'Fashion-MNIST file {dir}/train-labels-idx1-ubyte.gz is truncated: expected 40 values, '
      'found 37; reinstall it (`apt-get install --reinstall dataset-fashion-mnist`)'
    ),
  ),
  (
    'not IDX',
    't10k-images-idx3-ubyte.gz',
    _gz(lambda raw: b'\x00\x00\x0d' + raw[3:]),
    'Fashion-MNIST file {dir}/t10k-images-idx3-ubyte.gz is not an IDX file of unsigned bytes',
  ),
  (
    'bad label',
    't10k-labels-idx1-ubyte.gz',
    _gz(lambda raw: raw[: 8 + 3] + b'\x0c' + raw[12:]),
    (
      'Fashion-MNIST file {dir}/t10k-labels-idx1-ubyte.gz: label 12 of example 3 is outside '
      '[0, 10) (1 such labels); reinstall it'
    ),
  ),
]


@pytest.mark.parametrize('case, name, spoil, message', SPOILED, ids=[c[0] for c in SPOILED])
def test_spoiled_fashion_mnist_files_are_one_line(tmp_path, capsys, case, name, spoil, message):
  folder = _fashion_dir(tmp_path, lambda n, body: spoil(body) if n == name else body)
  c = tiny.default_config(SMALL_RUN)
  c.data.data_dir, c.data.validation_size = folder, 8
  assert message.format(dir=folder) in tiny.refused(c, tmp_path / 'workdir', capsys)


def test_intact_tiny_fashion_mnist_files_load(tmp_path):
  c = config_lib.get_config().data
  c.data_dir, c.validation_size = _fashion_dir(tmp_path), 8
  dataset = data_lib.load(c)
  assert dataset.train.images.shape == (32, 28, 28, 1) and dataset.test.num_examples == 10


# any tfds image-classification data set by name, through tfds' mock data


def _tfds_config(name, data_dir='', validation_size=10):
  c = tiny.default_config(SMALL_RUN)
  c.data.name, c.data.data_dir, c.data.validation_size = name, data_dir, validation_size
  return c


def test_any_tfds_data_set_by_name_reads_its_shape_and_classes():
  with tfds.testing.mock_data(num_examples=30):
    dataset = data_lib.load(_tfds_config('tfds:mnist').data)
  assert dataset.image_shape == (28, 28, 1) and dataset.num_classes == 10
  assert (
    dataset.train.num_examples,
    dataset.validation.num_examples,
    dataset.test.num_examples,
  ) == (20, 10, 30)
  assert dataset.train.images.dtype == np.uint8 and dataset.train.labels.dtype == np.int32
  with tfds.testing.mock_data(num_examples=30):
    dataset = data_lib.load(_tfds_config('tfds:cifar100').data)
  assert dataset.image_shape == (32, 32, 3) and dataset.num_classes == 100


def test_a_tfds_data_set_of_varying_image_sizes_is_refused(tmp_path, capsys):
  with tfds.testing.mock_data(num_examples=4):
    err = tiny.refused(_tfds_config('tfds:imagenet2012', validation_size=2), tmp_path, capsys)
  assert "tfds data set 'imagenet2012' has images of shape (None, None, 3)" in err
  assert "(ImageNet: data.name='imagenet2012')" in err


def test_a_missing_tfds_data_set_says_how_to_prepare_it(tmp_path, capsys):
  err = tiny.refused(_tfds_config('tfds:mnist', str(tmp_path / 'tfds')), tmp_path / 'w', capsys)
  assert 'tfds build mnist --file_format=array_record' in err
  assert f'--config.data.data_dir={tmp_path / "tfds"}' in err


class _Broken:
  """A tfds source whose record 3 is damaged."""

  def __len__(self):
    return 5

  def __getitem__(self, i):
    if i == 3:
      raise ValueError('checksum mismatch\nmore detail')
    return {'image': np.zeros((4, 4, 1), np.uint8), 'label': 0}


def test_an_unreadable_tfds_record_is_named():
  with pytest.raises(
    errors.DataError,
    match=(
      r"tfds data set 'mnist', split 'train', feature 'image': record 3 cannot be read "
      r'\(checksum mismatch\); prepare it again: `tfds build mnist --file_format=array_record`'
    ),
  ):
    tfds_source.read_whole(_Broken(), tfds_source.origin('mnist', 'train'))


# streamed data sets (ImageNet): classes from the info, labels as each batch is read


class _Info:
  def __init__(self, num_classes):
    self.features = {'label': tfds.features.ClassLabel(num_classes=num_classes)}


def test_streamed_classes_are_checked_from_the_info():
  origin = checks.Origin('images', "tfds data set 'imagenet2012', split 'train'", 'rebuild')
  checks.check_info_classes(_Info(1000), 1000, origin)
  with pytest.raises(
    errors.DataError,
    match=r"split 'train' has 10 classes in its info, not "
    r'1000; rebuild',
  ):
    checks.check_info_classes(_Info(10), 1000, origin)


def test_streamed_labels_are_checked_as_read():
  records = [{'image': np.full((20, 20, 3), i, np.uint8), 'label': i} for i in range(8)]
  origin = checks.Origin('imgs', 'the labels', 'rebuild it')
  split = stream.Records(records, np.arange(8), origin)
  dataset = stream.Streamed(
    split,
    split,
    split,
    6,
    np.full(3, 0.5, np.float32),
    np.full(3, 0.25, np.float32),
    16,
    ThreadPoolExecutor(2),
  )
  data = config_lib.get_config().data
  with pytest.raises(
    errors.DataError,
    match=r'the labels: label [67] of example \d is outside '
    r'\[0, 6\) \(2 such labels\); rebuild it',
  ):
    dataset.train_batch(data, 0, 0, 8)
  with pytest.raises(errors.DataError, match='label 6 of example 6 is outside'):
    list(dataset.eval_batches(split, 8))


# through the command line: one case per class (values, damaged files, sizes)


def test_command_line_refuses_bad_labels_damaged_files_and_oversized_batches(tmp_path):
  arrays = _arrays()
  _label(arrays, 'test', 5, 7)
  bad = _save(tmp_path / 'bad.npz', arrays)
  err = tiny.main_refuses(
    tmp_path / 'w1',
    '--config.data.name=npz',
    f'--config.data.path={bad}',
    '--config.data.num_classes=3',
    '--config.data.validation_size=10',
  )
  assert f"{bad}, key 'y_test': label 7 of example 5 is outside [0, 3)" in err
  cut = _damaged(tmp_path, 'truncated')
  err = tiny.main_refuses(tmp_path / 'w2', '--config.data.name=npz', f'--config.data.path={cut}')
  assert f'{cut} cannot be read as an .npz file of arrays' in err
  good = _save(tmp_path / 'good.npz', _arrays())
  err = tiny.main_refuses(
    tmp_path / 'w3',
    '--config.data.name=npz',
    f'--config.data.path={good}',
    '--config.data.validation_size=20',
    '--config.train.batch_size=48',
  )
  assert '--config.train.batch_size=48 is larger than the training split (40 images' in err
