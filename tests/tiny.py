"""The tests' shared helpers. The tiny main job the end-to-end tests share: a two-stage
super-network of widths 4 and 8, a handful of training steps and candidates on a small part
of Fashion-MNIST, so a whole run takes seconds. Each test states only what it is about on top
of it, as command-line flags or as a config. Beside it: configs with a few fields set, the
training step of a small network, tiny members of every family, and the checks that a
refused run leaves the user's workdir alone."""

import contextlib
import functools
import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pgnas_jax
from pgnas_jax import checkpoint as checkpoint_lib
from pgnas_jax import cli
from pgnas_jax import context as context_lib
from pgnas_jax import config as config_lib
from pgnas_jax import data as data_lib
from pgnas_jax import export as export_lib
from pgnas_jax import masks as masks_lib
from pgnas_jax import parallel, pipeline, supernets, train
from pgnas_jax import space as space_lib
from pgnas_jax.backends.cpu import host_devices
from pgnas_jax.data import fashion_mnist

ROOT = os.path.join(os.path.dirname(__file__), '..')

FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
SMALL_SPLITS = {'train': 1600, 'test': 400}  # images of each split in `small_fashion_mnist()`

TINY = {
  'model.shake_shake.stem_width': 4,
  'model.shake_shake.widths': (4, 8),
  'train.num_steps': 6,
  'train.log_every_steps': 3,
  'data.validation_size': 500,
  'search.num_candidates': 5,
  'search.chunk_size': 4,
  'search.eval_batch_size': 500,
  'export.latency': False,  # a timing, compiled and run 23 times per network: tested once
}


def _write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(
    int(d).to_bytes(4, 'big') for d in array.shape
  )
  with gzip.open(path, 'wb', compresslevel=1) as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def small_fashion_mnist() -> str:
  """A folder with the first 1,600 training and 400 test images of Fashion-MNIST in its own
  format: the same code path as the real data set, a fraction of its loading and evaluation
  time. Written once per machine; concurrent test workers race safely (atomic rename)."""
  folder = os.path.join(
    tempfile.gettempdir(),
    f'pgnas_jax_tests_fashion_mnist_{SMALL_SPLITS["train"]}_{SMALL_SPLITS["test"]}_{os.getuid()}',
  )
  if os.path.isdir(folder):
    return folder
  scratch = tempfile.mkdtemp(dir=tempfile.gettempdir())
  for split, n in SMALL_SPLITS.items():
    images, labels = fashion_mnist.load(FASHION_MNIST, split)
    image_file, label_file = fashion_mnist.FILES[split]
    _write_idx(os.path.join(scratch, image_file), images[:n, :, :, 0])
    _write_idx(os.path.join(scratch, label_file), labels[:n])
  try:
    os.rename(scratch, folder)
  except OSError:  # another worker was first
    shutil.rmtree(scratch)
  return folder


def _tiny(overrides: dict | None) -> dict:
  return {**TINY, 'data.data_dir': small_fashion_mnist(), **(overrides or {})}


# one CPU device, as users run the main job (the suite simulates four for sharding tests);
# the suite's other XLA flags kept (tests/conftest.py)
ONE_DEVICE = {
  **os.environ,
  'XLA_FLAGS': ' '.join(
    f
    for f in os.environ.get('XLA_FLAGS', '').split()
    if not f.startswith(host_devices.DEVICE_COUNT_FLAG)
  ),
}


def _flag_value(value) -> str:
  if isinstance(value, tuple):
    return '(' + ','.join(str(v) for v in value) + ')'
  return str(value)


def flags(overrides: dict | None = None) -> list[str]:
  """The tiny run with `overrides` (dotted field -> value) as `--config.` flags."""
  return [f'--config.{k}={_flag_value(v)}' for k, v in _tiny(overrides).items()]


def default_config(overrides: dict | None = None):
  """The default config (the full-size run, not the tiny one) with ``overrides``."""
  return config_lib.set_fields(config_lib.get_config(), overrides or {})


