"""The ranking chunk that fits a device (issue 29): the chunk scorer's memory per candidate at
the configs' full size, and what that leaves room for on an accelerator.

    python -m benchmarks.scorer_memory [--networks=d121,r50] [--candidates=1,2,4] [--quick]

For each network (``configs/imagenet_d121.py``, ``configs/imagenet_r50.py``), on one CPU
device, ``search.make_chunk_scorer`` (what ranking runs) is compiled for the config's
evaluation batch (``search.eval_batch_size``, images at the config's size) and 1, 2 and 4
candidates per device, from shapes only (nothing is initialised or run), and XLA's memory
analysis gives its arguments and temporaries. One candidate is scored with its mask folded
into the kernels, more are vmapped; the temporaries grow by the same amount per vmapped
candidate (the slope between 2 and 4), which is what ``search.chunk_size='auto'`` measures
on the device itself at run time (``Scorer.auto_chunk_size``: 2 minus 1). From the slope:
the candidates per device whose activations fit ``search.MEMORY_SHARE`` of an 80 GB and a
141 GB GPU and a 95 GB TPU v5p chip, if their compilers assign buffers as XLA:CPU does (an
assumption, as in docs/scaling.md). Writes ``benchmarks/results/scorer_memory.{md,json}``
(``--quick``: the rehearsal's toy networks, ``scorer_memory_quick``).
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from benchmarks import harness
from benchmarks.rehearsal import QUICK, config_of, cpu_name
from pgnas_jax import layers, parallel, search, supernets

DEVICE_GIB = {'80 GB GPU': 80e9, '141 GB GPU': 141e9, '95 GB TPU v5p': 95e9}


def _shapes(tree, sharding):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def measure(network: str, candidates: tuple, quick: bool = False) -> dict:
  config = config_of(network, QUICK if quick else {})
  size = config.data.image_size
  batch_size = config.search.eval_batch_size
  model = supernets.build(config.model, 1000)
  mesh = harness.mesh_of(1)
  replicated = parallel.replicated(mesh)
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  weights = _shapes(
    {'params': variables['params'], 'batch_stats': variables['batch_stats']}, replicated
  )
  batch = _shapes(
    {
      'images': jnp.zeros((batch_size, size, size, 3), jnp.float32),
      'labels': jnp.zeros((batch_size,), jnp.int32),
      'weights': jnp.zeros((batch_size,), jnp.float32),
    },
    replicated,
  )
  scorer = search.make_chunk_scorer(model, mesh, config.model.compute_dtype)
  rows = {}
  for k in candidates:
    masks = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct((k,) + m.shape, jnp.float32, sharding=replicated),
      variables[layers.MASKS],
    )
    start = time.perf_counter()
    compiled = scorer.lower(weights, masks, batch).compile()
    memory = compiled.memory_analysis()
    rows[k] = {
      'compile_s': time.perf_counter() - start,
      'argument_mib': memory.argument_size_in_bytes / 2**20,
      'temp_mib': memory.temp_size_in_bytes / 2**20,
    }
    print(network, k, rows[k], flush=True)
  many = sorted(k for k in candidates if k > 1)
  slope = (rows[many[-1]]['temp_mib'] - rows[many[0]]['temp_mib']) / (many[-1] - many[0])
  fits = {}
  for name, capacity in DEVICE_GIB.items():
    room = search.MEMORY_SHARE * capacity / 2**20 - rows[1]['argument_mib']
    fits[name] = int(room // slope)
  return {
    'network': network,
    'image_size': size,
    'eval_batch_size': batch_size,
    'by_candidates': rows,
    'temp_mib_per_candidate': slope,
    'temp_mib_per_candidate_per_image': slope / batch_size,
    'candidates_per_device': fits,
  }


def write(name: str, results: list) -> str:
  rows = []
  for r in results:
    by_k = r['by_candidates']
    rows.append(
      {
        'network': r['network'],
        'eval batch, image size': f'{r["eval_batch_size"]}, {r["image_size"]}',
        'arguments MiB': by_k[1]['argument_mib'],
        'temporaries MiB by candidates per device': ', '.join(
          f'{k}: {v["temp_mib"]:,.0f}' for k, v in by_k.items()
        ),
        'compile s by candidates': ', '.join(f'{k}: {v["compile_s"]:.0f}' for k, v in by_k.items()),
        'MiB per vmapped candidate': r['temp_mib_per_candidate'],
        'MiB per candidate per image': r['temp_mib_per_candidate_per_image'],
        **{
          f'candidates per device, {name} ({search.MEMORY_SHARE:.0%} of it)': n
          for name, n in r['candidates_per_device'].items()
        },
      }
    )
  notes = (
    f'{cpu_name()}, jax {jax.__version__}; one CPU device, compiled from shapes; float32. '
    'Projections assume the accelerator compilers assign buffers as XLA:CPU does.'
  )
  return harness.write_table(name, 'The chunk scorer at full size', list(rows[0]), rows, notes)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m benchmarks.scorer_memory')
  parser.add_argument('--networks', default='d121,r50')
  parser.add_argument('--candidates', default='1,2,4')
  parser.add_argument('--quick', action='store_true', help="the rehearsal's toy sizes")
  args = parser.parse_args(argv)
  candidates = tuple(int(k) for k in args.candidates.split(','))
  if 1 not in candidates or len([k for k in candidates if k > 1]) < 2:
    parser.error('--candidates needs 1 and two counts above 1 (the slope)')
  name = 'scorer_memory_quick' if args.quick else 'scorer_memory'
  results = [measure(n, candidates, args.quick) for n in args.networks.split(',')]
  write(name, results)
  with open(os.path.join(harness.RESULTS, name + '.json'), 'w') as f:
    json.dump(results, f, indent=1, default=float)


if __name__ == '__main__':
  main()
