"""One run per workdir: an exclusive lock held for the whole job.

The lock is ``flock`` on ``WORKDIR/.lock``. The kernel releases it when its holder dies, however
it dies, so a lock left by a killed run never blocks a rerun; the file itself only names the
holder (host, pid, start time, command) for the message a second job gets. With several
processes one run holds it, taken by process 0 (every process learns whether it got it).
On filesystems without locks (some FUSE mounts) the run warns and goes on unlocked.
"""

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys

from pgnas_jax import parallel
from pgnas_jax.errors import WorkdirError

FILENAME = '.lock'
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _holder_text(path: str) -> str:
  """The holder as its lock file names it; a job still starting up has not named itself yet
  (the file may still name an earlier, dead holder)."""
  try:
    with open(path) as f:
      holder = json.load(f)
    if holder['host'] == socket.gethostname() and not _alive(holder['pid']):
      raise ValueError('an earlier holder')
    return (
      f'pid {holder["pid"]} on {holder["host"]}, started {holder["started"]}: {holder["command"]}'
    )
  except (OSError, ValueError, KeyError, TypeError):
    return 'a job starting up, not yet named in its .lock'


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """Held from ``acquire`` to ``release``; ``release`` also removes the lock file (and the
  workdir when acquiring created it and nothing else was written there)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, FILENAME)
    self._fd = None
    self._created_workdir = False
    self._found = None  # the lock file as this job found it (a killed job's), or None

  def acquire(self) -> None:
    """Takes the lock (process 0) and agrees the outcome with every process, raising
    WorkdirError on all of them when another job holds it or the workdir cannot be used."""
    message = ''
    if parallel.is_main_process():
      try:
        message = self._take()
      except WorkdirError as e:
        message = str(e)
    if parallel.any_process(bool(message)):
      raise WorkdirError(
        message
        or f'--workdir={self.workdir} cannot be locked by process 0 of this run (its log says why)'
      )

  def _take(self) -> str:
    """Returns '' once the lock is held, or the refusal's message."""
    if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
      raise WorkdirError(
        f'--workdir={self.workdir} is a file, not a folder: give a folder '
        f'(it is created if missing)'
      )
    self._created_workdir = not os.path.exists(self.workdir)
    found = os.path.exists(self.path)
    try:
      os.makedirs(self.workdir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(
        f'--workdir={self.workdir} cannot be written ({e.strerror}): give a '
        f'folder this user can write to, or fix its permissions'
      ) from None
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        return (
          f'--workdir={self.workdir} is in use by another run ({_holder_text(self.path)});'
          f' wait for it to finish or stop it, or choose another --workdir'
        )
      except OSError as e:
        if e.errno not in _NO_LOCKS:
          os.close(fd)
          raise
        logging.warning(
          'the filesystem of %s has no file locks (%s): two runs started on it '
          'would not be stopped from writing together',
          self.workdir,
          e.strerror,
        )
      # A releasing holder unlinks the file while holding the lock: the file we locked may be
      # that unlinked one, so lock again until the path and our file are the same.
      if os.path.exists(self.path) and os.path.samestat(os.fstat(fd), os.stat(self.path)):
        break
      os.close(fd)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    self._fd = fd
    self._found = os.pread(fd, os.fstat(fd).st_size, 0) if found else None
    return ''

  def claim(self) -> None:
    """Names this job as the holder, once it starts writing the workdir (process 0)."""
    holder = {
      'pid': os.getpid(),
      'host': socket.gethostname(),
      'started': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC'),
      'command': ' '.join(sys.argv),
    }
    self._write(json.dumps(holder).encode() + b'\n')

  def _write(self, data: bytes) -> None:
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, data, 0)

  def release(self, failed: bool = False) -> None:
    """Unlocks. The lock file goes, unless the job failed and found one (a killed job's):
    that is put back as it was, so a failed job leaves the workdir as it found it."""
    if self._fd is None:
      return
    if failed and self._found is not None:
      self._write(self._found)
    else:
      try:
        os.remove(self.path)  # while still locked: a waiting job then locks a fresh file
      except FileNotFoundError:
        pass
    os.close(self._fd)
    self._fd = None
    if self._created_workdir:
      try:
        os.rmdir(self.workdir)  # only when empty: the run wrote nothing
      except OSError:
        pass

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, exc_type, *exc):
    self.release(failed=exc_type is not None)
    return False
