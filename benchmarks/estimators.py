"""Gate estimators: compile time and time of one train step of a benchmark network per
estimator (``drop.estimator``).

    python benchmarks/estimators.py [--network default] [--rounds 7] [--estimators concrete,...]

The project's ``train_step`` on a synthetic batch of 128, one device. Every estimator's step
is compiled first; then each round times one step of each in turn, so that a change of the
machine's load falls on all of them alike; the table holds the median over the rounds (after
one warm-up round). Writes ``results/estimators_train_step.{md,json}``.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--network', default='default')
  p.add_argument('--rounds', type=int, default=7)
  p.add_argument('--estimators', default='')
  return p.parse_args()


def main():
  args = parse()
  import jax
  import numpy as np

  from benchmarks import harness
  from pgnas_jax import estimators, parallel

  names = args.estimators.split(',') if args.estimators else list(estimators.NAMES)
  mesh = harness.mesh_of(1)
  steps, compile_s = {}, {}
  for name in names:
    config, model, shape, classes, _ = harness.network(args.network)
    config.drop.estimator = name
    state, _, step = harness.train_state(config, model, shape, mesh)
    data = harness.synthetic_batch(128, shape, classes)
    batch = parallel.put_batch({'images': data['images'], 'labels': data['labels']}, mesh)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s[name] = time.perf_counter() - start
    steps[name] = [compiled, state, batch]
  seconds = {name: [] for name in names}
  for _ in range(args.rounds + 1):  # the first round warms up
    for name, holder in steps.items():
      start = time.perf_counter()
      holder[1], metrics = holder[0](holder[1], holder[2])
      jax.block_until_ready(metrics['loss'])
      seconds[name].append(time.perf_counter() - start)
  rows = [
    {
      'network': args.network,
      'estimator': name,
      'compile_s': compile_s[name],
      'step_ms': 1e3 * float(np.median(seconds[name][1:])),
      'vs_concrete': float(np.median(seconds[name][1:]) / np.median(seconds[names[0]][1:])),
    }
    for name in names
  ]
  harness.write_table(
    'estimators_train_step',
    'One train step per gate estimator (batch 128)',
    list(rows[0]),
    rows,
    f"The project's `train_step`, median of {args.rounds} rounds (one step of each estimator "
    f'per round, after a warm-up round), one device; `vs_concrete`: step time over the first '
    f"estimator's; {args.network}: {harness.NETWORKS[args.network][3]}.",
  )


if __name__ == '__main__':
  main()
