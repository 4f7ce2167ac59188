"""Batches on the devices: training batches read ahead and placed ahead of the step that uses
them, and evaluation splits placed once when held in memory or read again on every pass
when streamed. Each process reads its own rows of a global batch (``parallel.put_batch``
assembles them), or whole batches that every device holds (``parallel.put_replicated``)."""

import collections
from collections.abc import Callable, Iterable, Iterator

import jax
import ml_collections
from jax.sharding import Mesh

from pgnas_jax import parallel
from pgnas_jax.data.prefetch import in_background


def prefetch_to_mesh(
  batches: Iterable[dict], mesh: Mesh, ahead: int = 1, whole: bool = False
) -> Iterator[dict]:
  """Yields ``batches`` placed on the mesh (this process's rows, or ``whole`` batches on
  every device), with the next ``ahead`` already placed: placement is asynchronous, so their
  copies overlap the computation that uses the current one."""
  place = parallel.put_replicated if whole else parallel.put_batch
  placed = collections.deque()
  for batch in batches:
    placed.append(place(batch, mesh))
    if len(placed) > ahead:
      yield placed.popleft()
  while placed:
    yield placed.popleft()


def train_batches(
  dataset, data: ml_collections.ConfigDict, seed: int, steps: range, batch_size: int, mesh: Mesh
) -> Iterator[dict]:
  """The batches of training steps ``steps`` (``dataset.train_batch``), this process's rows
  of each, read ahead in the background and placed ahead, sharded over the mesh: what
  training and fine-tuning step through."""
  return prefetch_to_mesh(
    in_background(
      dataset.train_batch(data, seed, step, batch_size, jax.process_index(), jax.process_count())
      for step in steps
    ),
    mesh,
  )


class _Passes:
  """Batches read again on every pass (``iter`` starts a new one)."""

  def __init__(self, start: Callable):
    self._start = start

  def __iter__(self):
    return self._start()


def _placed(dataset, batches: Callable, mesh: Mesh, whole: bool):
  """Placed once and reused when the data set is held in memory; read again on every pass,
  ahead in the background, when it is streamed (ImageNet)."""
  if dataset.in_memory:
    place = parallel.put_replicated if whole else parallel.put_batch
    return [place(b, mesh) for b in batches()]
  return _Passes(lambda: prefetch_to_mesh(in_background(batches()), mesh, whole=whole))


def device_batches(split, dataset, batch_size: int, mesh: Mesh):
  """A split as padded batches, their rows split over the devices, each process reading its
  own rows: for scoring one network."""
  return _placed(
    dataset,
    lambda: dataset.eval_batches(split, batch_size, jax.process_index(), jax.process_count()),
    mesh,
    whole=False,
  )


def replicated_batches(split, dataset, batch_size: int, mesh: Mesh):
  """A split as padded batches, each whole on every device, every process reading whole
  batches: for chunks of candidates split over the devices."""
  return _placed(dataset, lambda: dataset.eval_batches(split, batch_size), mesh, whole=True)
