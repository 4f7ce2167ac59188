"""Ranking speed: the vmapped chunk evaluator against its floor and against the paper's way.

    python benchmarks/ranking.py [--network default] [--eval_batches 25,100] [--chunks 1,2,4,8,16]
                                 [--candidates 16] [--images 1000] [--devices 1,4]

For every validation batch size B and chunk size K it scores ``--candidates`` candidates on
``--images`` validation images with ``search.make_chunk_scorer`` and reports candidates/s and
images/s against
  (a) the floor: a plain batched forward of the super-network (no masks) over the same
      number of images, in batches of K x B images (the same work per call), and
  (b) the paper's way: one candidate at a time (K = 1; on several devices, one per device)
      at the same B.
Candidates are split over the devices, each scoring its own on the whole batch
(``search.make_chunk_scorer``), so chunk sizes that are not a multiple of the device count
are skipped.
The summary table gives, per B and device count, the best K, its ratio to the best plain
forward measured at any batch size, and to one at a time; and the chunk size that
``search.chunk_size='auto'`` picks there. Simulated CPU devices share the same cores: the
multi-device rows show that the sharded path works, they are not a speed claim.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--network', default='default')
  p.add_argument('--dtype', default='float32')
  p.add_argument('--eval_batches', default='25,100')
  p.add_argument('--chunks', default='1,2,4,8,16')
  p.add_argument('--candidates', type=int, default=16)
  p.add_argument('--images', type=int, default=1000)
  p.add_argument('--devices', default='1,4')
  p.add_argument('--name', default='ranking', help='results/<name>.md and .json')
  return p.parse_args()


def measure(args, num_devices, eval_batch, chunks):
  import jax
  import jax.numpy as jnp
  from benchmarks import harness
  from pgnas_jax import masks as masks_lib
  from pgnas_jax import parallel, search
  from pgnas_jax import space as space_lib

  config, model, shape, classes, _ = harness.network(args.network, args.dtype)
  mesh = harness.mesh_of(num_devices)
  variables = jax.jit(lambda k: model.init({'params': k}, jnp.zeros((1,) + shape), train=False))(
    jax.random.key(0)
  )
  space = space_lib.from_variables(variables)
  weights = parallel.put_replicated(
    {'params': variables['params'], 'batch_stats': variables['batch_stats']}, mesh
  )
  logits = masks_lib.init_drop_logits(space.template, config.drop.init_p)
  batches = [
    parallel.put_replicated(harness.synthetic_batch(eval_batch, shape, classes, i), mesh)
    for i in range(args.images // eval_batch)
  ]
  total = args.candidates * args.images
  scorer = search.make_chunk_scorer(model, mesh, args.dtype)
  plain = search.make_full_scorer(model, mesh, args.dtype)
  rows = []
  for chunk in [c for c in chunks if c % num_devices == 0]:
    masks = [
      parallel.put_split(
        jax.device_get(
          search.draw_candidates(
            jax.random.key(1), jnp.arange(s, s + chunk), logits, space.template
          )
        ),
        mesh,
      )
      for s in range(0, args.candidates, chunk)
    ]
    # search.evaluate, as ranking runs it: it reads each batch's scores before the next
    seconds = harness.timed(
      lambda: [search.evaluate(scorer, (weights, m), batches) for m in masks], 1
    )
    plain_batches = [
      parallel.put_batch(harness.synthetic_batch(chunk * eval_batch, shape, classes, i), mesh)
      for i in range(total // (chunk * eval_batch))
    ]
    plain_seconds = harness.timed(lambda: search.evaluate(plain, (weights,), plain_batches), 1)
    rows.append(
      {
        'devices': num_devices,
        'eval_batch': eval_batch,
        'chunk': chunk,
        'images_per_call': chunk * eval_batch,
        'candidates_per_s': args.candidates / seconds,
        'images_per_s': total / seconds,
        'plain_forward_images_per_s': total / plain_seconds,
        'ratio_to_plain_same_size': plain_seconds / seconds,
      }
    )
  one = rows[0]  # one candidate per device at a time
  for r in rows:
    r['ratio_to_one_at_a_time'] = r['images_per_s'] / one['images_per_s']
  auto = search.Scorer(model, mesh, args.dtype).auto_chunk_size(
    weights, space, batches[0], args.candidates
  )
  return rows, auto


def main():
  args = parse()
  devices = [int(d) for d in args.devices.split(',')]
  flag = f'--xla_force_host_platform_device_count={max(devices)}'
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()
  from benchmarks import harness

  chunks = [int(c) for c in args.chunks.split(',')]
  rows, summary = [], []
  for k in devices:
    for b in (int(x) for x in args.eval_batches.split(',')):
      measured, auto = measure(args, k, b, chunks)
      rows += measured
      best = max(measured, key=lambda r: r['images_per_s'])
      floor = max(r['plain_forward_images_per_s'] for r in measured)
      summary.append(
        {
          'devices': k,
          'eval_batch': b,
          'best_chunk': best['chunk'],
          'best_images_per_s': best['images_per_s'],
          'best_plain_forward_images_per_s': floor,
          'ratio_to_best_plain': best['images_per_s'] / floor,
          'ratio_to_one_at_a_time': best['ratio_to_one_at_a_time'],
          'auto_chunk': auto,
        }
      )
  network = f'{args.network} ({harness.NETWORKS[args.network][3]}), {args.dtype}'
  notes = (
    f'Network: {network}; {args.candidates} candidates x {args.images} validation '
    f'images per measurement.'
  )
  harness.write_table(
    args.name,
    'Ranking: vmapped chunks against a plain forward and one candidate at a time',
    list(rows[0]),
    rows,
    notes,
  )
  harness.write_table(args.name + '_summary', 'Ranking summary', list(summary[0]), summary, notes)


if __name__ == '__main__':
  main()
