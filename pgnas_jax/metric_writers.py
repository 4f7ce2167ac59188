"""Where a run's scalars go. The training loop and the search are handed a writer with
``write_scalars(step, scalars)``, as flax's and scenic's loops are, and do not know where
the numbers end up: ``metrics.jsonl`` (the workdir contract) is one writer, TensorBoard
event files (through tensorboardX, an optional extra without TensorFlow) another.

Only process 0 writes; the writers of the other processes write nothing.
"""

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from pgnas_jax import parallel
from pgnas_jax import workdir as workdir_lib


class MetricWriter(Protocol):
  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

  def close(self) -> None: ...


def flat_name(name: str) -> bool:
  """Names without '/' are the logging line's own scalars; grouped ones (``mean_p/stage0``)
  are for TensorBoard only, so that metrics.jsonl keeps its documented keys."""
  return '/' not in name


def _step(line: str) -> int | None:
  """The step of a complete metrics line, None for a line that is not one."""
  try:
    record = json.loads(line)
    return record['step'] if line.endswith('\n') and isinstance(record['step'], int) else None
  except (ValueError, KeyError, TypeError):
    return None


def lines_up_to(path: str, resume_step: int) -> list:
  """The lines of ``path`` up to ``resume_step``. A last line cut short by a kill is dropped
  quietly; any other line that is not a record (blank, cut, damaged) is dropped with a
  warning naming it, and the lines after it are kept."""
  with open(path, errors='replace') as f:
    lines = f.readlines()
  kept = []
  for number, line in enumerate(lines, 1):
    step = _step(line)
    cut_by_a_kill = number == len(lines) and not line.endswith('\n')
    if step is None and not cut_by_a_kill:
      logging.warning(
        '%s: line %d is not a JSON record with a step (cut or damaged); '
        'dropped, the lines after it are kept',
        path,
        number,
      )
    elif step is not None and step <= resume_step:
      kept.append(line)
  return kept


class JsonlWriter:
  """One JSON line per step, ``{"step": N, **scalars}``, flushed as written. Opened for
  appending without the lines past ``resume_step``: a run that died after logging but
  before its next checkpoint logs those steps again."""

  def __init__(self, path: str, resume_step: int, keep: Callable[[str], bool] = flat_name):
    self._keep = keep
    kept = lines_up_to(path, resume_step) if os.path.exists(path) else []
    workdir_lib.write_atomically(path, ''.join(kept))
    self._file = open(path, 'a')

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    line = {'step': step, **{k: v for k, v in scalars.items() if self._keep(k)}}
    self._file.write(workdir_lib.to_json(line) + '\n')
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class TensorBoardWriter:
  """Scalars as TensorBoard event files in ``directory``, flushed at every write (a logging
  step is rare enough) so that a live TensorBoard and a killed run see them all. With
  ``purge_step``, TensorBoard discards the events an earlier, interrupted run wrote from
  that step on: the resumed run writes them again."""

  def __init__(self, directory: str, purge_step: int | None = None):
    import tensorboardX  # the optional extra; see tensorboard_available()

    # File names hold the second the file was opened and are opened for writing, not
    # appending: the nanoseconds keep a run resumed within the second from overwriting the
    # earlier file, and keep the files in order for TensorBoard, which reads them by name.
    self._writer = tensorboardX.SummaryWriter(
      directory, purge_step=purge_step, filename_suffix=f'.{time.time_ns()}'
    )

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), step)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MultiWriter:
  """Hands every write to each of ``writers``; none at all writes nothing."""

  def __init__(self, writers: Sequence[MetricWriter] = ()):
    self._writers = tuple(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    for writer in self._writers:
      writer.write_scalars(step, scalars)

  def close(self) -> None:
    for writer in self._writers:
      writer.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def tensorboard_available(log_config, say_why: bool = False) -> bool:
  """``log.tensorboard`` is on and tensorboardX imports. Without the extra a run goes on as
  before; ``say_why`` adds one line to the log saying how to get the event files."""
  if not log_config.tensorboard:
    return False
  try:
    import tensorboardX  # noqa: F401
  except ImportError:
    if say_why:
      logging.info(
        'tensorboardX is not installed: no TensorBoard event files (pip install '
        "-e '.[tensorboard]' to get them)"
      )
    return False
  return True


NO_WRITER = MultiWriter()  # writes nowhere


def for_training(workdir: str, resume_step: int, log_config) -> MultiWriter:
  """``metrics.jsonl`` and, when available, ``tensorboard/train/``, continuing a run
  resumed at ``resume_step``."""
  if not parallel.is_main_process():
    return MultiWriter()
  writers = [JsonlWriter(workdir_lib.path(workdir, workdir_lib.METRICS), resume_step)]
  if tensorboard_available(log_config, say_why=True):
    writers.append(
      TensorBoardWriter(
        os.path.join(workdir, workdir_lib.TENSORBOARD, 'train'), purge_step=resume_step + 1
      )
    )
  return MultiWriter(writers)


def for_search(workdir: str, log_config) -> MultiWriter:
  """``tensorboard/search/`` when available (the candidates' own record is
  ``search/candidates.jsonl``). Its steps are candidates scored; a resumed search writes
  only candidates not written before, so nothing is purged."""
  if not parallel.is_main_process() or not tensorboard_available(log_config):
    return MultiWriter()
  return MultiWriter([TensorBoardWriter(os.path.join(workdir, workdir_lib.TENSORBOARD, 'search'))])
