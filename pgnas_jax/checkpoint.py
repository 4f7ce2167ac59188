"""Checkpoints of the training state with orbax, and pre-emption.

A checkpoint holds the whole ``TrainState``: weights, drop logits, optimiser state, BatchNorm
statistics, step and root key. The input pipeline's position is the step itself: training
batches are a pure function of (seed, step), so restoring the step restores the stream.
Saves are asynchronous (orbax writes in the background and commits atomically); a save that
was cut short is never restored, and an unreadable checkpoint is named and skipped for the
one before it. With several processes every one of them saves and restores (orbax writes
each array once, from one process holding it, into the shared workdir). The root key is
saved as its raw data and restored with the config's ``rng.impl``; a checkpoint holding
another root key (another seed or ``rng.impl``) is refused.
"""

import contextlib
import logging
import os
import signal
import socket
import sys
import threading

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from pgnas_jax import parallel
from pgnas_jax import workdir as workdir_lib
from pgnas_jax.errors import CheckpointError, WorkdirError


def _to_saveable(state):
  return state.replace(root_key=jax.random.key_data(state.root_key))


def _from_saveable(state, impl):
  return state.replace(root_key=jax.random.wrap_key_data(state.root_key, impl=impl))


def _check_root_key(restored, target, path: str) -> None:
  """The root key follows from (seed, rng.impl) alone: a checkpoint holding another one was
  made by another run, whose keys would silently replace this config's."""
  saved, expected = (np.asarray(jax.random.key_data(s.root_key)) for s in (restored, target))
  if saved.shape != expected.shape or not np.array_equal(saved, expected):
    raise CheckpointError(
      f'{path} holds the root key {saved.tolist()}, this config (seed, rng.impl='
      f'{jax.random.key_impl(target.root_key)}) makes {expected.tolist()}: it was made by '
      f'another run; rerun with its seed and rng.impl, or add --start_over'
    )


PATTERN_CHARACTERS = '*?[]'


def check_path(workdir: str) -> None:
  """orbax finds the parts of a checkpoint with glob patterns built on its folder's path: in
  a path holding ``*``, ``?``, ``[`` or ``]`` it finds none, so every checkpoint is saved
  without its merged index (none can be read back), or the save fails. Such a workdir is
  refused before anything is written."""
  path = os.path.abspath(workdir)
  found = sorted({c for c in path if c in PATTERN_CHARACTERS})
  if found:
    raise WorkdirError(
      f'--workdir={workdir}: its path {path} holds {" ".join(found)}, which the checkpoint '
      f'writer (orbax) reads as a file pattern, so no checkpoint could be read back; choose '
      f'a folder whose path has none of {" ".join(PATTERN_CHARACTERS)}'
    )


