"""Which layout ranks candidates faster: the validation batch split over the devices (every
device scores every candidate of a chunk on its rows) or the chunk's candidates split over the
devices (every device scores its candidates on the whole batch; what
``search.make_chunk_scorer`` does, chosen by this measurement). Default super-network, random
weights (speed does not depend on them), Fashion-MNIST-sized images. Prints candidates/s of
each, as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m benchmarks.ranking_layout
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pgnas_jax import config as config_lib
from pgnas_jax import masks as masks_lib
from pgnas_jax import parallel, search, supernets

_CHUNK = flags.DEFINE_integer(
  'chunk', 8, 'Candidates scored at once (a multiple of the device count).'
)
_BATCH = flags.DEFINE_integer('batch', 100, 'Validation batch.')
_IMAGES = flags.DEFINE_integer('images', 1000, 'Validation images.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed chunks, after one warm-up.')


def _rows_split_scorer(model, mesh):
  """The other layout: every candidate on every device, the batch's rows sharded."""

  def score(variables, masks, batch):
    def one(mask):
      logits = model.apply({**variables, 'masks': mask}, batch['images'], train=False)
      return search._batch_scores(logits, batch)

    return jax.vmap(one)(masks)

  replicated = parallel.replicated(mesh)
  return jax.jit(
    score,
    in_shardings=(replicated, replicated, parallel.batch_sharded(mesh)),
    out_shardings=replicated,
  )


def _time(scorer, variables, masks, batches) -> float:
  search.evaluate(scorer, (variables, masks), batches)  # compiles
  start = time.perf_counter()
  for _ in range(_REPEATS.value):
    search.evaluate(scorer, (variables, masks), batches)
  return (time.perf_counter() - start) / _REPEATS.value


def main(argv):
  del argv
  config = config_lib.get_config()
  mesh = parallel.make_mesh()
  model = supernets.build(config.model, 10)
  images = np.zeros((1, 28, 28, 1), np.float32)
  variables = jax.jit(lambda k: model.init({'params': k}, images, train=False))(jax.random.key(0))
  template = variables['masks']
  logits = masks_lib.init_drop_logits(template, 0.1)
  masks = jax.device_get(
    masks_lib.candidate_masks(jax.random.key(1), jnp.arange(_CHUNK.value), logits, template)
  )
  variables = parallel.put_replicated(
    {'params': variables['params'], 'batch_stats': variables['batch_stats']}, mesh
  )
  rng = np.random.default_rng(0)
  n = _IMAGES.value
  batches = []
  for _ in range(0, n, _BATCH.value):
    batch = {
      'images': rng.standard_normal((_BATCH.value, 28, 28, 1), dtype=np.float32),
      'labels': rng.integers(0, 10, _BATCH.value).astype(np.int32),
      'weights': np.ones(_BATCH.value, np.float32),
    }
    batches.append(batch)
  split_batch = [parallel.put_batch(b, mesh) for b in batches]
  whole_batch = [parallel.put_replicated(b, mesh) for b in batches]
  chunk = _CHUNK.value
  seconds = {
    'validation rows split': _time(_rows_split_scorer(model, mesh), variables, masks, split_batch),
    'candidates split': _time(
      search.make_chunk_scorer(model, mesh, 'float32'), variables, masks, whole_batch
    ),
  }
  print(
    json.dumps(
      {
        'devices': mesh.devices.size,
        'chunk': chunk,
        'batch': _BATCH.value,
        'images': n,
        **{k: round(chunk / s, 3) for k, s in seconds.items()},
      }
    )
  )


if __name__ == '__main__':
  app.run(main)