def config(overrides: dict | None = None):
  """The tiny run with `overrides` as a config, as the command line would build it."""
  return default_config(_tiny(overrides))


def config_file(name: str):
  """The module of ``configs/NAME.py``, as ``--config`` reads it."""
  return config_lib.read_config_file(os.path.join(ROOT, 'configs', f'{name}.py'))


# conftest's ``tiny_net`` on ``synthetic_dataset()``: its widths, batches of 8
NET = {
  'model.shake_shake.stem_width': 4,
  'model.shake_shake.widths': (4, 8),
  'train.batch_size': 8,
}


def steps_config(num_steps: int, **drop):
  """The default config for ``num_steps`` training steps of conftest's ``tiny_net`` on
  ``synthetic_dataset()``, with the ``drop`` fields given."""
  c = default_config(
    {
      **NET,
      'train.num_steps': num_steps,
      'objective.num_train_effective': 64.0,  # large enough terms to matter in the gradients
    }
  )
  c.drop.update(drop)
  return c


def family_config(family: str, overrides: dict | None = None, **fields):
  """The default config, validated, for super-network ``family`` with its ``fields``
  (``model.FAMILY.NAME`` -> value) and ``overrides`` (dotted field -> value)."""
  c = default_config({'model.family': family, **(overrides or {})})
  c.model[family].update(fields)
  config_lib.validate(c)
  return c


