"""Export speed: the compact network against the full super-network, per family and share of
channels dropped, with the FLOPs ratio beside the measured speed-up.

    python benchmarks/export_speed.py [--shares 0.25,0.5,0.75] [--batch 128] [--windows 5]

Every searchable group drops exactly that share of its input channels (chosen at random,
seed 0); the compact network (``pgnas_jax.compact``) is built from the mask. Each network is
jitted, warmed up, then timed in ``--windows`` windows of ``--calls`` calls; the table gives
the best window's median (the machine is shared: the best window is the least disturbed).
The default family is the embedded default network on Fashion-MNIST's shape; the others
are small members of their family on 32x32x3 (full sizes do not fit a CPU benchmark).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from pgnas_jax import compact, supernets  # noqa: E402
from pgnas_jax import config as config_lib  # noqa: E402
from pgnas_jax import space as space_lib  # noqa: E402

FAMILIES = {  # name -> (model fields, image shape, classes)
  'shake_shake (default)': ('shake_shake', {}, (28, 28, 1), 10),
  'resnet': (
    'resnet',
    dict(stem_width=16, widths=(16, 32), blocks_per_stage=(1, 1)),
    (32, 32, 3),
    10,
  ),
  'densenet': (
    'densenet',
    dict(stem_width=16, blocks=(3, 3), growth_rate=12, bottleneck_width=48),
    (32, 32, 3),
    10,
  ),
  'enas': ('enas', dict(filters=8, normal_cells_per_stage=1), (32, 32, 3), 10),
}


def _model(family, fields, classes):
  c = config_lib.get_config()
  c.model.family = family
  c.model[family].update(fields)
  return supernets.build(c.model, classes)


def share_mask(template, share: float, seed: int = 0):
  """Each group drops exactly ``round(share * channels)`` channels, chosen at random."""
  rng = np.random.default_rng(seed)

  def leaf(m):
    n = m.shape[-1]
    keep = np.ones(n, np.float32)
    keep[rng.choice(n, int(round(share * n)), replace=False)] = 0
    return keep

  return jax.tree.map(leaf, template)


def best_median_ms(fn, args, windows: int, calls: int) -> float:
  compiled = jax.jit(fn).lower(*args).compile()
  for _ in range(3):
    jax.block_until_ready(compiled(*args))
  best = float('inf')
  for _ in range(windows):
    times = []
    for _ in range(calls):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - start)
    best = min(best, statistics.median(times))
  return 1000 * best


def measure(args) -> list:
  rows = []
  for name, (family, fields, shape, classes) in FAMILIES.items():
    model = _model(family, fields, classes)
    variables = jax.jit(
      lambda k, m=model, s=shape: m.init({'params': k}, jnp.zeros((1,) + s), train=False)
    )(jax.random.key(0))
    space = space_lib.from_variables(variables)
    weights = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
    images = np.random.default_rng(1).standard_normal((args.batch,) + shape).astype(np.float32)
    full_ms = best_median_ms(
      lambda w, x, m=model: m.apply(w, x, train=False), (weights, images), args.windows, args.calls
    )
    full_macs = int(space_lib.costs(space, space.template)[1])
    for share in args.shares:
      mask = share_mask(space.template, share)
      net = compact.build(model, weights, mask, shape)
      ms = best_median_ms(
        compact.inference_fn(net), (net.weights, images), args.windows, args.calls
      )
      flops_ratio = full_macs / compact.macs(net)
      rows.append(
        {
          'family': name,
          'dropped': f'{share:.0%}',
          'full MACs': full_macs,
          'compact MACs': compact.macs(net),
          'FLOPs ratio': flops_ratio,
          'full ms': full_ms,
          'compact ms': ms,
          'speed-up': full_ms / ms,
          'speed-up / FLOPs ratio': full_ms / ms / flops_ratio,
        }
      )
      print(rows[-1], flush=True)
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--shares', default='0.25,0.5,0.75')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--windows', type=int, default=5)
  p.add_argument('--calls', type=int, default=5)
  args = p.parse_args()
  args.shares = [float(s) for s in args.shares.split(',')]
  rows = measure(args)
  harness.write_table(
    'export_speed',
    f'Compact network against the full super-network, batch {args.batch}',
    list(rows[0]),
    rows,
    notes=f'Best of {args.windows} windows of {args.calls} calls (median per window), '
    f'after 3 warm-up calls. MACs per image (the ENAS full count includes its '
    f'training-only auxiliary head). Measured on a shared 2-core machine: other '
    f'jobs ran at the same time, so the times are noisy (best window taken).',
  )


if __name__ == '__main__':
  main()
