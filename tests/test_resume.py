"""Never lose work: SIGKILL at random points and resume bitwise, SIGTERM, a NaN at a given
step, corrupt and truncated checkpoints, and a workdir made with another config."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny

TINY = tiny.flags(
  {
    'train.num_steps': 16,
    'train.log_every_steps': 2,
    'checkpoint.every_steps': 4,
    'search.num_candidates': 12,
    'search.chunk_size': 2,
    'search.eval_batch_size': 250,
  }
)  # export.latency off (a timing): the rest of the workdir is bitwise
RESULTS = (
  'posterior.json',
  'search/candidates.jsonl',
  'search/arch.json',
  'search/winner_weights.msgpack',
)


# one CPU device: these tests are about files and processes, not sharding
ENV = tiny.ONE_DEVICE


def _command(workdir, *extra):
  return [sys.executable, '-m', 'pgnas_jax.main', f'--workdir={workdir}', *TINY, *extra]


def _run(workdir, *extra):
  return subprocess.run(
    _command(workdir, *extra), capture_output=True, text=True, timeout=600, env=ENV
  )


def _final_state(workdir):
  ckpt = os.path.join(workdir, 'checkpoints')
  step = max(int(s) for s in os.listdir(ckpt) if s.isdigit())
  return step, ocp.StandardCheckpointer().restore(os.path.join(ckpt, str(step), 'default'))


def _assert_same_results(a, b):
  for name in RESULTS:
    with open(os.path.join(a, name), 'rb') as fa, open(os.path.join(b, name), 'rb') as fb:
      assert fa.read() == fb.read(), f'{name} differs'
  step_a, state_a = _final_state(a)
  step_b, state_b = _final_state(b)
  assert step_a == step_b == 16
  flat_a, flat_b = (sorted(_leaves(s)) for s in (state_a, state_b))
  assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
  for (k, x), (_, y) in zip(flat_a, flat_b):
    assert np.array_equal(np.asarray(x), np.asarray(y)), k


def _leaves(tree, prefix=''):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, f'{prefix}/{k}')
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _leaves(v, f'{prefix}/{i}')
  else:
    yield prefix, tree


def _run_until(workdir, marker, extra_delay, sig=signal.SIGKILL, *extra):
  """Starts the job (with ``extra`` flags), waits for ``marker`` in its log (None: no wait),
  then after ``extra_delay`` seconds sends ``sig``. Returns (returncode, log)."""
  proc = subprocess.Popen(
    _command(workdir, *extra), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV
  )
  log = []
  try:
    if marker is not None:
      for line in proc.stderr:
        log.append(line)
        if marker in line:
          break
    time.sleep(extra_delay)
    if proc.poll() is None:
      proc.send_signal(sig)
    rest = proc.communicate(timeout=300)[1]
    log.append(rest)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return proc.returncode, ''.join(log)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted run of the tiny config."""
  workdir = tmp_path_factory.mktemp('reference') / 'run'
  result = _run(workdir)
  assert result.returncode == 0, result.stderr[-2000:]
  return workdir


@pytest.mark.xdist_group('resume_reference')  # shares a module fixture
@pytest.mark.long(60)
def test_sigkill_at_random_points_then_resume_gives_identical_results(tmp_path, reference):
  rng = random.Random(20200207)
  train_points = sorted(rng.sample(range(2, 17, 2), 3))
  search_points = sorted(rng.sample(range(2, 13, 2), 2))
  kill_points = (
    [None]
    + [f'train step {s}/16' for s in train_points]
    + [f'search {c}/12 candidates' for c in search_points]
  )
  workdir = tmp_path / 'killed'
  killed = 0
  for marker in kill_points:
    returncode, log = _run_until(workdir, marker, rng.uniform(0.0, 0.4) if marker else 1.5)
    if returncode == -signal.SIGKILL:
      killed += 1
    else:  # the point was passed already because of resumption; it may not finish early
      assert returncode == 0, log[-2000:]
  assert killed >= 4, f'only {killed} of the kills landed'
  for _ in range(3):  # at most a few restarts to finish
    result = _run(workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    if os.path.exists(workdir / 'report.md'):
      break
  _assert_same_results(reference, workdir)
  print(f'survived {killed} SIGKILLs at {kill_points}')


def test_sigterm_saves_a_checkpoint_and_resumes(tmp_path):
  workdir = tmp_path / 'run'
  returncode, log = _run_until(workdir, 'train step 6/16', 0.0, signal.SIGTERM)
  assert returncode == 143, log[-2000:]
  assert 'stopped by SIGTERM after training step' in log
  step = int(log.split('stopped by SIGTERM after training step ')[1].split(';')[0])
  assert str(step) in os.listdir(workdir / 'checkpoints')  # complete: restorable
  assert (
    ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / str(step) / 'default')['step']
    == step
  )
  result = _run(workdir)
  assert result.returncode == 0 and f'resuming from the checkpoint at step {step}' in result.stderr

  returncode, log = _run_until(tmp_path / 'search', 'search 4/12', 0.0, signal.SIGTERM)
  assert returncode == 143 and 'scored candidates, all recorded' in log