def main(workdir, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
  """`python -m pgnas_jax.main --workdir=WORKDIR ARGS` in a new process."""
  return subprocess.run(
    [sys.executable, '-m', 'pgnas_jax.main', f'--workdir={workdir}', *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    env=env,
  )


def users_workdir(workdir: pathlib.Path) -> pathlib.Path:
  """``workdir`` (made if missing) holding a file of the user's, which a refused run must
  leave as it was (``left_alone``)."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'notes.txt').write_text('mine')
  return workdir


def left_alone(workdir: pathlib.Path):
  """``users_workdir(workdir)`` holds the user's file, as it was, and nothing else."""
  assert [p.name for p in workdir.iterdir()] == ['notes.txt']
  assert (workdir / 'notes.txt').read_text() == 'mine'


def main_refuses(workdir: pathlib.Path, *args) -> str:
  """Runs ``main(workdir, *args)`` in a workdir holding a file of the user's: it must end with
  status 2 and one line, leaving the workdir as the user left it. Returns the line."""
  users_workdir(workdir)
  result = main(workdir, *args, timeout=300)
  assert result.returncode == 2
  assert result.stderr.startswith('pgnas_jax: ') and result.stderr.count('\n') == 1
  left_alone(workdir)
  return result.stderr


def quick_study(module: str, workdir) -> tuple[dict, str]:
  """`python -m pgnas_jax.experiments.MODULE --workdir=WORKDIR --quick` on the small data set,
  one device, as users run it; it must succeed. Returns its results.json and its log."""
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      f'pgnas_jax.experiments.{module}',
      f'--workdir={workdir}',
      '--quick',
      f'--data_dir={small_fashion_mnist()}',
    ],
    capture_output=True,
    text=True,
    timeout=900,
    env=ONE_DEVICE,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads((pathlib.Path(workdir) / 'results.json').read_text()), result.stderr


# a study's network as its results record it (config.json's model section, the part its
# report reads): a SupNet-M-family super-network, one block a stage
STUDY_MODEL = {
  'shake_shake': {
    'stem_width': 16,
    'widths': [16, 32, 64],
    'blocks_per_stage': 1,
    'kernel_sizes': [3, 3],
  }
}


def jsonl(path) -> list:
  """The records of a JSON-lines file."""
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def metrics(workdir) -> list:
  """The training's records in ``workdir``'s metrics.jsonl."""
  return jsonl(pathlib.Path(workdir) / 'metrics.jsonl')


def candidates(workdir) -> list:
  """The candidates' records in ``workdir``'s search/candidates.jsonl."""
  return jsonl(pathlib.Path(workdir) / 'search' / 'candidates.jsonl')


def arch(workdir) -> dict:
  """The winner in ``workdir``'s search/arch.json."""
  return json.loads((pathlib.Path(workdir) / 'search' / 'arch.json').read_text())


def synthetic_dataset(n: int = 64):
  """Random 8x8x2 images of 3 classes, the input of conftest's ``tiny_net``: `n` training
  images, 16 each for validation and test, the same on every call."""
  rng = np.random.default_rng(0)

  def split(m):
    return data_lib.Split(
      rng.integers(0, 256, (m, 8, 8, 2), dtype=np.uint8), rng.integers(0, 3, m).astype(np.int32)
    )

  return data_lib.Dataset(
    split(n), split(16), split(16), 3, np.full(2, 0.5, np.float32), np.full(2, 0.25, np.float32)
  )


# a few steps and candidates of a user's own network (test_custom, test_nnx, test_attention)
CUSTOM_RUN = {
  'data.validation_size': 200,
  'train.num_steps': 4,
  'train.batch_size': 32,
  'train.log_every_steps': 2,
  'search.num_candidates': 4,
  'search.chunk_size': 4,
  'search.eval_batch_size': 100,
  'log.tensorboard': False,
  'export.latency': False,  # measured by the NNX and ViT examples' tests only
}


def small_arrays(num_classes: int = 10):
  """An in-memory data source (``pgnas_jax.from_arrays``) of random 12x12 grey images: 300
  for training (100 of them validation), 50 for test, the same on every call."""
  rng = np.random.default_rng(0)
  return pgnas_jax.from_arrays(
    rng.integers(0, 256, (300, 12, 12), np.uint8),
    rng.integers(0, num_classes, 300),
    rng.integers(0, 256, (50, 12, 12), np.uint8),
    rng.integers(0, num_classes, 50),
    num_classes=num_classes,
    validation_size=100,
  )


def check_pruned_winner(module, data, workdir, arch: dict) -> None:
  """The winner's input-sliced pruned weights (``search/winner_weights.msgpack``) run in
  ``module`` itself give the winner's test accuracy and hold its params."""
  pruned = export_lib.load_weights(str(pathlib.Path(workdir) / 'search' / 'winner_weights.msgpack'))
  batch = next(data.eval_batches(data.test, 50))
  logits = module.apply(pruned, batch['images'], train=False)
  accuracy = float(np.mean(np.argmax(logits, -1) == batch['labels']))
  assert accuracy == pytest.approx(arch['test_acc'], abs=1e-6)
  assert space_lib.count_params(pruned['params']) == arch['params']


def check_compact_winner(module, data, workdir, arch: dict, latency: bool = False) -> None:
  """The winner's compact network (``search/winner_compact.{npz,stablehlo}``, run with jax
  alone) gives the masked module's logits within the compact tests' tolerance (rtol and atol
  1e-5, ``tests/test_compact.py``), stores fewer numbers than the winner's input slices and
  counts what it stores; ``latency``: its latency was measured."""
  folder = pathlib.Path(workdir) / 'search'
  program = jax.export.deserialize((folder / 'winner_compact.stablehlo').read_bytes())
  with np.load(folder / 'winner_compact.npz') as stored:
    weights = dict(stored)
  assert sum(w.size for w in weights.values()) == arch['compact_params'] <= arch['params']
  pruned = export_lib.load_weights(str(folder / 'winner_weights.msgpack'))
  images = next(data.eval_batches(data.test, 50))['images']
  np.testing.assert_allclose(
    np.asarray(program.call(weights, images)),
    np.asarray(module.apply(pruned, images, train=False)),
    rtol=1e-5,
    atol=1e-5,
  )
  if latency:
    assert arch['latency_ms']['compact']['128'] > 0 and arch['latency_ms']['supernet']['1'] > 0


def refused(config, workdir, capsys) -> str:
  """Runs the main job in-process as the command line does once its flags are parsed; it
  must end with status 2 and one line, leaving the workdir as the user left it (a file of
  theirs, written here). Returns the line."""
  users_workdir(workdir)
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    cli.exit_on_user_errors(pipeline.run, config, str(workdir))
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith('pgnas_jax: ') and err.count('\n') == 1, err
  left_alone(workdir)
  return err


NO_STOP = types.SimpleNamespace(requested=False, signal_name=None)


class StopAfter:
  """Asks the training loop to stop after ``steps`` steps, as SIGTERM does (0: never)."""

  signal_name = 'SIGTERM'

  def __init__(self, steps: int):
    self.calls, self.steps = 0, steps

  @property
  def requested(self):
    self.calls += 1
    return self.calls == self.steps

  def finishing(self):
    return contextlib.nullcontext()


def trained(model, config, workdir, guard=NO_STOP, dataset=None) -> tuple:
  """(state, space) of ``train.train`` on one device, in ``workdir``, on ``dataset`` (default:
  ``synthetic_dataset()``), obeying ``guard``'s stop requests."""
  dataset = synthetic_dataset() if dataset is None else dataset
  mesh = parallel.make_mesh(jax.devices()[:1])
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), config.checkpoint)
  try:
    ctx = context_lib.Context(config, str(workdir), mesh, dataset, model, checkpointer, guard, True)
    return train.train(ctx)
  finally:
    checkpointer.close()


