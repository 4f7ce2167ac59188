"""What the command-line entry points share: flag parsing and loading the config with
one-line answers to bad input, and ending the process with one line instead of a
traceback."""

import logging as py_logging
import os
import sys
import traceback
from collections.abc import Callable

import ml_collections
from absl import flags
from ml_collections import config_flags

from pgnas_jax import checkpoint as checkpoint_lib
from pgnas_jax import config as config_lib
from pgnas_jax import errors, observe

FIELDS_HELP = 'fields are listed in README.md, "Config fields"'


def fail(message: str, status: int = 2):
  print(f'pgnas_jax: {message}', file=sys.stderr)
  sys.exit(status)


def one_line(e: Exception) -> str:
  """An exception's text on one line, without the quoting that KeyError adds."""
  text = str(e)
  if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':
    text = text[1:-1]
  return ' '.join(text.replace('\\n', ' ').replace("\\'", "'").split())


def quiet_libraries(record) -> bool:
  """Keeps orbax's many INFO lines about its threads, its tracebacks of a full disk (the
  run answers that in one line), and JAX's about a missing TPU library on CPU and GPU, out
  of the progress log."""
  if observe.is_missing_tpu_notice(record):
    return False
  from_orbax = '/orbax/' in record.pathname or record.name == 'asyncio'  # its writes' futures
  if from_orbax and 'No space left on device' in _text(record):
    return False
  return record.levelno >= py_logging.WARNING or '/orbax/' not in record.pathname


def _text(record) -> str:
  """A log record's message and the exception it carries."""
  error = record.exc_info[1] if record.exc_info else None
  return f'{record.getMessage()} {error or ""}'


def parse_flags(argv):
  check_config_file(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f'{one_line(e)}; {FIELDS_HELP}')


def check_config_file(argv) -> None:
  """Loads the ``--config`` file once before ml_collections does, so that one that raises, or
  has no ``get_config``, is answered in one line naming the file and the line, not with the
  traceback ml_collections would print. A missing file is left to ml_collections' message."""
  values = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
  values += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == '--config']
  if not values:
    return
  path, _, arg = values[-1].partition(':')  # ml_collections' --config=FILE:ARGUMENT
  if not os.path.isfile(path):
    return
  try:
    get_config = getattr(config_lib.read_config_file(path), 'get_config', None)
    if not callable(get_config):
      fail(
        f'cannot load the config {path}: it defines no get_config(); a config file '
        f'defines get_config() returning an ml_collections.ConfigDict (see configs/)'
      )
    config = get_config(arg) if arg else get_config()
  except Exception as e:  # noqa: BLE001 - the user's code may raise anything
    lines = [
      f.lineno
      for f in traceback.extract_tb(e.__traceback__)
      if os.path.abspath(f.filename) == os.path.abspath(path)
    ]
    where = f' at line {lines[-1]}' if lines else ''
    fail(f'cannot load the config {path}: {type(e).__name__}{where}: {one_line(e)}')
  if not isinstance(config, ml_collections.ConfigDict):
    fail(
      f'cannot load the config {path}: its get_config() returned {type(config).__name__}; a '
      f'config file defines get_config() returning an ml_collections.ConfigDict (see configs/)'
    )


def define_config_flag(default_path: str):
  """The ``--config`` flag. ml_collections applies ``--config.FIELD`` overrides while the
  flag is defined, so an unknown field surfaces here, not in flag parsing."""
  try:
    return config_flags.DEFINE_config_file(
      'config',
      default_path,
      'Config file (a Python file with get_config()); fields can be overridden with '
      '--config.FIELD=VALUE.',
      lock_config=True,
    )
  except (AttributeError, KeyError) as e:
    fail(f'unknown config field on the command line: {one_line(e)}; {FIELDS_HELP}')


def read_config(config_flag):
  try:
    config = config_flag.value
    config.to_dict()  # a config file that failed to load raises only when first used
  except (OSError, AttributeError, KeyError) as e:
    fail(f'cannot load the config: {one_line(e)}')
  return config


STOP_DEADLINE_S = 8.0  # a pre-emption notice gives 30 s on most clouds; we ask for 10


def exit_on_user_errors(job: Callable, *args):
  """``job(*args)``; bad input or a failed run ends the process with its one-line message,
  a pre-emption with status 143, that of a process ended by SIGTERM. The command line owns
  its process, so a stop request is obeyed within ``STOP_DEADLINE_S`` even in work that has
  no safe point (``checkpoint.PreemptionGuard``)."""
  checkpoint_lib.PreemptionGuard.hard_stop_after_s = STOP_DEADLINE_S
  before, sys.excepthook = sys.excepthook, _late_callback_quiet(sys.excepthook)
  try:
    return job(*args)
  except errors.Preempted as e:
    fail(one_line(e), status=143)
  except KeyboardInterrupt:  # Ctrl-C before the run could save (or twice): like SIGTERM's
    fail(
      'stopped by Ctrl-C; what was saved is kept: run the same command again to resume', status=143
    )
  except errors.UserFacingError as e:
    fail(one_line(e))
  finally:
    checkpoint_lib.PreemptionGuard.hard_stop_after_s = None
    sys.excepthook = before


def _late_callback_quiet(excepthook):
  """tensorstore finishes the writes of a failed orbax save (a full disk) after orbax has
  closed their event loop, and each one's callback prints "Event loop is closed" through
  ``sys.excepthook``: harmless, the run answers the failure in one line. Anything else is
  shown as before."""

  def hook(kind, error, trace):
    late = kind is RuntimeError and str(error) == 'Event loop is closed'
    if not (late and traceback.extract_tb(trace)[-1].filename.endswith('asyncio/base_events.py')):
      excepthook(kind, error, trace)

  return hook
