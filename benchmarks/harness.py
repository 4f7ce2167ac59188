"""What the benchmark scripts share: the networks they time, synthetic inputs, the timing
loop, FLOP counts and the tables they print and write (JSON and markdown).

Every number comes from the project's own code paths (``train.make_train_step``,
``search.make_chunk_scorer``), on synthetic images of the network's input shape: speed does
not depend on pixel values. Timings block on the result of every call.
"""

import json
import os
import time
from typing import NamedTuple

import jax

from pgnas_jax import config as config_lib
from pgnas_jax import parallel, supernets
from pgnas_jax import space as space_lib
from pgnas_jax.experiments import timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'benchmarks', 'results')


def _config_file(name: str):
  return config_lib.read_config_file(os.path.join(ROOT, 'configs', name + '.py')).get_config()


def _m32():
  c = config_lib.get_config()
  c.model.shake_shake.update({'stem_width': 16, 'widths': (32, 64, 128), 'blocks_per_stage': 2})
  return c


def _d121():
  c = config_lib.get_config()
  c.model.family = 'densenet'  # the model.densenet defaults are DenseNet-121's
  return c


# name -> (config with the model, input shape of one image, classes, description)
NETWORKS = {
  'default': (
    config_lib.get_config,
    (28, 28, 1),
    10,
    'the embedded default (SupNet-M family, 16/32/64, 1 block per stage), 28x28x1',
  ),
  'm32': (
    _m32,
    (32, 32, 3),
    10,
    'SupNet-M shape at width 32 (32/64/128), 2 blocks per stage, 32x32x3',
  ),
  'mi': (
    lambda: _config_file('cifar10_mi'),
    (32, 32, 3),
    10,
    'SupNet-MI (shake-shake 26 2x160d), 32x32x3',
  ),
  'd121': (_d121, (224, 224, 3), 1000, 'SupNet-D-121, 224x224x3'),
}


def network(name: str, compute_dtype: str = 'float32'):
  """(config, model, image shape, classes, description) of a named benchmark network."""
  make, shape, classes, description = NETWORKS[name]
  config = make()
  config.model.compute_dtype = compute_dtype
  return config, supernets.build(config.model, classes), shape, classes, description


# shared with the sampling study (pgnas_jax/experiments/timing.py)
synthetic_batch = timing.synthetic_batch
train_state = timing.train_state
timed = timing.timed


class StepTiming(NamedTuple):
  compile_s: float
  step_s: float
  train_flops: int  # per step: 3 x the forward FLOPs of the batch
  temp_bytes: int  # the compiled step's temporaries (per device)
  peak_bytes: int | None  # see peak_memory_bytes


def time_train_step(
  config, model, shape: tuple, classes: int, batch_size: int, steps: int, mesh
) -> StepTiming:
  """Compiles the project's ``train_step`` for a synthetic batch and times ``steps`` steps
  after one warm-up."""
  state, space, step = train_state(config, model, shape, mesh)
  data = synthetic_batch(batch_size, shape, classes)
  batch = parallel.put_batch({'images': data['images'], 'labels': data['labels']}, mesh)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  holder = [state]

  def one_step():
    holder[0], metrics = compiled(holder[0], batch)
    return metrics['loss']

  seconds = timed(one_step, steps)
  return StepTiming(
    compile_s,
    seconds,
    3 * forward_flops(space) * batch_size,
    int(compiled.memory_analysis().temp_size_in_bytes),
    peak_memory_bytes(compiled),
  )


def forward_flops(space: space_lib.SearchSpace) -> int:
  """FLOPs of one image through the full super-network: 2 per multiply-accumulate of its
  conv and dense layers (BatchNorm, activations and masks not counted)."""
  return 2 * int(space_lib.costs(space, space.template)[1])


def peak_memory_bytes(compiled=None):
  """Peak device memory in use where the backend reports it (GPU, TPU); on CPU, the
  compiled program's arguments, outputs and temporaries (``memory_analysis``)."""
  stats = jax.devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use'])
  if compiled is None:
    return None
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def device_description() -> str:
  d = jax.devices()
  return f'{len(d)} x {d[0].device_kind} ({d[0].platform}), jax {jax.__version__}'


def write_table(name: str, title: str, columns: list, rows: list, notes: str = '') -> str:
  """Prints a markdown table and writes it as ``results/<name>.md`` and ``.json``;
  returns the markdown."""
  os.makedirs(RESULTS, exist_ok=True)
  fmt = lambda v: (
    f'{v:,.3g}'
    if isinstance(v, float) and abs(v) < 100
    else (f'{v:,.0f}' if isinstance(v, (int, float)) else str(v))
  )
  lines = [
    f'### {title}',
    '',
    f'Device: {device_description()}.',
    '',
    '| ' + ' | '.join(columns) + ' |',
    '|' + '---|' * len(columns),
  ]
  lines += ['| ' + ' | '.join(fmt(r[c]) for c in columns) + ' |' for r in rows]
  if notes:
    lines += ['', notes]
  text = '\n'.join(lines) + '\n'
  print(text, flush=True)
  with open(os.path.join(RESULTS, name + '.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(RESULTS, name + '.json'), 'w') as f:
    json.dump({'title': title, 'device': device_description(), 'rows': rows}, f, indent=1)
  return text


def mesh_of(num_devices: int):
  return parallel.make_mesh(jax.devices()[:num_devices])
