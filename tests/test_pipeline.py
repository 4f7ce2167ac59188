"""What every data set shares: the global batch of a step follows from (seed, step); each
process reads its own rows and together they are the one-process batch; reading ahead."""

import threading
import time

import jax
import numpy as np
import pytest

from pgnas_jax import config as config_lib
from pgnas_jax import data as data_lib
from pgnas_jax import errors, parallel
from pgnas_jax.data import placement, shards


def _dataset(n=64):
  rng = np.random.default_rng(0)
  split = lambda m: data_lib.Split(
    rng.integers(0, 256, (m, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, m).astype(np.int32)
  )
  return data_lib.Dataset(
    split(n), split(20), split(20), 10, np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
  )


def _augmented():
  c = config_lib.get_config().data
  c.pad_crop, c.random_flip, c.cutout = 4, True, 8
  return c


def test_an_epoch_reads_each_example_at_most_once():
  seen = np.concatenate([shards.global_batch(5, s, 100, 16)[2] for s in range(6)])
  assert len(seen) == 96 and len(set(seen)) == 96  # 6 steps of 16 from 100, 4 left out
  epoch, position, _ = shards.global_batch(5, 6, 100, 16)
  assert (epoch, position) == (1, 0)


def test_process_rows_are_disjoint_and_cover_the_batch():
  for count in (1, 2, 4, 8):
    rows = [shards.local_rows(64, i, count) for i in range(count)]
    assert np.concatenate([np.arange(64)[r] for r in rows]).tolist() == list(range(64))
  with pytest.raises(errors.ConfigError, match='does not split over 3 processes'):
    shards.local_rows(64, 0, 3)


def test_training_order_follows_the_seed():
  d, c = _dataset(), _augmented()
  a, b, other = ([d.train_batch(c, seed, s, 16)['images'] for s in range(4)] for seed in (0, 0, 1))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert all((x != z).any() for x, z in zip(a, other))


@pytest.mark.parametrize('count', [2, 4])
def test_process_rows_concatenate_to_the_one_process_batch(count):
  d, c = _dataset(), _augmented()
  for step in (0, 7):  # 7: the second epoch
    whole = d.train_batch(c, 3, step, 16)
    parts = [d.train_batch(c, 3, step, 16, i, count) for i in range(count)]
    for key in ('images', 'labels'):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  whole = list(d.eval_batches(d.test, 8))
  parts = [list(d.eval_batches(d.test, 8, i, count)) for i in range(count)]
  assert len(whole) == 3 and all(len(p) == 3 for p in parts)
  for j, batch in enumerate(whole):
    for key in ('images', 'labels', 'weights'):
      np.testing.assert_array_equal(np.concatenate([p[j][key] for p in parts]), batch[key])


def test_in_background_yields_in_order_and_raises_the_producers_error():
  assert list(data_lib.in_background(iter(range(50)), depth=3)) == list(range(50))

  def failing():
    yield 1
    raise ValueError('unreadable record')

  items = data_lib.in_background(failing())
  assert next(items) == 1
  with pytest.raises(ValueError, match='unreadable record'):
    next(items)


def test_in_background_stops_its_producer_when_left():
  produced, threads = [], []

  def endless():
    threads.append(threading.current_thread())
    i = 0
    while True:
      produced.append(i)
      yield i
      i += 1

  items = data_lib.in_background(endless(), depth=2)
  assert [next(items) for _ in range(3)] == [0, 1, 2]
  items.close()
  time.sleep(0.5)
  count = len(produced)
  time.sleep(0.3)
  assert len(produced) == count <= 3 + 2 + 2  # read, buffered, one being put
  assert threads[0] is not threading.current_thread() and not threads[0].is_alive()


def test_prefetch_to_mesh_places_every_batch_in_order():
  mesh = parallel.make_mesh(jax.devices()[:4])
  batches = [{'images': np.full((8, 2), i, np.float32)} for i in range(5)]
  placed = list(placement.prefetch_to_mesh(iter(batches), mesh, ahead=2))
  assert [int(b['images'][0, 0]) for b in placed] == list(range(5))
  assert all(b['images'].sharding == parallel.batch_sharded(mesh) for b in placed)
