"""``--cpu_devices``: how many XLA devices a single-process run splits the host CPU into."""

import os
import subprocess
import sys

import pytest
import tiny

from pgnas_jax import errors, rng
from pgnas_jax.backends.cpu import host_devices

ONE_DEVICE_IMPL = next(iter(rng.ONE_DEVICE_ONLY))  # a generator XLA compiles for one device


def _devices_config(batch=128, impl=None):
  """The default config with training batches of ``batch``, an eval batch that splits over
  1..6 and 8 devices, and generator ``impl`` where one is given."""
  generator = {'rng.impl': impl} if impl else {}
  return tiny.default_config(
    {'train.batch_size': batch, 'search.eval_batch_size': 120, **generator}
  )


@pytest.mark.parametrize(
  'batch, impl, cores, several, expected',
  [
    (128, None, 2, False, 2),  # one per core
    (128, None, 64, False, host_devices.MAX_AUTO),  # at most MAX_AUTO
    (6, None, 4, False, 3),  # the most that split the batch (and the eval batch)
    (128, None, 7, False, 4),  # 7, 6 and 5 do not split 128
    (7, None, 4, False, 1),
    (128, ONE_DEVICE_IMPL, 2, False, 1),  # a generator that runs on one device only
    (128, None, 2, True, 1),  # one per process in multi-process runs
  ],
)
def test_auto_takes_one_device_per_core_when_the_config_splits(
  batch, impl, cores, several, expected
):
  config = _devices_config(batch, impl)
  assert host_devices.choose(host_devices.AUTO, config, cores, several) == expected


def test_a_count_is_taken_as_given_and_checked():
  assert host_devices.choose('4', _devices_config(), 2) == 4
  with pytest.raises(errors.ConfigError, match='does not split over 3 devices'):
    host_devices.choose('3', _devices_config(), 2)
  for bad in ('0', '-1', 'many'):
    with pytest.raises(errors.ConfigError, match='use auto or a whole number'):
      host_devices.choose(bad, _devices_config(), 2)


def test_split_host_cpu_makes_single_threaded_devices_before_jax_starts():
  """In a fresh process (the split must come before JAX's backends start)."""
  code = (
    'import os, jax; from pgnas_jax.backends.cpu import host_devices; '
    'print(host_devices.split_host_cpu(2, 2)); print(len(jax.devices("cpu"))); '
    'print(os.environ["XLA_FLAGS"])'
  )
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run(
    [sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True
  ).stdout.splitlines()
  assert out == [
    'CPU: 2 single-threaded devices on 2 cores',
    '2',
    host_devices.ONE_THREAD_FLAG,
  ]


def test_a_device_count_in_xla_flags_is_kept(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  assert 'as XLA_FLAGS sets them' in host_devices.split_host_cpu(2, 2)
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=4'
