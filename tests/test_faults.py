"""Faults that must end in one line and lose nothing: two jobs on one workdir, workdirs a run
cannot continue from, configs that cannot finish, config files that raise, a full disk,
signals. Each asserts the message and what is left in the workdir; runs that need training
are in test_resume.py."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import tiny

from pgnas_jax import checkpoint as checkpoint_lib
from pgnas_jax import cli, errors, lock, pipeline, resume
from pgnas_jax import config as config_lib
from pgnas_jax import workdir as workdir_lib

HOLD = (
  'import sys, time\n'
  'from pgnas_jax import lock\n'
  'held = lock.WorkdirLock(sys.argv[1])\n'
  'held.acquire()\n'
  'held.claim()\n'
  'print("held", flush=True)\n'
  'time.sleep(600)\n'
)


SHORT = {'train.num_steps': 4, 'search.num_candidates': 4}  # on top of the tiny run


def _holder(workdir):
  proc = subprocess.Popen(
    [sys.executable, '-c', HOLD, str(workdir)], stdout=subprocess.PIPE, text=True
  )
  assert proc.stdout.readline().strip() == 'held'
  return proc


def test_a_second_job_on_a_held_workdir_is_refused_naming_the_holder(tmp_path):
  workdir = tiny.users_workdir(tmp_path / 'run')
  holder = _holder(workdir)
  try:
    result = tiny.main(workdir, timeout=300)
  finally:
    holder.kill()
    holder.wait()
  assert result.returncode == 2
  assert result.stderr.count('\n') == 1, result.stderr
  assert result.stderr.startswith(
    f'pgnas_jax: --workdir={workdir} is in use by another run (pid {holder.pid} on '
  )
  assert 'wait for it to finish or stop it, or choose another --workdir' in result.stderr
  # the holder's lock file, the user's file, nothing else
  assert sorted(p.name for p in workdir.iterdir()) == ['.lock', 'notes.txt']


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
  workdir = tiny.users_workdir(tmp_path / 'run')
  holder = _holder(workdir)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert (workdir / '.lock').exists()  # left behind, its holder dead
  with lock.WorkdirLock(str(workdir)) as held:
    held.claim()
    assert json.loads((workdir / '.lock').read_text())['pid'] == os.getpid()
    with pytest.raises(errors.WorkdirError, match=f'pid {os.getpid()} on '):
      lock.WorkdirLock(str(workdir)).acquire()
  assert sorted(p.name for p in workdir.iterdir()) == ['notes.txt']


def test_the_lock_removes_a_workdir_it_created_when_nothing_was_written(tmp_path):
  with lock.WorkdirLock(str(tmp_path / 'new')):
    assert (tmp_path / 'new' / '.lock').exists()
  assert not (tmp_path / 'new').exists()


@pytest.mark.parametrize(
  'make, message',
  [
    (lambda p: p.write_text('x'), 'is a file, not a folder'),
    (lambda p: (p.parent / 'file').write_text('x'), 'cannot be written (Not a directory)'),
  ],
)
def test_a_workdir_that_cannot_hold_a_run_is_refused(tmp_path, make, message):
  workdir = tmp_path / 'run'
  make(workdir)
  if not workdir.exists():
    workdir = tmp_path / 'file' / 'run'
  with pytest.raises(errors.WorkdirError, match=re.escape(message)):
    pipeline.run(tiny.config(SHORT), str(workdir))


def test_a_config_that_gives_no_training_step_is_refused_before_the_workdir(tmp_path):
  workdir = tiny.users_workdir(tmp_path / 'run')
  c = tiny.config(SHORT)
  c.train.num_steps, c.train.num_epochs = -1, 0.000001
  per_epoch = (tiny.SMALL_SPLITS['train'] - 500) // 128  # the training split less validation
  with pytest.raises(
    errors.ConfigError, match=rf'num_epochs=1e-06 gives no training step \({per_epoch} steps per '
  ):
    pipeline.run(c, str(workdir))
  assert sorted(p.name for p in workdir.iterdir()) == ['notes.txt']


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('seed', -1, '--config.seed=-1 is out of range: it must be a whole number in [0, 2**63)'),
    ('drop.init_p', 1e-46, 'neither 0 nor 1 in float32'),
    ('drop.random_p', 1 - 1e-9, 'neither 0 nor 1 in float32'),
  ],
)
def test_values_that_cannot_run_are_refused(field, value, message):
  c = config_lib.get_config()
  section, _, name = field.rpartition('.')
  (c[section] if section else c)[name] = value
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    config_lib.validate(c)


@pytest.mark.parametrize(
  'text, message',
  [
    ("raise ValueError('boom')\n", 'ValueError at line 1: boom'),
    ('x = 1\n', 'it defines no get_config()'),
    ('def get_config():\n  return 1 / 0\n', 'ZeroDivisionError at line 2: division by zero'),
    ('def get_config():\n  pass\n', 'its get_config() returned NoneType'),
  ],
)
def test_a_config_file_that_raises_or_has_no_get_config_is_one_line(
  tmp_path, capsys, text, message
):
  path = tmp_path / 'mine.py'
  path.write_text(text)
  with pytest.raises(SystemExit) as exit_:
    cli.check_config_file(['prog', f'--config={path}'])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert (
    err
    == f'pgnas_jax: cannot load the config {path}: {message}'
    + (
      ''
      if 'get_config()' not in message
      else '; a config file defines get_config() returning an ml_collections.ConfigDict '
      '(see configs/)'
    )
    + '\n'
  )


@pytest.mark.parametrize(
  'content, message',
  [
    ('', 'is empty or damaged (JSONDecodeError: Expecting value'),
    ('{"seed": 0', 'is empty or damaged (JSONDecodeError'),
    ('[1, 2]', 'holds no config (a JSON list)'),
  ],
)
def test_a_damaged_config_json_is_refused_in_one_line(tmp_path, content, message):
  workdir = tiny.users_workdir(tmp_path / 'run')
  (workdir / 'config.json').write_text(content)
  with pytest.raises(errors.WorkdirError, match=re.escape(message)):
    pipeline.run(tiny.config(SHORT), str(workdir))
  assert (workdir / 'config.json').read_text() == content
  assert sorted(p.name for p in workdir.iterdir()) == ['config.json', 'notes.txt']


def test_checkpoints_without_their_config_are_refused_naming_what_to_remove(tmp_path):
  workdir = tiny.users_workdir(tmp_path / 'run')
  (workdir / 'checkpoints' / '4').mkdir(parents=True)
  with pytest.raises(
    errors.WorkdirError, match=f'no config.json.*remove {workdir}/checkpoints to train again'
  ):
    pipeline.run(tiny.config(SHORT), str(workdir))
  assert sorted(p.name for p in workdir.iterdir()) == ['checkpoints', 'notes.txt']


def test_start_over_deletes_config_json_last(tmp_path, monkeypatch):
  """A kill part way through --start_over never leaves checkpoints without their config."""
  for name in workdir_lib.OUTPUTS:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text('x')
  deleted = []
  monkeypatch.setattr(resume.os, 'remove', lambda p: deleted.append(os.path.basename(p)))
  monkeypatch.setattr(resume.shutil, 'rmtree', lambda p: deleted.append(os.path.basename(p)))
  resume.start_over(str(tmp_path))
  assert deleted[-1] == 'config.json' and len(deleted) == len(workdir_lib.OUTPUTS)


# what Python and orbax's writers (tensorstore, as measured on a full tmpfs) raise
FULL_DISK = {
  'write_json': OSError(errno.ENOSPC, 'No space left on device', 'config.json'),
  'checkpoint': ValueError(
    'RESOURCE_EXHAUSTED: Error writing "params.weights.stem.kernel/0" in OCDBT database at '
    'local file "ckpt/": Failed to write 12617 bytes to file 9: No space left on device '
    "[os_error_code='28']"
  ),
}


@pytest.mark.parametrize('where', list(FULL_DISK))
def test_a_full_disk_is_one_line_saying_how_much_the_run_needs(tmp_path, monkeypatch, where):
  workdir = tiny.users_workdir(tmp_path / 'run')

  def full(*args):
    raise FULL_DISK[where]

  if where == 'write_json':
    monkeypatch.setattr(workdir_lib, 'write_json', full)
  else:
    monkeypatch.setattr(checkpoint_lib.Checkpointer, 'save', full)
  with pytest.raises(
    errors.WorkdirError,
    match=r'no space left on the device of --workdir=.*: this run needs about '
    r'\d+ MB there \(\d+ MB free now\); free some and run the same '
    r'command again to resume',
  ):
    pipeline.run(tiny.config(SHORT), str(workdir))
  assert (workdir / 'notes.txt').read_text() == 'mine'


def test_ctrl_c_is_a_request_to_save_and_stop_and_twice_stops_at_once():
  before = signal.getsignal(signal.SIGINT)  # pytest-xdist's workers ignore SIGINT
  with checkpoint_lib.PreemptionGuard() as guard:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    assert guard.requested and guard.signal_name == 'Ctrl-C (SIGINT)'
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
  assert signal.getsignal(signal.SIGINT) is before  # the guard put it back


def test_ctrl_c_before_the_run_can_save_is_one_line(capsys):
  def job():
    raise KeyboardInterrupt

  with pytest.raises(SystemExit) as exit_:
    cli.exit_on_user_errors(job)
  assert exit_.value.code == 143
  assert capsys.readouterr().err == (
    'pgnas_jax: stopped by Ctrl-C; what was saved is kept: run the same command again to resume\n'
  )


STUCK = (  # a command line whose main thread is in native code that never reaches a safe point
  'import ctypes, os, signal, sys, threading, time\n'
  'from pgnas_jax import checkpoint, cli\n'
  'def job():\n'
  '  with checkpoint.PreemptionGuard() as guard:\n'
  '    def save():\n'
  '      with guard.finishing():\n'
  '        time.sleep(4)\n'
  '    if sys.argv[1] == "saving":\n'
  '      threading.Thread(target=save).start()\n'
  '      time.sleep(0.2)\n'
  '    os.kill(os.getpid(), signal.SIGTERM)\n'
  '    libc, start = ctypes.CDLL(None), time.time()\n'
  '    while time.time() - start < 60:\n'
  '      libc.sleep(60)  # no Python runs in here; the signal only cuts it short\n'
  'cli.STOP_DEADLINE_S = 1.0\n'
  'cli.exit_on_user_errors(job)\n'
)


@pytest.mark.parametrize('case, least, most', [('stuck', 1.0, 20.0), ('saving', 4.0, 25.0)])
def test_a_stop_request_ends_a_command_stuck_without_a_safe_point(case, least, most):
  """A command line obeys SIGTERM within its deadline even while its main thread is inside
  native code (an XLA compile) where Python's signal handler cannot run; a last checkpoint
  save in progress (``finishing``) is waited for, not cut short."""
  start = time.time()
  proc = subprocess.run(
    [sys.executable, '-c', STUCK, case], capture_output=True, text=True, timeout=60
  )
  took = time.time() - start
  assert proc.returncode == 143, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
    'pgnas_jax: stopped by SIGTERM, 1 s after it arrived, inside work that has no safe point '
    '(compiling or measuring); what was saved is kept: run the same command again to resume'
  )
  assert least <= took <= most, took  # the command would otherwise sleep 60 s


def test_without_a_command_line_a_stop_request_never_ends_the_process():
  """In a user's own Python (a notebook) the guard only asks: no deadline ends the process."""
  assert checkpoint_lib.PreemptionGuard.hard_stop_after_s is None
  with checkpoint_lib.PreemptionGuard() as guard:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert guard.requested and guard._watcher is None


