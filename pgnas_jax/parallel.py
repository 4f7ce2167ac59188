"""Processes, the device mesh and the placement of state and batches on it.

Data parallelism the modern way: one ``'data'`` mesh axis over every device of every
process; the train state is replicated, batches are sharded along their leading axis, and
``jax.jit`` turns the global-batch mean into an all-reduce. Results do not depend on the
device or process count beyond float reduction order.

Several processes (hosts of a TPU pod or GPU cluster, or processes on one machine) join
through ``jax.distributed``. Every process runs the same program on the same global arrays;
each one feeds its own rows of a global batch, and only process 0 writes files.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pgnas_jax.errors import ConfigError

DATA_AXIS = 'data'


def initialize_distributed(
  from_environment: bool,
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
) -> None:
  """Joins this process to a multi-process run before JAX touches a device.

  With ``coordinator_address``, ``num_processes`` and ``process_id`` all given, they are
  used as they are; with none of them and ``from_environment``, JAX reads the cluster's
  environment (Cloud TPU pods, SLURM, Open MPI); with none and not ``from_environment``, the
  run is a single process and nothing happens.
  """
  explicit = {
    '--coordinator_address': coordinator_address,
    '--num_processes': num_processes,
    '--process_id': process_id,
  }
  given = [name for name, value in explicit.items() if value is not None]
  if given and len(given) < len(explicit):
    missing = ', '.join(name for name in explicit if name not in given)
    raise ConfigError(
      f'{", ".join(given)} given without {missing}: pass all three, or none '
      f'of them with --distributed to read them from the cluster environment'
    )
  if given:
    if num_processes < 1:
      raise ConfigError(f'--num_processes={num_processes} is out of range: it must be >= 1')
    if not 0 <= process_id < num_processes:
      raise ConfigError(
        f'--process_id={process_id} is out of range: it must be in '
        f'[0, {num_processes - 1}] for --num_processes={num_processes}'
      )
    if ':' not in coordinator_address:
      raise ConfigError(
        f'--coordinator_address={coordinator_address!r} has no port: use '
        f'HOST:PORT, the address of process 0'
      )
  elif not from_environment:
    return
  # CPU devices of different processes reduce through gloo (GPUs and TPUs ignore this).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def is_main_process() -> bool:
  """Process 0 writes every file of the workdir; the others only compute."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process got here (nothing to wait for with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process when ``flag`` is true on any of them, so that all take the same
  branch (a SIGTERM may reach one host first)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def min_over_processes(value: int) -> int:
  """The smallest of every process's ``value``, on every process, so that all choose the
  same (free memory differs between hosts)."""
  if jax.process_count() == 1:
    return value
  return int(np.min(multihost_utils.process_allgather(np.array(value))))


def make_mesh(devices=None) -> Mesh:
  """A 1-D 'data' mesh over ``devices`` (default: every device of every process), ordered by
  process, so that process p's devices hold one contiguous block of a batch's rows."""
  devices = jax.devices() if devices is None else list(devices)
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Places a global batch sharded over the data axis from this process's rows of it: block
  ``process_index`` of ``process_count`` equal blocks (the data layer reads just those), the
  rows its devices hold on a ``make_mesh`` mesh."""
  sharding = batch_sharded(mesh)
  n, count = mesh.devices.size, jax.process_count()
  placed = {}
  for name, value in batch.items():
    value = np.asarray(value)
    rows = value.shape[0] * count
    if rows % n:
      raise ValueError(
        f'batch field {name!r} has {rows} rows, not a multiple of the {n} '
        f'devices: choose batch sizes divisible by the device count'
      )
    placed[name] = jax.make_array_from_process_local_data(
      sharding, value, (rows,) + value.shape[1:]
    )
  return placed


def put_split(tree, mesh: Mesh):
  """A tree that every process holds whole (the same on each), split along its leading axis
  over the devices."""
  sharding = batch_sharded(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def put_replicated(tree, mesh: Mesh):
  """A copy of ``tree`` on every device of the mesh. Leaves go through the host, since a
  process cannot place its device arrays on devices of other processes; typed keys travel
  as their key data."""
  sharding = replicated(mesh)

  def put(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(jax.device_get(x)), sharding)

  return jax.tree.map(put, tree)
