"""Where the time goes: a per-op profile of the default train step and of the ranking scorer,
next to ``torch.profiler``'s table for the PyTorch peer (issue 17).

    python benchmarks/op_profile.py [--network default] [--steps 3]
                                    [--torch_python=/work/torchvenv/bin/python] [--peer=...]

pgnas_jax: a ``jax.profiler`` trace of ``--steps`` compiled calls, read back with
``jax.profiler.ProfileData``; XLA:CPU records one event per executed HLO instruction (thunk),
summed here per instruction and per kind (the instruction name without its number). The
top instructions are shown with the root op of the computation they run. The peer (when
``--torch_python`` is given): ``torch.profiler``'s self-CPU-time table for the same work.
Writes ``results/op_profile.md``.
"""

import argparse
import collections
import glob
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(ROOT, '..', 'shared', 'peer', 'torch_default.py')
TORCH_PROFILE = r"""
import importlib.util, sys, torch, torch.nn.functional as F
spec = importlib.util.spec_from_file_location('peer', sys.argv[1])
peer = importlib.util.module_from_spec(spec); spec.loader.exec_module(peer)
torch.set_num_threads(2); torch.manual_seed(0)
net = peer.SupNet((16, 32, 64), 1, cin=1)
cds = [m for m in net.modules() if isinstance(m, peer.CDConv)]
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
x = torch.randn(128, 1, 28, 28); y = torch.randint(0, 10, (128,))
def step():
  opt.zero_grad(set_to_none=True)
  loss = F.cross_entropy(net(x), y) + sum(m.reg() for m in cds)
  loss.backward(); opt.step()
def rank():
  for m in cds:
    m.hard = (torch.rand(m.in_channels) >= torch.sigmoid(m.p_logit)).float()
  net(xe)
xe = torch.randn(100, 1, 28, 28)
work = (('train step, batch 128', step, True, 3), ('ranking, batch 100', rank, False, 10))
for name, fn, mode, n in work:
  net.train(mode)
  with torch.set_grad_enabled(mode):
    fn()
    with torch.profiler.profile() as prof:
      for _ in range(n): fn()
  print(f'#### PyTorch {torch.__version__}: {name}, {n} calls')
  print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=12))
"""


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--network', default='default')
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--torch_python', default=None)
  p.add_argument('--peer', default=PEER)
  p.add_argument('--top', type=int, default=10)
  return p.parse_args()


def op_times(compiled, fn, calls: int) -> collections.Counter:
  """Nanoseconds per HLO instruction over ``calls`` calls of ``fn``, from a profiler trace."""
  import jax

  jax.block_until_ready(fn())
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(calls):
      out = fn()
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
  times = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith('tf_XLA'):  # XLA's executor and intra-op threads
        continue
      for event in line.events:
        if not re.match(r'end:|ThreadpoolListener|ThunkExecutor', event.name):
          times[event.name] += event.duration_ns
  return times


def root_ops(hlo_text: str) -> dict:
  """Instruction name -> a short description: the root op of the computation it calls."""
  roots, current = {}, None
  for line in hlo_text.splitlines():
    if not line.startswith(' ') and '{' in line:
      current = line.split()[0].lstrip('%')
    elif 'ROOT' in line and current:
      roots[current] = re.sub(r', metadata=.*|, backend_config=.*', '', line.strip())[5:]
  described = {}
  for m in re.finditer(r'%(\S+) = .*?calls=%([\w.\-]+)', hlo_text):
    described[m.group(1)] = roots.get(m.group(2), '')[:160]
  for m in re.finditer(r'%(\S+) = (\S+) custom-call\(.*?custom_call_target="([\w.]+)"', hlo_text):
    described[m.group(1)] = f'{m.group(3)} -> {m.group(2)}'  # the CPU kernels' FFI calls
  return described


def summary(title: str, times: collections.Counter, hlo_text: str, calls: int, top: int) -> str:
  total = sum(times.values())
  described = root_ops(hlo_text)
  kinds = collections.Counter()
  for name, ns in times.items():
    target = re.match(r'(pgnas_\w+) ->', described.get(name, ''))
    kinds[target.group(1) if target else re.sub(r'[._]\d+$', '', name)] += ns
  lines = [f'#### pgnas_jax: {title} ({total / calls / 1e6:.0f} ms of op time per call)', '']
  lines += ['| op kind | ms per call | share |', '|---|---|---|']
  lines += [
    f'| {k} | {ns / calls / 1e6:.1f} | {100 * ns / total:.1f}% |'
    for k, ns in kinds.most_common(top)
  ]
  lines += ['', '| instruction | ms per call | share | what it computes |', '|---|---|---|---|']
  lines += [
    f'| {n} | {ns / calls / 1e6:.1f} | {100 * ns / total:.1f}% | `{described.get(n, "")}` |'
    for n, ns in times.most_common(top)
  ]
  return '\n'.join(lines) + '\n'


def jax_profiles(args) -> list:
  import jax
  import jax.numpy as jnp
  from benchmarks import harness
  from pgnas_jax import parallel, search

  config, model, shape, classes, _ = harness.network(args.network)
  mesh = harness.mesh_of(1)
  state, space, step = harness.train_state(config, model, shape, mesh)
  data = harness.synthetic_batch(128, shape, classes)
  batch = parallel.put_batch({'images': data['images'], 'labels': data['labels']}, mesh)
  compiled = step.lower(state, batch).compile()
  holder = [state]

  def train():
    holder[0], metrics = compiled(holder[0], batch)
    return metrics['loss']

  out = [
    summary(
      'train step, batch 128',
      op_times(compiled, train, args.steps),
      compiled.as_text(),
      args.steps,
      args.top,
    )
  ]
  weights = {'params': holder[0].params['weights'], 'batch_stats': holder[0].batch_stats}
  masks = search.draw_candidates(
    jax.random.key(1), jnp.arange(1), holder[0].params['drop_logits'], space.template
  )
  evals = harness.synthetic_batch(100, shape, classes)
  scorer = search.make_chunk_scorer(model, mesh, 'float32').lower(weights, masks, evals).compile()
  calls = 10 * args.steps
  times = op_times(scorer, lambda: scorer(weights, masks, evals), calls)
  out.append(
    summary('ranking scorer, chunk 1, batch 100', times, scorer.as_text(), calls, args.top)
  )
  return out


def torch_profile(args) -> str:
  if not args.torch_python:
    return 'PyTorch not profiled: no --torch_python given.\n'
  run = subprocess.run(
    [args.torch_python, '-c', TORCH_PROFILE, args.peer], capture_output=True, text=True
  )
  if run.returncode != 0:
    return f'PyTorch not profiled: {run.stderr.strip().splitlines()[-1]}\n'
  return '```\n' + run.stdout + '```\n'


def main():
  args = parse()
  from benchmarks import harness

  text = '### Per-op profile\n\nDevice: ' + harness.device_description() + '.\n\n'
  text += '\n'.join(jax_profiles(args)) + '\n' + torch_profile(args)
  print(text)
  os.makedirs(harness.RESULTS, exist_ok=True)
  with open(os.path.join(harness.RESULTS, 'op_profile.md'), 'w') as f:
    f.write(text)


if __name__ == '__main__':
  main()
