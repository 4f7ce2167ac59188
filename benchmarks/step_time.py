"""Training step time of a super-network on the devices at hand, with what a scaling
projection needs: params, MACs per image (counted by ``space.costs``), XLA's FLOP count of the
compiled step and the bytes of the gradient all-reduce. Synthetic images: it times the step,
not the input pipeline. Prints one JSON line (process 0).

    python -m benchmarks.step_time [--batch=128] [--image=28,28,1] [--classes=10] \
        [--steps=20] [--config.FIELD=VALUE ...]
    # D-121 at 224: --config.model.family=densenet --image=224,224,3 --classes=1000
    # several processes: add --coordinator_address, --num_processes, --process_id
"""

import json
import os
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from pgnas_jax import parallel, supernets, train
from pgnas_jax import space as space_lib

_CONFIG = config_flags.DEFINE_config_file(
  'config', os.path.join(os.path.dirname(train.__file__), 'config.py'), 'Config file.'
)
_BATCH = flags.DEFINE_integer('batch', 128, 'Global batch.')
_IMAGE = flags.DEFINE_list('image', ['28', '28', '1'], 'Image height, width, channels.')
_CLASSES = flags.DEFINE_integer('classes', 10, 'Classes.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps, after two warm-up steps.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'As pgnas_jax.main.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'As pgnas_jax.main.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'As pgnas_jax.main.')


def main(argv):
  del argv
  parallel.initialize_distributed(
    False, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
  )
  config = _CONFIG.value
  image = tuple(int(x) for x in _IMAGE.value)
  batch_size = _BATCH.value
  mesh = parallel.make_mesh()
  model = supernets.build(config.model, _CLASSES.value)
  total = _STEPS.value + 2
  run = train.fixed_setup(config, total, total)
  state, space = train.initialise(model, config, image, run.tx, mesh)
  step_fn = train.make_train_step(model, space, config, run, mesh)
  rng = np.random.default_rng(0)
  batch = parallel.put_batch(
    {
      'images': rng.standard_normal((batch_size,) + image, dtype=np.float32),
      'labels': rng.integers(0, _CLASSES.value, batch_size).astype(np.int32),
    },
    mesh,
  )

  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  times = []
  for i in range(total):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics['loss'])
    if i >= 2:
      times.append(time.perf_counter() - start)
  params, macs = space_lib.costs(space, space.template)
  gradient = sum(int(np.size(x)) * x.dtype.itemsize for x in jax.tree.leaves(state.params))
  result = {
    'device': jax.devices()[0].device_kind,
    'devices': mesh.devices.size,
    'processes': jax.process_count(),
    'family': config.model.family,
    'image': image,
    'batch': batch_size,
    'compile_s': round(compile_s, 2),
    'step_s_median': statistics.median(times),
    'step_s_mean': statistics.mean(times),
    'step_s_min': min(times),
    'images_per_s': batch_size / statistics.median(times),
    'params': int(params),
    'macs_per_image': int(macs),
    'xla_flops_per_step': float(cost.get('flops', -1.0)) if cost else None,
    'gradient_bytes': gradient,
    'loss': float(metrics['loss']),
  }
  if parallel.is_main_process():
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main)