def _tree_hash(path):
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      with open(os.path.join(root, f), 'rb') as fh:
        out[os.path.relpath(os.path.join(root, f), path)] = hash(fh.read())
  return out


@pytest.mark.xdist_group('resume_reference')  # shares a module fixture
def test_truncated_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, reference):
  workdir = tmp_path / 'run'
  returncode, log = _run_until(workdir, 'search 2/12', 0.0)
  assert returncode == -signal.SIGKILL
  os.remove(workdir / 'search' / 'candidates.jsonl')  # make the job need its state again
  data_dir = workdir / 'checkpoints' / '16' / 'default' / 'd'
  for f in os.listdir(data_dir):  # truncate every array file of the newest checkpoint
    with open(data_dir / f, 'r+b') as fh:
      fh.truncate(7)
  result = _run(workdir)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'checkpoints/16 is unreadable' in result.stderr
  assert 'resuming from the checkpoint at step 12' in result.stderr
  assert os.listdir(workdir / 'checkpoints_unreadable') == ['16']
  _assert_same_results(reference, workdir)


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
  workdir = tmp_path / 'run'
  returncode, _ = _run_until(workdir, 'train step 10/16', 0.3)
  for step in os.listdir(workdir / 'checkpoints'):
    meta = workdir / 'checkpoints' / step / 'default' / '_METADATA'
    if meta.exists():
      meta.write_text('not json')
  before = _tree_hash(workdir)
  result = _run(workdir)
  assert result.returncode == 2
  assert 'no readable checkpoint' in result.stderr and '--start_over' in result.stderr
  assert 'Traceback' not in result.stderr
  assert _tree_hash(workdir) == before


