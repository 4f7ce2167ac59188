"""Your own network (docs/library.md): a custom module from the config or from Python, the
checks that refuse a module the pipeline cannot use, and the example."""

import json

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

import pgnas_jax
from examples import search_fashion_npz, tiny_cnn
from pgnas_jax import config as config_lib
from pgnas_jax import data as data_lib
from pgnas_jax import errors, pipeline

DATA_DIR = '/usr/share/datasets/fashion-mnist'
MODULE = 'examples.tiny_cnn:SmallVGG'
TINY = tiny.CUSTOM_RUN
IDENTICAL = (
  'config.json',
  'posterior.json',
  'search/candidates.jsonl',
  'search/arch.json',
  'search/winner_weights.msgpack',
  'search/winner_compact.npz',
)


def test_command_line_and_python_entry_give_identical_workdirs(tmp_path):
  overrides = {
    **TINY,
    'data.data_dir': tiny.small_fashion_mnist(),
    'model.family': 'custom',
    'model.custom.module': MODULE,
    'model.custom.kwargs': '{"widths": [4, 8]}',
  }
  args = [f'--config.{k}={v}' for k, v in overrides.items()]
  result = tiny.main(tmp_path / 'cli', *args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / 'cli' / 'search' / 'winner_compact.stablehlo').exists()

  config = tiny.default_config(overrides)
  module = tiny_cnn.SmallVGG(num_classes=10, widths=(4, 8))
  pgnas_jax.search_network(module, data_lib.load(config.data), config, str(tmp_path / 'py'))
  for name in IDENTICAL:
    assert (tmp_path / 'cli' / name).read_bytes() == (tmp_path / 'py' / name).read_bytes(), name
  assert json.loads((tmp_path / 'py' / 'config.json').read_text())['model']['custom'] == {
    'module': MODULE,
    'kwargs': '{"widths": [4, 8]}',
  }


def test_python_entry_records_the_module_and_exports_its_pruned_weights(tmp_path):
  # the config names another family: config.json must describe the module that ran, so
  # that the run resumes and export rebuilds it; the caller's config is left as it was
  config, data = tiny.default_config(TINY), tiny.small_arrays()
  module = tiny_cnn.SmallVGG(num_classes=10, widths=(4, 6))
  arch = pgnas_jax.search_network(module, data, config, str(tmp_path)).arch
  assert config.model.family == 'shake_shake'
  saved = json.loads((tmp_path / 'config.json').read_text())['model']
  assert saved['family'] == 'custom'
  assert saved['custom'] == {'module': MODULE, 'kwargs': '{"widths": [4, 6]}'}
  # the input-sliced pruned weights give the winner's test accuracy in the module itself,
  # and its compact network the same logits
  tiny.check_pruned_winner(module, data, tmp_path, arch)
  tiny.check_compact_winner(module, data, tmp_path, arch)
  # resuming the finished run with the same module and data does nothing
  assert pgnas_jax.search_network(module, data, config, str(tmp_path)).arch == arch


