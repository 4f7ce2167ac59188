"""The tiny main job the end-to-end tests share: a two-stage super-network of widths 4 and 8,
a handful of training steps and candidates, so a whole run takes seconds. Each test states
only what it is about on top of it, as command-line flags or as a config."""

import os
import subprocess
import sys

from pgnas_jax import config as config_lib

FASHION_MNIST = '/usr/share/datasets/fashion-mnist'

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

# one CPU device, as users run the main job (the suite simulates four for sharding tests)
ONE_DEVICE = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}


def _flag_value(value) -> str:
  if isinstance(value, tuple):
    return '(' + ','.join(str(v) for v in value) + ')'
  return str(value)


def flags(overrides: dict | None = None) -> list[str]:
  """The tiny run with `overrides` (dotted field -> value) as `--config.` flags."""
  return [f'--config.{k}={_flag_value(v)}' for k, v in {**TINY, **(overrides or {})}.items()]


def config(overrides: dict | None = None):
  """The tiny run with `overrides` as a config, as the command line would build it."""
  c = config_lib.get_config()
  for key, value in {**TINY, **(overrides or {})}.items():
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
