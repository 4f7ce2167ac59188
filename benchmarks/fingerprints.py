"""Fingerprints of tiny runs: the hashes of what each family's main job writes, to show that
a change of the code's shape changed no result (issue 27).

    python benchmarks/fingerprints.py [--devices 1,4] [--runs shake_shake,enas,...]

runs the main job of each family (and the custom-module example) at a tiny size on a few
thousand Fashion-MNIST images, on 1 and on 4 CPU devices, each in a new process, and prints
the SHA-256 (first 16 hex digits) of ``config.json``, ``metrics.jsonl``, ``posterior.json``,
``search/candidates.jsonl``, ``search/arch.json`` and the winner's weights, latency off.
Run it before and after a change on the same machine and compare the tables: float rounding
differs between CPUs (docs/benchmarks.md), so fingerprints carry within one machine only.
Writes ``benchmarks/results/<--name>.md`` and ``.json``.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'benchmarks', 'results')
FILES = (
  'config.json',
  'metrics.jsonl',
  'posterior.json',
  'search/candidates.jsonl',
  'search/arch.json',
  'search/winner_weights.msgpack',
)
TINY = {  # every family's run: a few steps and candidates, no latency timing
  'data.validation_size': 500,
  'train.num_steps': 6,
  'train.log_every_steps': 3,
  'train.batch_size': 32,
  'search.num_candidates': 6,
  'search.chunk_size': 4,
  'search.eval_batch_size': 100,
  'export.latency': False,
}
FAMILIES = {  # the smallest network of each family that keeps every kind of layer it has
  'shake_shake': {'model.shake_shake.stem_width': 4, 'model.shake_shake.widths': '(4,8)'},
  'enas': {'model.enas.filters': 4, 'model.enas.normal_cells_per_stage': 1},
  'resnet': {
    'model.resnet.stem_width': 8,
    'model.resnet.widths': '(8,16)',
    'model.resnet.blocks_per_stage': '(1,1)',
    'model.resnet.kernel_sizes': '(1,3)',
    'model.resnet.dilations': '(1,1)',
  },
  'densenet': {
    'model.densenet.stem_width': 8,
    'model.densenet.blocks': '(1,1)',
    'model.densenet.growth_rate': 4,
    'model.densenet.bottleneck_width': 8,
  },
}
CUSTOM = 'custom_example'


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--devices', default='1,4', help='CPU device counts to run on')
  p.add_argument('--runs', default=','.join([*FAMILIES, CUSTOM]))
  p.add_argument('--name', default='fingerprints', help='results/<name>.md and .json')
  return p.parse_args()


def _environment(devices: int) -> dict:
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  flags.append(f'--xla_force_host_platform_device_count={devices}')
  return {**os.environ, 'XLA_FLAGS': ' '.join(flags), 'PYTHONPATH': ROOT}


def _command(run: str, workdir: str, devices: int) -> list[str]:
  if run == CUSTOM:
    npz = os.path.join(os.path.dirname(workdir), 'fashion_mnist.npz')
    return [
      *(sys.executable, '-m', 'examples.search_fashion_npz', f'--workdir={workdir}'),
      *(f'--npz={npz}', '--train_images=2000', '--test_images=500', '--validation_images=500'),
      *('--batch_size=32', '--steps=6', '--candidates=6', '--eval_batch_size=100'),
    ]
  fields = {**TINY, 'model.family': run, **FAMILIES[run]}
  overrides = [f'--config.{k}={v}' for k, v in fields.items()]
  return [
    *(sys.executable, '-m', 'pgnas_jax.main', f'--workdir={workdir}'),
    f'--cpu_devices={devices}',
    *overrides,
  ]


def _digest(path: str) -> str:
  if not os.path.exists(path):
    return 'missing'
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def main():
  args = parse()
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    for run in args.runs.split(','):
      for devices in (int(d) for d in args.devices.split(',')):
        workdir = os.path.join(scratch, f'{run}_{devices}')
        done = subprocess.run(
          _command(run, workdir, devices),
          cwd=ROOT,
          env=_environment(devices),
          capture_output=True,
          text=True,
        )
        if done.returncode:
          sys.exit(f'{run} on {devices} devices failed:\n{done.stderr[-3000:]}')
        row = {'run': run, 'devices': devices}
        row.update({name: _digest(os.path.join(workdir, name)) for name in FILES})
        rows.append(row)
        print(run, devices, ' '.join(row[name] for name in FILES), flush=True)
  header = ['run', 'devices', *FILES]
  table = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  table += ['| ' + ' | '.join(str(r[k]) for k in header) + ' |' for r in rows]
  text = '### Fingerprints of tiny runs\n\n' + '\n'.join(table) + '\n'
  print(text)
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f'{args.name}.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(RESULTS, f'{args.name}.json'), 'w') as f:
    json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
