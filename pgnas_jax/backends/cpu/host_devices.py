"""How a single-process run splits this host's CPU into XLA devices (``--cpu_devices``).

XLA:CPU runs one device's program on a pool of threads; most ops of the project's small
networks (elementwise passes, BatchNorm statistics, the scorer's convs on one candidate) use
Eigen's intra-op threads poorly. Split into one device per core without intra-op threads,
the same program runs data-parallel (the train step: rows of the batch; ranking: candidates
of a chunk). Such a device is not confined to one core: XLA:CPU still runs independent ops
of a program side by side, so one device's train step already keeps two cores busy and two
devices' steps share them. Measured on the project's 2-core machine (docs/benchmarks.md,
issue 17): ranking 1.46x (default network) and 1.55x (m32), the plain forward 1.4x and
1.8x, the train step 1.03x to 1.12x. Results change only by the float order of the
cross-device sums (parallel.py), as for any device count.

It must be set before JAX starts its backends (the first device query). Accelerators are
not affected: a GPU or TPU run's mesh holds the accelerators, whatever the CPU holds.
"""

import os

import jax

from pgnas_jax import config as config_lib
from pgnas_jax.errors import ConfigError

AUTO = 'auto'
MAX_AUTO = 8  # measured up to 2 cores only; beyond, each device keeps several threads
DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
ONE_THREAD_FLAG = '--xla_cpu_multi_thread_eigen=false'


def usable_cores() -> int:
  return len(os.sched_getaffinity(0))


def choose(requested: str, config, cores: int, several_processes: bool = False) -> int:
  """CPU devices per process: ``requested`` as a whole number, or for ``'auto'`` one per
  core (at most ``MAX_AUTO``), fewer when the config's batches or chunks do not split over
  them or its generator runs on one device only; one per process in multi-process runs
  (whose device count the run checks once every process has joined)."""
  if requested != AUTO:
    try:
      count = int(requested)
    except ValueError:
      count = 0
    if count < 1:
      raise ConfigError(
        f'--cpu_devices={requested!r} is not valid: use auto or a whole number >= 1'
      )
    if not several_processes:
      config_lib.validate_for_devices(config, count)
    return count
  if several_processes:
    return 1
  count = min(cores, MAX_AUTO)
  while count > 1 and not _fits(config, count):
    count -= 1
  return count


def _fits(config, count: int) -> bool:
  try:
    config_lib.validate_for_devices(config, count)
  except ConfigError:
    return False
  return True


def split_for(requested: str, config, cores: int | None = None, several_processes=False) -> str:
  """``choose`` then ``split_host_cpu``, on ``cores`` (default: the usable ones): what the
  main job, the export and the benchmarks do before JAX starts."""
  cores = cores or usable_cores()
  return split_host_cpu(choose(requested, config, cores, several_processes), cores)


def split_host_cpu(count: int, cores: int) -> str:
  """Makes the CPU backend ``count`` devices, single-threaded when they take every core;
  returns what was done (benchmarks note it). An ``XLA_FLAGS`` that already sets the device
  count is the user's choice and is kept."""
  if DEVICE_COUNT_FLAG in os.environ.get('XLA_FLAGS', ''):
    return f'CPU devices as XLA_FLAGS sets them ({DEVICE_COUNT_FLAG})'
  if count == 1:
    return 'CPU: one device, all cores'
  jax.config.update('jax_num_cpu_devices', count)
  if count >= cores:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + ONE_THREAD_FLAG).strip()
    return f'CPU: {count} single-threaded devices on {cores} cores'
  return f'CPU: {count} devices sharing {cores} cores'
