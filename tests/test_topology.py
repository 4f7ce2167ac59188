"""The same run on three topologies gives the same answer: (a) one device, (b) four
simulated devices in one process, (c) two processes joined through jax.distributed on
localhost, two simulated devices each (``launch/local_processes.sh 2 2``). Two devices per
process, rather than one, so that a process feeds several devices from its rows of a batch
and reductions cross both devices and processes.

The search's chunk size is 'auto' (the default): 1 candidate at a time on one device, 4 on
four devices in one or two processes, the processes agreeing on it.

Compared: the loss curve, the dropped channels of every candidate in
``search/candidates.jsonl`` (byte for byte), the validation scores and the winner (the same).
The tolerances: one device and four in one process agree within 1e-7 here, but the two
processes' all-reduce (gloo) adds the devices' partial gradients in another order, and SGD at
learning rate 0.1 amplifies that last-bit difference step by step (measured after 8 steps:
1.3e-5 relative in the loss, 9e-4 in the gradient norm, 1.5e-5 in a validation loss). So the
first logged line (steps 1 and 2, before any difference can grow) must agree within 1e-6,
the later ones within 1e-4 (loss, its parts, learning rate, mean drop probability) and 5e-3
(gradient norm), validation losses within 1e-4 and accuracies within one validation image. A
wrong row, mask or key changes the first line at the 1e-2 level.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALIDATION = 400
TINY = tiny.flags(
  {
    'train.batch_size': 32,
    'train.num_steps': 8,
    'train.log_every_steps': 2,
    'checkpoint.every_steps': 4,
    'data.validation_size': VALIDATION,
    'search.num_candidates': 8,
    'search.chunk_size': 'auto',
    'search.eval_batch_size': 200,
  }
)
CURVE = ('loss', 'nll', 'prior', 'entropy', 'learning_rate', 'mean_p')
TIMEOUT = 240


def _start(command, workdir, devices):
  env = {**tiny.ONE_DEVICE, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  if devices > 1:
    env['XLA_FLAGS'] += f' --xla_force_host_platform_device_count={devices}'
  return subprocess.Popen(
    command + [f'--workdir={workdir}', *TINY],
    cwd=REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )  # its own process group: killed whole, children included


def _read(workdir):
  metrics = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  candidates = [
    json.loads(line) for line in open(os.path.join(workdir, 'search', 'candidates.jsonl'))
  ]
  arch = json.load(open(os.path.join(workdir, 'search', 'arch.json')))
  return metrics, candidates, arch


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The three runs, started at once (the two cores overlap one run's waits with another's
  work) and always cleaned up: every process group is killed at the end, finished or not."""
  root = tmp_path_factory.mktemp('topologies')
  main = [sys.executable, '-m', 'pgnas_jax.main']
  procs = {
    'one device': _start(main, root / 'one', 1),
    'four devices': _start(main, root / 'four', 4),
    'two processes': _start(
      ['bash', os.path.join(REPO, 'launch', 'local_processes.sh'), '2', '2'],
      root / 'two',
      1,
    ),
  }
  logs = {}
  try:
    for name, proc in procs.items():
      logs[name] = proc.communicate(timeout=TIMEOUT)[1]
      assert proc.returncode == 0, f'{name}: {logs[name][-3000:]}'
  finally:
    for proc in procs.values():
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      proc.wait()
  assert '4 devices in 2 processes' in logs['two processes']
  return {
    name: _read(root / folder)
    for name, folder in (('one device', 'one'), ('four devices', 'four'), ('two processes', 'two'))
  }, root


def _dropped_lines(candidates):
  return ''.join(
    json.dumps({'index': c['index'], 'dropped': c['dropped']}) + '\n' for c in candidates
  ).encode()


@pytest.mark.xdist_group('topology')  # shares a module fixture
@pytest.mark.long(46)
def test_loss_curve_masks_and_winner_do_not_depend_on_the_topology(runs):
  results, _ = runs
  metrics, candidates, arch = results['one device']
  assert [m['step'] for m in metrics] == [2, 4, 6, 8]
  assert len(candidates) == 8
  assert sum(sum(c['dropped'].values()) for c in candidates) > 0  # something is dropped
  for name in ('four devices', 'two processes'):
    other_metrics, other_candidates, other_arch = results[name]
    assert [m['step'] for m in other_metrics] == [m['step'] for m in metrics], name
    for i, (a, b) in enumerate(zip(metrics, other_metrics)):
      tight = i == 0
      np.testing.assert_allclose(
        [b[k] for k in CURVE],
        [a[k] for k in CURVE],
        rtol=1e-6 if tight else 1e-4,
        atol=1e-7,
        err_msg=f'{name}, step {a["step"]}',
      )
      # On CPU the weight gradients' convolutions run on Eigen (backends/cpu/xla_options.py),
      # which sums a device's share of the batch in another order than the whole batch:
      # float32 rounding of about 1e-5 of the norm at the first step. A gradient that missed
      # another device's share would be off by far more.
      np.testing.assert_allclose(
        b['grad_norm'],
        a['grad_norm'],
        rtol=1e-4 if tight else 5e-3,
        err_msg=f'{name}, step {a["step"]}',
      )
    assert _dropped_lines(other_candidates) == _dropped_lines(candidates), name
    for a, b in zip(candidates, other_candidates):
      assert (a['params'], a['flops']) == (b['params'], b['flops'])
      assert abs(a['val_acc'] - b['val_acc']) <= 1 / VALIDATION + 1e-12, name
      np.testing.assert_allclose(b['val_loss'], a['val_loss'], rtol=1e-4, err_msg=name)
    assert other_arch['index'] == arch['index'], name
    assert other_arch['kept_channels'] == arch['kept_channels'], name


@pytest.mark.xdist_group('topology')  # shares a module fixture
def test_two_processes_share_one_workdir_and_checkpoint_together(runs):
  _, root = runs
  two = root / 'two'
  assert (two / 'report.md').exists() and (two / 'search' / 'winner_weights.msgpack').exists()
  assert sorted(os.listdir(two / 'checkpoints')) == ['4', '8']
  # process 0 alone wrote the logs: one line per logged step, no duplicates
  assert [json.loads(line)['step'] for line in open(two / 'metrics.jsonl')] == [2, 4, 6, 8]
  assert [json.loads(line)['index'] for line in open(two / 'search' / 'candidates.jsonl')] == list(
    range(8)
  )
