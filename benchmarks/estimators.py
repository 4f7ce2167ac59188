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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--network', default='default')
  p.add_argument('--rounds', type=int, default=7)
  p.add_argument('--estimators', default='')
  return p.parse_args()


def main():
  args = parse()

  from benchmarks import harness
  from pgnas_jax import estimators
  from pgnas_jax.experiments import timing

  names = args.estimators.split(',') if args.estimators else list(estimators.NAMES)
  configs = {}
  for name in names:
    config, model, shape, classes, _ = harness.network(args.network)
    config.drop.estimator = name
    configs[name] = config
  batch = timing.synthetic_batch(128, shape, classes)
  times = timing.interleaved_step_times(configs, model, batch, args.rounds, harness.mesh_of(1))
  rows = [
    {
      'network': args.network,
      'estimator': name,
      **times[name],
      'vs_concrete': times[name]['step_ms'] / times[names[0]]['step_ms'],
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
