"""Generators and samplers: time to draw a chunk of candidate masks per JAX PRNG
implementation (``rng.impl``) and candidate sampler (``search.sampler``), and one train step
of the default network per implementation.

    python benchmarks/sampling.py [--networks default,ei] [--chunk 16] [--repeats 20]
                                  [--train_steps 5] [--impls threefry2x32,...]

Masks are drawn by ``search.draw_candidates`` (jitted, as the search draws them) for
candidates 0..chunk-1 of the network's mask template at p = 0.1; a train step is the
project's ``train_step`` on a synthetic batch of 128. One device. Writes
``results/sampling_masks.{md,json}`` and ``results/sampling_train_step.{md,json}``.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--networks', default='default,ei')
  p.add_argument('--impls', default='')
  p.add_argument('--samplers', default='')
  p.add_argument('--chunk', type=int, default=16)
  p.add_argument('--repeats', type=int, default=20)
  p.add_argument('--train_steps', type=int, default=5)
  p.add_argument('--train_network', default='default', help="'' skips the train step")
  p.add_argument('--name', default='sampling', help='results/<name>_*.md and .json')
  return p.parse_args()


def _ei():
  from pgnas_jax import config as config_lib

  c = config_lib.get_config()
  c.model.family, c.model.enas.filters = 'enas', 72  # SupNet-EI, as configs/cifar10_ei.py
  return c


def template_of(name: str):
  """(mask template, searchable channels) of a benchmark network, from shapes alone."""
  import jax

  from benchmarks import harness
  from pgnas_jax import supernets
  from pgnas_jax.experiments import timing

  if name == 'ei':
    config, shape, classes = _ei(), (32, 32, 3), 10
    model = supernets.build(config.model, classes)
  else:
    config, model, shape, classes, _ = harness.network(name)
  template = timing.mask_template(model, shape)
  return template, sum(int(m.shape[-1]) for m in jax.tree.leaves(template))


def time_train_step(impl: str, network: str, steps: int) -> float:
  from benchmarks import harness

  config, model, shape, classes, _ = harness.network(network)
  config.rng.impl = impl
  t = harness.time_train_step(config, model, shape, classes, 128, steps, harness.mesh_of(1))
  return t.step_s


def main():
  args = parse()
  from benchmarks import harness
  from pgnas_jax import rng, samplers
  from pgnas_jax.experiments import timing

  impls = args.impls.split(',') if args.impls else list(rng.IMPLEMENTATIONS)
  names = args.samplers.split(',') if args.samplers else list(samplers.NAMES)
  rows = []
  for network in args.networks.split(','):
    template, channels = template_of(network)
    for impl in impls:
      row = {'network': network, 'channels': channels, 'impl': impl}
      for name in names:
        sampler = samplers.Sampler(name, 16 if name == 'stratified' else 0)
        seconds = timing.mask_draw_seconds(template, impl, sampler, args.chunk, args.repeats)
        row[f'{name}_ms'] = 1e3 * seconds
      rows.append(row)
      print(row, flush=True)
  harness.write_table(
    f'{args.name}_masks',
    f'Drawing {args.chunk} candidate masks (ms per chunk)',
    list(rows[0]),
    rows,
    f'default: {harness.NETWORKS["default"][3]}; ei: SupNet-EI (ENAS cell, 72 filters), '
    '32x32x3. stratified: blocks of 16. Compiled `search.draw_candidates`, mean '
    f'of {args.repeats} calls after one warm-up, one device.',
  )
  if not args.train_network:
    return
  steps = [
    {
      'network': args.train_network,
      'impl': impl,
      'step_ms': 1e3 * time_train_step(impl, args.train_network, args.train_steps),
    }
    for impl in impls
  ]
  harness.write_table(
    f'{args.name}_train_step',
    'One train step per generator (ms, batch 128)',
    list(steps[0]),
    steps,
    f"The project's `train_step`, mean of {args.train_steps} steps after one warm-up, one device.",
  )


if __name__ == '__main__':
  main()
