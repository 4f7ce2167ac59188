"""The tiny main job the end-to-end tests share: a two-stage super-network of widths 4 and 8,
a handful of training steps and candidates on a small part of Fashion-MNIST, so a whole run
takes seconds. Each test states
only what it is about on top of it, as command-line flags or as a config."""

import gzip
import os
import shutil
import subprocess
import sys
import tempfile

import types

import jax
import numpy as np
import pytest

from pgnas_jax import checkpoint as checkpoint_lib
from pgnas_jax import cli
from pgnas_jax import context as context_lib
from pgnas_jax import config as config_lib
from pgnas_jax import data as data_lib
from pgnas_jax import parallel, pipeline, train
from pgnas_jax.backends.cpu import host_devices
from pgnas_jax.data import fashion_mnist

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


def config(overrides: dict | None = None):
  """The tiny run with `overrides` as a config, as the command line would build it."""
  c = config_lib.get_config()
  for key, value in _tiny(overrides).items():
    *parents, name = key.split('.')
    node = c
    for parent in parents:
      node = node[parent]
    node[name] = value
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


def quick_study(module: str, workdir) -> subprocess.CompletedProcess:
  """`python -m pgnas_jax.experiments.MODULE --workdir=WORKDIR --quick` on the small data set,
  one device, as users run it."""
  return subprocess.run(
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


def refused(config, workdir, capsys) -> str:
  """Runs the main job in-process as the command line does once its flags are parsed; it
  must end with status 2 and one line, leaving the workdir as the user left it (a file of
  theirs, written here). Returns the line."""
  workdir.mkdir(exist_ok=True)
  (workdir / 'notes.txt').write_text('mine')
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    cli.exit_on_user_errors(pipeline.run, config, str(workdir))
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith('pgnas_jax: ') and err.count('\n') == 1, err
  assert [p.name for p in workdir.iterdir()] == ['notes.txt']
  assert (workdir / 'notes.txt').read_text() == 'mine'
  return err


NO_STOP = types.SimpleNamespace(requested=False, signal_name=None)


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