class Stepper:
  """The training step of ``model`` under ``config``, data-parallel over ``devices``, on
  ``dataset`` (default: ``synthetic_dataset()``), as the training loop takes it. ``state`` and
  ``space`` are the initial ones, ``fresh()`` another initial state (a step donates the state
  it takes); ``stepper(state, first, count)`` takes steps ``first`` to ``first + count - 1``
  and returns the state and each step's metrics, on the host."""

  def __init__(self, model, config, devices, dataset=None):
    self.model, self.config = model, config
    self.dataset = synthetic_dataset() if dataset is None else dataset
    self.mesh = parallel.make_mesh(devices)
    self.run = train.setup(config, self.dataset)
    self.state, self.space = self._initialise()
    self._step = train.make_train_step(model, self.space, config, self.run, self.mesh)

  def _initialise(self):
    image_shape = self.dataset.train.images.shape[1:]
    return train.initialise(self.model, self.config, image_shape, self.run.tx, self.mesh)

  def fresh(self):
    return self._initialise()[0]

  def __call__(self, state, first: int, count: int) -> tuple:
    config, history = self.config, []
    for s in range(first, first + count):
      batch = self.dataset.train_batch(config.data, config.seed, s, config.train.batch_size)
      state, metrics = self._step(state, parallel.put_batch(batch, self.mesh))
      history.append(jax.device_get(metrics))
    return state, history


def gradients(model, config, devices) -> dict:
  """The gradient of the training loss at ``model``'s initial parameters under ``config`` on
  the first batch of 8 of ``synthetic_dataset()`` (step key 7), data-parallel over
  ``devices``, on the host."""
  mesh = parallel.make_mesh(devices)
  dataset = synthetic_dataset()
  run = train.setup(config, dataset)
  state, space = train.initialise(model, config, (8, 8, 2), run.tx, mesh)
  loss_fn = train.make_loss_fn(model, space, config)
  grad_fn = jax.jit(
    jax.grad(lambda p, b: loss_fn(p, state.batch_stats, b, jax.random.key(7))[0]),
    in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
  )
  batch = parallel.put_batch(dataset.train_batch(config.data, 0, 0, 8), mesh)
  return jax.device_get(grad_fn(state.params, batch))