class NoSearchable(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    return pgnas_jax.Dense(self.num_classes)(jnp.mean(pgnas_jax.Conv(4)(x), axis=(1, 2)))


class NoTrainFlag(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = pgnas_jax.SearchableConv(4)(x)
    return pgnas_jax.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class PlainDense(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.num_classes)(jnp.mean(pgnas_jax.SearchableConv(4)(x), axis=(1, 2)))


class BatchStatsAtTest(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=False)(pgnas_jax.SearchableConv(4)(x))
    return pgnas_jax.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class Features(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    return jnp.mean(pgnas_jax.SearchableConv(4)(x), axis=(1, 2))


class BatchOfTwo(nn.Module):
  """Written for batches of two: fits the first check's batch, not the run's."""

  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.mean(pgnas_jax.SearchableConv(4)(x), axis=(1, 2)).reshape(2, 4)
    return pgnas_jax.Dense(self.num_classes)(x)


@pytest.mark.parametrize(
  'module, message',
  [
    (
      BatchOfTwo(10),
      'BatchOfTwo fails with train=True on a batch of 32 images (train.batch_size, '
      'search.eval_batch_size): TypeError',
    ),
    (NoSearchable(10), 'NoSearchable has no pgnas_jax.SearchableConv or SearchableDense'),
    (NoTrainFlag(10), 'NoTrainFlag.__call__(self, x) must take (self, images, train: bool)'),
    (PlainDense(10), "PlainDense: layer 'Dense_0' holds a kernel the cost model does not count"),
    (
      BatchStatsAtTest(10),
      ('BatchStatsAtTest fails with train=False (BatchNorm must then use its running statistics'),
    ),
    (
      Features(10),
      ('Features returns (2, 4) for 2 images; it must return logits of shape [batch, 10]'),
    ),
  ],
)
def test_a_module_the_pipeline_cannot_use_is_refused(tmp_path, module, message):
  tiny.users_workdir(tmp_path)
  with pytest.raises(errors.ConfigError) as e:
    pgnas_jax.search_network(module, tiny.small_arrays(), tiny.default_config(TINY), str(tmp_path))
  assert message in str(e.value) and '\n' not in str(e.value)
  tiny.left_alone(tmp_path)


@pytest.mark.parametrize(
  'custom, message',
  [
    (
      {'model.custom.module': 'no_such_package.net:Net'},
      "--config.model.custom.module='no_such_package.net:Net' cannot be imported",
    ),
    ({'model.custom.module': 'examples.tiny_cnn'}, "is not 'package.module:ClassName'"),
    (
      {'model.custom.module': 'examples.tiny_cnn:Missing'},
      "examples.tiny_cnn has no flax.linen.Module or flax.nnx.Module class 'Missing'",
    ),
    (
      {'model.custom.module': MODULE, 'model.custom.kwargs': '{"depth": 3}'},
      '--config.model.custom.kwargs=\'{"depth": 3}\' is refused by examples.tiny_cnn:SmallVGG',
    ),
    (
      {'model.custom.module': MODULE, 'model.custom.kwargs': '{"widths": "wide"}'},
      'SmallVGG fails at init on images of shape (2, 28, 28, 1): TypeError',
    ),
    (
      {'model.custom.module': MODULE, 'model.custom.kwargs': '[4, 8]'},
      "--config.model.custom.kwargs='[4, 8]' is out of range: it must be a JSON object",
    ),
    ({}, "model.family='custom' needs its class"),
    (
      {'model.family': 'shake_shake', 'model.custom.module': MODULE},
      "model.custom.* names the module of model.family='custom' only",
    ),
    (
      {'model.custom.module': 'user_net:Net', 'source': 'raise RuntimeError("no GPU here")\n'},
      'importing user_net fails with RuntimeError: no GPU here; fix the module',
    ),
    (
      {'model.custom.module': 'user_net:Net', 'source': 'def broken(:\n'},
      'importing user_net fails with SyntaxError: ',
    ),
  ],
)
def test_a_config_naming_a_bad_module_is_refused(tmp_path, monkeypatch, custom, message):
  source = custom.pop('source', None)
  if source is not None:  # the user's own module, importable from the working directory
    folder = tmp_path / 'code'
    folder.mkdir()
    (folder / 'user_net.py').write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    tmp_path = tmp_path / 'workdir'
  tiny.users_workdir(tmp_path)
  config = tiny.default_config({**TINY, 'model.family': 'custom', **custom})
  with pytest.raises(errors.ConfigError) as e:
    pipeline.run(config, str(tmp_path))
  assert message in str(e.value) and '\n' not in str(e.value)
  tiny.left_alone(tmp_path)


def test_the_command_line_answers_a_bad_module_in_one_line(tmp_path):
  err = tiny.main_refuses(
    tmp_path,
    '--config.model.family=custom',
    f'--config.model.custom.module={MODULE}',
    '--config.model.custom.kwargs={"widths": [4, 8], "colour": 1}',
  )
  assert "unexpected keyword argument 'colour'" in err


@pytest.mark.parametrize(
  'change, message',
  [
    ({'train_labels': np.full(300, 10)}, 'training labels span [10, 10]: they must lie in [0, 10)'),
    ({'test_images': np.zeros((50, 12, 12), np.float32)}, 'test images are float32'),
    ({'train_labels': np.zeros(299, np.int64)}, 'training labels are int64 (299,)'),
  ],
)
def test_from_arrays_refuses_bad_arrays(change, message):
  rng = np.random.default_rng(0)
  arrays = {
    'train_images': rng.integers(0, 256, (300, 12, 12), np.uint8),
    'train_labels': np.zeros(300, np.int64),
    'test_images': rng.integers(0, 256, (50, 12, 12), np.uint8),
    'test_labels': np.zeros(50, np.int64),
    **change,
  }
  with pytest.raises(errors.DataError) as e:
    pgnas_jax.from_arrays(**arrays, num_classes=10, validation_size=100)
  assert message in str(e.value)


def test_from_arrays_carves_and_normalises_as_load_does():
  config = config_lib.get_config()
  loaded = data_lib.load(config.data)
  train = [
    np.concatenate(a)
    for a in zip(
      (loaded.validation.images, loaded.validation.labels),
      (loaded.train.images, loaded.train.labels),
    )
  ]
  # the same images in the file's order, as the IDX files hold them
  order = np.random.default_rng(data_lib.SPLIT_SEED).permutation(train[0].shape[0])
  images, labels = np.empty_like(train[0]), np.empty_like(train[1])
  images[order], labels[order] = train
  again = pgnas_jax.from_arrays(
    images[..., 0],
    labels,
    loaded.test.images,
    loaded.test.labels,
    num_classes=10,
    validation_size=config.data.validation_size,
  )
  np.testing.assert_array_equal(again.validation.images, loaded.validation.images)
  np.testing.assert_array_equal(again.train.labels, loaded.train.labels)
  np.testing.assert_allclose(again.mean, loaded.mean)
  np.testing.assert_allclose(again.std, loaded.std)


def test_example_searches_its_cnn_on_an_npz(tmp_path):
  npz = tmp_path / 'fashion_mnist.npz'
  arch = search_fashion_npz.main(
    [
      f'--workdir={tmp_path / "run"}',
      f'--npz={npz}',
      f'--data_dir={DATA_DIR}',
      '--kwargs={"widths": [4, 8]}',
      '--train_images=600',
      '--test_images=200',
      '--validation_images=200',
      '--batch_size=32',
      '--steps=4',
      '--candidates=4',
      '--eval_batch_size=100',
    ]
  ).arch
  with np.load(npz) as f:
    assert f['x_train'].shape == (60000, 28, 28) and f['y_test'].shape == (10000,)
  candidates = tiny.candidates(tmp_path / 'run')
  assert len(candidates) == 4
  assert arch['val_acc'] == max(c['val_acc'] for c in candidates)
  assert (tmp_path / 'run' / 'report.md').exists()


def test_a_run_resumed_with_other_module_code_is_refused(tmp_path, monkeypatch):
  """One search ranks one network: a custom module whose source file changed between a
  stop and the rerun is refused in one line, the workdir as it was."""
  code = tmp_path / 'code'
  code.mkdir()
  (code / 'user_net.py').write_text(
    'from examples.tiny_cnn import SmallVGG\n\n\nclass Net(SmallVGG):\n  pass\n'
  )
  monkeypatch.syspath_prepend(str(code))
  config = tiny.default_config(
    {
      **TINY,
      'data.data_dir': tiny.small_fashion_mnist(),
      'model.family': 'custom',
      'model.custom.module': 'user_net:Net',
      'model.custom.kwargs': '{"widths": [4, 8]}',
    }
  )
  workdir = tmp_path / 'run'
  pipeline.run(config, str(workdir))
  recorded = json.loads((workdir / 'module_source.json').read_text())
  assert recorded['module'] == 'user_net:Net' and recorded['file'].endswith('user_net.py')
  (workdir / 'report.md').unlink()  # as if stopped before the end
  before = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
  with open(code / 'user_net.py', 'a') as f:
    f.write('# tuned since\n')
  with pytest.raises(errors.IncompatibleWorkdirError) as e:
    pipeline.run(config, str(workdir))
  assert 'holds a run of user_net:Net whose source has changed since it began' in str(e.value)
  assert '\n' not in str(e.value)
  assert {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()} == before
