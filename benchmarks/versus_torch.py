"""pgnas_jax against its PyTorch peer on the same CPU, side by side in one run (issue 17).

    python benchmarks/versus_torch.py --torch_python=/work/torchvenv/bin/python \
        [--peer=../shared/peer/torch_default.py] [--rounds 2] [--steps 12] [--threads 2]

Rounds alternate (pgnas_jax default, peer default, pgnas_jax m32, peer m32, then again), so
background load on a shared machine hits both sides alike; each side's figure is its best
round, and the ratio column gives the range of the per-round ratios. Work measured, both
sides at ``--threads`` threads:
  * train step, batch 128, of the default network and of m32 (the peer's
    ``128 100 N 2 32 2 32 3``): relaxed per-example masks, the regulariser, SGD Nesterov;
  * ranking at eval batch 100: the peer scores one candidate at a time with a hard mask;
    pgnas_jax runs ``search.evaluate`` over ``search.make_chunk_scorer`` with the best of
    ``--chunks`` candidates per device (images/s counts every candidate's images);
  * the plain forward at eval batch 100 (no masks, evaluation mode).
pgnas_jax splits the ``--threads`` cores into devices as the main job does
(``--cpu_devices``, ``pgnas_jax/host_devices.py``): batches split over them, as in a run.
The PyTorch side runs the peer file in a subprocess with ``--torch_python``; without it, or
when torch does not import there, only pgnas_jax is measured and a note says so. PyTorch is
never a dependency of the project.
"""

import argparse
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(ROOT, '..', 'shared', 'peer', 'torch_default.py')
# the peer's positional arguments after (batch, eval_batch, steps, threads) per network
PEER_SHAPES = {'default': [], 'm32': ['32', '2', '32', '3']}
WORK = (  # (key in the peer's output, what it is)
  ('train_img_s', 'train step, batch {batch}'),
  ('rank_one_img_s', 'ranking, eval batch {eval_batch}'),
  ('plain_fwd_img_s', 'plain forward, eval batch {eval_batch}'),
)


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--torch_python', default=None, help='a python with torch installed')
  p.add_argument('--peer', default=PEER, help='the PyTorch peer file')
  p.add_argument('--networks', default='default,m32')
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--steps', type=int, default=12, help='train steps per round (3 windows)')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--eval_batch', type=int, default=100)
  p.add_argument(
    '--chunks', default='1,2', help='pgnas_jax ranking: candidates per device and call to try'
  )
  p.add_argument('--threads', type=int, default=2)
  p.add_argument(
    '--cpu_devices',
    default='auto',
    help="pgnas_jax's devices on the --threads cores, as the main job's --cpu_devices",
  )
  p.add_argument('--name', default='versus_torch', help='results/<name>.md and .json')
  return p.parse_args()


def set_threads(threads: int) -> None:
  """XLA:CPU runs on as many threads as the process may use: restrict it to ``threads``
  cores before jax starts (the peer calls ``torch.set_num_threads``)."""
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) > threads:
    os.sched_setaffinity(0, cores[:threads])


def peer_runner(args):
  """``run(network) -> {key: images/s}``, or (None, why) when the peer cannot run."""
  if not args.torch_python:
    return None, 'no --torch_python given: the PyTorch peer was not measured'
  if not os.path.exists(args.peer):
    return None, f'no peer file at {args.peer}: pass --peer'
  check = subprocess.run(
    [args.torch_python, '-c', 'import torch; print(torch.__version__)'],
    capture_output=True,
    text=True,
  )
  if check.returncode != 0:
    return None, f'torch does not import with {args.torch_python}: the peer was not measured'

  def run(network):
    command = [args.torch_python, args.peer, str(args.batch), str(args.eval_batch)]
    command += [str(args.steps), str(args.threads)] + PEER_SHAPES[network]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return {k: float(v) for k, v in re.findall(r'(\w+)=([\d.]+)', out)}

  return run, f'torch {check.stdout.strip()} ({args.torch_python})'


def best_rate(fn, images: int, reps: int, windows: int = 3) -> float:
  """Images/s of the best of ``windows`` windows of ``reps`` calls (as the peer times)."""
  import jax

  best = 0.0
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(reps):
      out = fn()
    jax.block_until_ready(out)
    best = max(best, reps * images / (time.perf_counter() - start))
  return best