# Tiny members of each family (widths, depths, resolution) that keep its structure. The ENAS
# cells are short ones that still use every op, a strided separable conv, and (reduction) an
# input that no op reads.
TINY_NORMAL_ARC = (0, 0, 1, 1, 2, 2, 0, 4)
TINY_REDUCTION_ARC = (0, 3, 0, 4, 0, 1, 2, 2, 3, 0, 2, 4)
FAMILIES = {  # family -> (its fields, image shape)
  'shake_shake': (dict(stem_width=4, widths=(4, 8), blocks_per_stage=1), (8, 8, 3)),
  'enas': (
    dict(
      filters=4,
      normal_cells_per_stage=1,
      normal_arc=TINY_NORMAL_ARC,
      reduction_arc=TINY_REDUCTION_ARC,
    ),
    (8, 8, 3),
  ),
  'resnet': (dict(stem_width=8, widths=(4, 8), blocks_per_stage=(1, 1)), (16, 16, 3)),
  'densenet': (dict(stem_width=8, blocks=(2, 3), growth_rate=4, bottleneck_width=8), (16, 16, 3)),
}
# one searchable conv per family that a test makes lose every input
REMOVED_CONV = {
  'shake_shake': ('stage1_block0', 'branch1', 'conv1'),
  'enas': ('cell1', 'node3_op0', 'sep0'),  # reduction cell: sep5x5, stride 2
  'resnet': ('stage1_block0', 'multi_kernel', 'branch3'),
  'densenet': ('block1_layer2', 'conv1x1'),  # 3 groups: a dense layer's every source
}


def supernet(family: str, num_classes: int = 10, **fields):
  """The super-network ``family`` with its ``fields``, as the config builds it."""
  return supernets.build(family_config(family, **fields).model, num_classes)


@functools.cache
def family_net(family: str) -> tuple:
  """(model, initial variables, image shape) of ``family``'s tiny member, of 3 classes;
  XLA:CPU compiles inits slowly, so once each (with the cheap-to-compile 'rbg' key)."""
  fields, image_shape = FAMILIES[family]
  model = supernet(family, num_classes=3, **fields)
  variables = jax.jit(
    lambda k: model.init({'params': k}, jnp.zeros((1,) + image_shape), train=False)
  )(jax.random.key(0, impl='rbg'))
  return model, variables, image_shape


def apply(model, variables, images):
  """``model``'s logits of ``images`` at evaluation."""
  return jax.jit(functools.partial(model.apply, train=False))(variables, images)


def trained_looking(variables, normal=None) -> dict:
  """The weights and BatchNorm statistics of ``variables`` moved by 0.2 ``normal(shape)``,
  drawn leaf by leaf (default: NumPy's generator of seed 1), the statistics made positive:
  random weights and non-trivial BatchNorm statistics, as after training."""
  if normal is None:
    rng = np.random.default_rng(1)
    normal = lambda shape: rng.normal(size=shape).astype(np.float32)
  v = jax.tree.map(
    lambda x: x + 0.2 * normal(x.shape),
    {'params': variables['params'], 'batch_stats': variables['batch_stats']},
  )
  v['batch_stats'] = jax.tree.map(jnp.abs, v['batch_stats'])  # variances must be positive
  return v


def family_case(family: str) -> tuple:
  """(model, initial variables, ``trained_looking`` variables, search space, 3 random images)
  of ``family``'s tiny member."""
  model, init_variables, image_shape = family_net(family)
  variables = trained_looking(init_variables)
  images = np.asarray(jax.random.normal(jax.random.key(5), (3,) + image_shape))
  return model, init_variables, variables, space_lib.from_variables(init_variables), images


def candidate_mask(space, p: float = 0.4, seed: int = 4) -> dict:
  """A candidate's mask (NumPy arrays) drawn at drop rate ``p`` with key ``seed``."""
  logits = masks_lib.init_drop_logits(space.template, p)
  drawn = masks_lib.candidate_masks(jax.random.key(seed), jnp.arange(1), logits, space.template)
  return jax.tree.map(lambda m: np.array(m[0]), drawn)


def remove_conv(mask: dict, path: tuple):
  """Drops every input of the conv at ``path`` of ``mask``."""
  node = mask
  for name in path:
    node = node[name]
  for group in node:
    node[group] = np.zeros_like(node[group])
