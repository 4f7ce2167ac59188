"""The device mesh and the placement of state and batches on it.

Data parallelism the modern way: one ``'data'`` mesh axis over every device of every
process; the train state is replicated, batches are sharded along their leading axis, and
``jax.jit`` turns the global-batch mean into an all-reduce. Results do not depend on the
device count beyond float reduction order.
"""
import collections
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A 1-D 'data' mesh over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Places this process's part of a global batch, sharded over the data axis."""
  sharding = batch_sharded(mesh)
  n = mesh.devices.size
  for name, value in batch.items():
    if value.shape[0] % n:
      raise ValueError(f'batch field {name!r} has {value.shape[0]} rows, not a multiple of '
                       f'the {n} devices: choose batch sizes divisible by the device count')
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def prefetch_to_mesh(batches: Iterable[dict], mesh: Mesh, ahead: int = 1) -> Iterator[dict]:
  """Yields ``batches`` placed on the mesh, with the next ``ahead`` already placed: placement
  is asynchronous, so their copies overlap the step that uses the current one."""
  placed = collections.deque()
  for batch in batches:
    placed.append(put_batch(batch, mesh))
    if len(placed) > ahead:
      yield placed.popleft()
  while placed:
    yield placed.popleft()


def put_replicated(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))