@pytest.mark.parametrize('name', ['w[1]', 'w*', 'w?'])
def test_a_workdir_path_orbax_reads_as_a_pattern_is_refused(tmp_path, name):
  """orbax saved every checkpoint of runs/w[1] without its index (none could be read back)
  and failed on runs/w*: refused in one line before anything is written."""
  workdir = tmp_path / name
  with pytest.raises(errors.WorkdirError, match=re.escape(f'--workdir={workdir}: its path')) as e:
    pipeline.run(tiny.config(SHORT), str(workdir))
  assert 'which the checkpoint writer (orbax) reads as a file pattern' in str(e.value)
  assert not workdir.exists()


def test_only_late_callbacks_to_a_closed_event_loop_are_kept_out_of_stderr():
  """After a save failed on a full disk, tensorstore's late callbacks to orbax's closed event
  loop print "Event loop is closed" tracebacks; the command line drops exactly those."""
  import asyncio

  shown = []
  hook = cli._late_callback_quiet(lambda *error: shown.append(error[1]))
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as e:
    hook(RuntimeError, e, e.__traceback__)
  try:
    raise RuntimeError('Event loop is closed')  # the same words from elsewhere: shown
  except RuntimeError as e:
    hook(RuntimeError, e, e.__traceback__)
  assert [str(e) for e in shown] == ['Event loop is closed'] and shown[0].__traceback__
  assert shown[0].__traceback__.tb_frame.f_code.co_filename == __file__