class JaxSide:
  """The project's compiled train step, chunk scorer and plain forward for one network,
  compiled once and timed in every round."""

  def __init__(self, network: str, args):
    import jax
    import jax.numpy as jnp
    from benchmarks import harness
    from pgnas_jax import parallel, search

    config, model, shape, classes, _ = harness.network(network)
    self.args, mesh = args, harness.mesh_of(len(jax.devices()))
    state, space, step = harness.train_state(config, model, shape, mesh)
    data = harness.synthetic_batch(args.batch, shape, classes)
    self.train_batch = parallel.put_batch(
      {'images': data['images'], 'labels': data['labels']}, mesh
    )
    self.step = step.lower(state, self.train_batch).compile()
    self.state = state
    weights = {'params': state.params['weights'], 'batch_stats': state.batch_stats}
    self.weights = parallel.put_replicated(weights, mesh)
    evals = [harness.synthetic_batch(args.eval_batch, shape, classes, i) for i in range(5)]
    # as the search places them: whole on every device for chunks of candidates, rows split
    # over the devices for one network
    self.batches = [parallel.put_replicated(b, mesh) for b in evals]
    self.split_batches = [parallel.put_batch(b, mesh) for b in evals]
    self.scorer = search.make_chunk_scorer(model, mesh, 'float32')
    self.plain = search.make_full_scorer(model, mesh, 'float32')
    self.masks = {
      k: parallel.put_split(
        search.draw_candidates(
          jax.random.key(1), jnp.arange(k), state.params['drop_logits'], space.template
        ),
        mesh,
      )
      for k in (int(c) * mesh.devices.size for c in args.chunks.split(','))
    }

  def _train(self):
    self.state, metrics = self.step(self.state, self.train_batch)
    return metrics['loss']

  def measure(self) -> dict:
    from pgnas_jax import search

    args, n = self.args, len(self.batches)
    self._train()  # warm-up (compiles nothing: the step is compiled)
    out = {'train_img_s': best_rate(self._train, args.batch, max(1, args.steps // 3))}
    ranking = {}
    for k, masks in self.masks.items():
      score = lambda: search.evaluate(self.scorer, (self.weights, masks), self.batches)
      score()
      ranking[k] = best_rate(score, k * n * args.eval_batch, 3)
    best = max(ranking, key=ranking.get)
    out['rank_one_img_s'], out['chunk'] = ranking[best], best
    plain = lambda: search.evaluate(self.plain, (self.weights,), self.split_batches)
    plain()
    out['plain_fwd_img_s'] = best_rate(plain, n * args.eval_batch, 3)
    return out


def rows_of(args, measured: dict, torch_note: str) -> list:
  rows = []
  for network, rounds in measured.items():
    for key, work in WORK:
      jax_rates = [r['jax'][key] for r in rounds]
      torch_rates = [r['torch'][key] for r in rounds if r['torch']]
      row = {
        'network': network,
        'work': work.format(batch=args.batch, eval_batch=args.eval_batch),
        'pgnas_jax_img_s': max(jax_rates),
        'pytorch_img_s': max(torch_rates) if torch_rates else 'n/a',
        'ratio': 'n/a',
        'ratio_per_round': 'n/a',
      }
      if torch_rates:
        per_round = [j / t for j, t in zip(jax_rates, torch_rates)]
        row['ratio'] = max(jax_rates) / max(torch_rates)
        row['ratio_per_round'] = ', '.join(f'{r:.2f}' for r in per_round)
      if key == 'rank_one_img_s':
        row['work'] += ' (pgnas_jax chunk ' + '/'.join(str(r['jax']['chunk']) for r in rounds)
        row['work'] += ')'
      rows.append(row)
  return rows


def split_cpu(args) -> str:
  """pgnas_jax's CPU devices, chosen and set as the main job does for the default config."""
  from pgnas_jax import config as config_lib
  from pgnas_jax.backends.cpu import host_devices

  return host_devices.split_for(args.cpu_devices, config_lib.get_config(), args.threads)


def main():
  args = parse()
  set_threads(args.threads)
  split = split_cpu(args)
  print(split, flush=True)
  run_peer, torch_note = peer_runner(args)
  print(torch_note, flush=True)

  networks = args.networks.split(',')
  sides = {n: JaxSide(n, args) for n in networks}
  measured = {n: [] for n in networks}
  load = [os.getloadavg()[0]]
  for r in range(args.rounds):
    for n in networks:
      ours = sides[n].measure()
      theirs = run_peer(n) if run_peer else None
      measured[n].append({'jax': ours, 'torch': theirs})
      print(f'round {r + 1} {n}: pgnas_jax {ours} | peer {theirs}', flush=True)
      load.append(os.getloadavg()[0])
      write(args, measured, torch_note, load, split)  # an interrupted run keeps what it measured


def write(args, measured: dict, torch_note: str, load: list, split: str) -> None:
  done = {n: rounds for n, rounds in measured.items() if rounds}
  notes = (
    f'{args.threads} threads each (pgnas_jax: {split}); '
    f'{args.rounds} alternating rounds, best round per side; '
    f'rounds done: {", ".join(f"{n} {len(r)}" for n, r in done.items())}; '
    f'PyTorch: {torch_note}; 1-minute load average during the run '
    f'{min(load):.1f} to {max(load):.1f} on {os.cpu_count()} cores.'
  )
  columns = ['network', 'work', 'pgnas_jax_img_s', 'pytorch_img_s', 'ratio', 'ratio_per_round']
  from benchmarks import harness

  harness.write_table(
    args.name,
    'pgnas_jax against the PyTorch peer',
    columns,
    rows_of(args, done, torch_note),
    notes,
  )


if __name__ == '__main__':
  main()