@pytest.mark.long(12)
def test_workdir_of_another_config_is_refused_unless_starting_over(tmp_path):
  workdir = tmp_path / 'run'
  _run_until(workdir, 'train step 6/16', 0.0)
  before = _tree_hash(workdir)
  # another seed: the same programs (compiled once), another run
  result = _run(workdir, '--config.seed=1')
  assert result.returncode == 2
  assert 'holds a run made with another config (seed' in result.stderr
  assert _tree_hash(workdir) == before
  result = _run(
    workdir,
    '--config.seed=1',
    '--start_over',
    '--config.train.num_steps=2',
    '--config.search.num_candidates=2',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads((workdir / 'config.json').read_text())['train']['num_steps'] == 2
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2']


def test_nan_at_a_given_step_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  import jax
  from pgnas_jax import config as config_lib
  from pgnas_jax import data as data_lib
  from pgnas_jax import errors, pipeline

  config = config_lib.get_config()
  config.model.shake_shake.stem_width, config.model.shake_shake.widths = 4, (4, 8)
  config.train.num_steps, config.train.log_every_steps = 16, 5
  config.checkpoint.every_steps, config.data.validation_size = 4, 500
  real_batch = data_lib.Dataset.train_batch

  def poisoned(dataset, data, seed, step, *args):
    batch = real_batch(dataset, data, seed, step, *args)
    if step == 9:  # the 10th step, counting from 1
      batch['images'] = np.full_like(batch['images'], np.nan)
    return batch

  monkeypatch.setattr(data_lib.Dataset, 'train_batch', poisoned)
  monkeypatch.setattr(jax, 'devices', lambda *a: jax.local_devices()[:1])
  with pytest.raises(
    errors.NonFiniteLossError, match='non-finite loss or gradient at training step 10 '
  ):
    pipeline.run(config, str(tmp_path))
  assert sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints')) == [4, 8]
  state = ocp.StandardCheckpointer().restore(tmp_path / 'checkpoints' / '8' / 'default')
  assert int(state['step']) == 8
  assert all(np.all(np.isfinite(np.asarray(x))) for _, x in _leaves(state['params']))


@pytest.mark.xdist_group('resume_reference')  # shares a module fixture
def test_ctrl_c_during_a_start_over_run_saves_and_the_same_command_resumes_it(tmp_path, reference):
  """Ctrl-C saves and stops like SIGTERM (status 143, one line); the same --start_over
  command then resumes the run it began instead of deleting the checkpoint it saved."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"an": "earlier run"}')  # what --start_over replaces
  returncode, log = _run_until(workdir, 'train step 6/16', 0.0, signal.SIGINT, '--start_over')
  assert returncode == 143, log[-2000:]
  last = log.strip().splitlines()[-1]
  assert last.startswith('pgnas_jax: stopped by Ctrl-C (SIGINT) after training step'), last
  step = int(last.split('after training step ')[1].split(';')[0])
  assert str(step) in os.listdir(workdir / 'checkpoints')
  assert os.path.exists(workdir / '.started_over')
  result = _run(workdir, '--start_over')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'resuming the run that --start_over began' in result.stderr
  assert f'resuming from the checkpoint at step {step}' in result.stderr
  _assert_same_results(reference, workdir)


@pytest.mark.xdist_group('resume_reference')  # shares a module fixture
def test_a_finished_run_missing_an_output_is_finished_again(tmp_path, reference):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  os.remove(workdir / 'posterior.json')
  os.remove(workdir / 'search' / 'arch.json')
  result = _run(workdir)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'holds a finished run without posterior.json, search/arch.json' in result.stderr
  _assert_same_results(reference, workdir)
  assert (workdir / 'report.md').exists()


def test_a_deleted_metrics_file_is_written_again_and_the_run_finishes(tmp_path, reference):
  """metrics.jsonl deleted after training: every rerun failed and only --start_over got out.
  Now the rerun warns, writes it again empty and finishes with the same results."""
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  os.remove(workdir / 'metrics.jsonl')
  os.remove(workdir / 'report.md')
  result = _run(workdir)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'metrics.jsonl is missing (deleted after training?)' in result.stderr
  _assert_same_results(reference, workdir)
  assert (workdir / 'report.md').exists() and (workdir / 'metrics.jsonl').read_text() == ''


def test_sigterm_while_exporting_stops_before_fine_tuning(tmp_path, monkeypatch):
  """A stop request is obeyed between stages, not only inside the loops: SIGTERM during the
  compact export stops the run before fine-tuning starts; the rerun finishes it."""
  from pgnas_jax import errors, finetune, outputs, pipeline

  config = tiny.config({'finetune.steps': 2})
  export = outputs.Outputs.compact

  def compact_then_sigterm(self, *args):
    described = export(self, *args)
    os.kill(os.getpid(), signal.SIGTERM)
    return described

  def no_fine_tuning(*args, **kwargs):
    raise AssertionError('fine-tuning started after the stop request')

  with monkeypatch.context() as patched:
    patched.setattr(outputs.Outputs, 'compact', compact_then_sigterm)
    patched.setattr(finetune, 'Finetuner', no_fine_tuning)
    with pytest.raises(errors.Preempted, match='stopped by SIGTERM after testing and exporting'):
      pipeline.run(config, str(tmp_path))
  assert not (tmp_path / 'report.md').exists()
  arch = pipeline.run(config, str(tmp_path)).arch
  assert arch['finetuned']['steps'] == 2 and (tmp_path / 'report.md').exists()