class Checkpointer:
  """Saves every ``every_steps`` steps and on demand; restores the newest readable one."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.directory = workdir_lib.path(os.path.abspath(workdir), workdir_lib.CHECKPOINTS)
    self.every_steps = config.every_steps
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=config.max_to_keep, enable_async_checkpointing=True
      ),
    )

  def steps(self) -> list:
    return sorted(self._manager.all_steps())

  def due(self, step: int) -> bool:
    return step % self.every_steps == 0

  def save(self, step: int, state) -> None:
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(_to_saveable(state)), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore_latest(self, target):
    """The newest readable checkpoint restored onto ``target``'s structure, shapes and
    shardings, or None when there is none. Unreadable ones are named; when an older one is
    readable they are moved aside, and when none is, nothing is touched."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(target))
    failures, unreadable = [], []
    for step in reversed(self.steps()):
      path = os.path.join(self.directory, str(step))
      try:
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        if int(restored.step) != step:
          raise ValueError(f'it holds step {int(restored.step)}')
      except Exception as e:  # orbax/tensorstore raise many types for damaged files
        failures.append(f'{path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})')
        logging.warning('checkpoint %s is unreadable: %s', path, failures[-1])
        unreadable.append(step)
        continue
      restored = _from_saveable(restored, jax.random.key_impl(target.root_key))
      _check_root_key(restored, target, path)
      for bad in unreadable:
        self._set_aside(bad)
      return restored
    if failures:
      raise CheckpointError(
        f'no readable checkpoint in {self.directory}: {"; ".join(failures)}. Remove '
        f'{self.directory} to train again from scratch keeping the rest of the workdir, or '
        f'add --start_over to start the whole run again'
      )
    return None

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable checkpoint out of the manager's way, keeping it for inspection;
    the step is then saved afresh when training passes it again. Process 0 moves it, every
    process then rereads the directory."""
    if parallel.is_main_process():
      self._move_aside(step)
    parallel.barrier(f'checkpoint {step} set aside')
    self._manager.reload()

  def _move_aside(self, step: int) -> None:
    aside = workdir_lib.path(os.path.dirname(self.directory), workdir_lib.UNREADABLE_CHECKPOINTS)
    os.makedirs(aside, exist_ok=True)
    target = os.path.join(aside, str(step))
    suffix = 0
    while os.path.exists(target):
      suffix += 1
      target = os.path.join(aside, f'{step}.{suffix}')
    os.replace(os.path.join(self.directory, str(step)), target)
    logging.warning('moved the unreadable checkpoint to %s', target)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class PreemptionGuard:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a request that the loops honour at their next
  safe point (after a training or fine-tuning step, or a search chunk), so the run saves and
  exits instead of dying mid-write. A second Ctrl-C stops at once, as Python does.

  A command line owns its process, so it may also ask for a deadline (``hard_stop_after_s``,
  set by ``cli.exit_on_user_errors``): a watcher thread hears the signal even while the main
  thread is inside a long native call (XLA compiling, a latency measurement), and if no safe
  point has ended the process that many seconds later it ends it, with status 143 and one
  line. That loses only what a SIGKILL at the same moment would (every write of the run
  survives being cut short), and never a save in progress: ``finishing()`` holds it off while
  a loop writes its last checkpoint."""

  SIGNALS = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'Ctrl-C (SIGINT)'}
  hard_stop_after_s: float | None = None

  def __init__(self):
    self.requested = False
    self.signal_name = 'SIGTERM'  # of the first request; what messages say stopped the run
    self._previous = {}
    self._finishing = threading.Lock()
    self._watcher = None

  def __enter__(self):
    for signum in self.SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    if self.hard_stop_after_s is not None:
      self._watcher = _SignalWatcher(self, self.hard_stop_after_s)
    return self

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    if not self.requested:
      self.signal_name = self.SIGNALS[signum]
      if signum == signal.SIGINT:
        logging.warning(
          'Ctrl-C: stopping at the next safe point, saving first (press it '
          'again to stop at once, losing the work since the last save)'
        )
    self.requested = True

  @contextlib.contextmanager
  def finishing(self):
    """A last save before stopping: the deadline waits for it."""
    with self._finishing:
      yield

  def __exit__(self, *exc):
    if self._watcher is not None:
      self._watcher.close()
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    return False


class _SignalWatcher:
  """Hears the guard's signals through ``signal.set_wakeup_fd``, which the interpreter writes
  the moment a signal arrives, not when the main thread next runs Python; ends the process
  if the main thread has not stopped ``seconds`` later."""

  def __init__(self, guard: PreemptionGuard, seconds: float):
    self._guard, self._seconds = guard, seconds
    self._read, self._write = socket.socketpair()
    self._write.setblocking(False)
    self._closed = threading.Event()
    self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
    self._thread = threading.Thread(target=self._watch, name='pgnas_jax stop deadline', daemon=True)
    self._thread.start()

  def _watch(self):
    while True:
      byte = self._read.recv(1)
      if self._closed.is_set() or not byte:
        return
      if byte[0] in self._guard.SIGNALS:  # the handler records the request: a second
        heard = self._guard.SIGNALS[byte[0]]  # Ctrl-C is told from the first by that alone
        break
    if self._closed.wait(self._seconds):
      return
    with self._guard._finishing:  # never cut a last save short
      if self._closed.is_set():
        return
      sys.stderr.write(
        f'pgnas_jax: stopped by {heard}, {self._seconds:.0f} s after it '
        f'arrived, inside work that has no safe point (compiling or measuring); what was '
        f'saved is kept: run the same command again to resume\n'
      )
      sys.stderr.flush()
      os._exit(143)

  def close(self):
    self._closed.set()
    signal.set_wakeup_fd(self._previous_fd)
    self._write.send(b'\0')
    self._thread.join()
    self._read.close()
    self._write.close()
