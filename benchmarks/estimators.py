"""Gate estimators: compile time and time of one train step of a benchmark network per
estimator (``drop.estimator``).

    python benchmarks/estimators.py [--network default] [--steps 5] [--estimators concrete,...]

The project's ``train_step`` on a synthetic batch of 128, one device, mean of ``--steps``
steps after one warm-up. Writes ``results/estimators_train_step.{md,json}``.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--network', default='default')
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--estimators', default='')
  return p.parse_args()


def main():
  args = parse()
  from benchmarks import harness
  from pgnas_jax import estimators

  names = args.estimators.split(',') if args.estimators else list(estimators.NAMES)
  rows = []
  for name in names:
    config, model, shape, classes, _ = harness.network(args.network)
    config.drop.estimator = name
    t = harness.time_train_step(config, model, shape, classes, 128, args.steps, harness.mesh_of(1))
    rows.append(
      {
        'network': args.network,
        'estimator': name,
        'compile_s': t.compile_s,
        'step_ms': 1e3 * t.step_s,
      }
    )
    print(rows[-1], flush=True)
  harness.write_table(
    'estimators_train_step',
    'One train step per gate estimator (batch 128)',
    list(rows[0]),
    rows,
    f"The project's `train_step`, mean of {args.steps} steps after one warm-up, one device; "
    f'{args.network}: {harness.NETWORKS[args.network][3]}.',
  )


if __name__ == '__main__':
  main()
