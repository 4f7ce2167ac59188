"""Train-step speed: images/s, compile time, peak memory and achieved FLOP/s of the project's
jitted ``train_step`` (relaxed masks, negative ELBO, SGD on weights and drop logits).

    python benchmarks/train_step.py [--networks default,m32] [--dtypes float32]
                                    [--devices 1,4] [--batch 128] [--steps 10]

Achieved FLOP/s counts 3x the forward FLOPs per image (forward, input gradient, weight
gradient). On CPU, ``--devices 4`` runs on 4 simulated devices that share the same cores: it
shows that the sharded code path works, it is not a speed claim.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--networks', default='default,m32')
  p.add_argument('--dtypes', default='float32')
  p.add_argument('--devices', default='1,4')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--name', default='train_step', help='results/<name>.md and .json')
  return p.parse_args()


def measure(name, dtype, num_devices, batch_size, steps):
  from benchmarks import harness

  config, model, shape, classes, _ = harness.network(name, dtype)
  t = harness.time_train_step(
    config, model, shape, classes, batch_size, steps, harness.mesh_of(num_devices)
  )
  return {
    'network': name,
    'dtype': dtype,
    'devices': num_devices,
    'batch': batch_size,
    'compile_s': t.compile_s,
    'step_ms': 1e3 * t.step_s,
    'images_per_s': batch_size / t.step_s,
    'peak_memory_MiB': (t.peak_bytes or 0) / 2**20,
    'train_GFLOP_per_step': t.train_flops / 1e9,
    'achieved_GFLOP_per_s': t.train_flops / t.step_s / 1e9,
  }


def main():
  args = parse()
  devices = [int(d) for d in args.devices.split(',')]
  flag = f'--xla_force_host_platform_device_count={max(devices)}'
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()
  from benchmarks import harness

  rows = [
    measure(n, d, k, args.batch, args.steps)
    for n in args.networks.split(',')
    for d in args.dtypes.split(',')
    for k in devices
  ]
  harness.write_table(
    args.name,
    'Train step',
    list(rows[0]),
    rows,
    'Networks: '
    + '; '.join(f'{n}: {harness.NETWORKS[n][3]}' for n in args.networks.split(','))
    + '.',
  )


if __name__ == '__main__':
  main()
