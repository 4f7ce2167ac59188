"""What the command-line entry points share: flag parsing and loading the config with
one-line answers to bad input, and ending the process with one line instead of a
traceback."""
import logging as py_logging
import sys
from collections.abc import Callable

from absl import flags
from ml_collections import config_flags

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
  """Keeps orbax's many INFO lines about its threads, and JAX's about a missing TPU
  library on CPU and GPU, out of the progress log."""
  if observe.is_missing_tpu_notice(record):
    return False
  return record.levelno >= py_logging.WARNING or '/orbax/' not in record.pathname


def parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f'{one_line(e)}; {FIELDS_HELP}')


def define_config_flag(default_path: str):
  """The ``--config`` flag. ml_collections applies ``--config.FIELD`` overrides while the
  flag is defined, so an unknown field surfaces here, not in flag parsing."""
  try:
    return config_flags.DEFINE_config_file(
        'config', default_path,
        'Config file (a Python file with get_config()); fields can be overridden with '
        '--config.FIELD=VALUE.', lock_config=True)
  except (AttributeError, KeyError) as e:
    fail(f'unknown config field on the command line: {one_line(e)}; {FIELDS_HELP}')


def read_config(config_flag):
  try:
    config = config_flag.value
    config.to_dict()  # a config file that failed to load raises only when first used
  except (OSError, AttributeError, KeyError) as e:
    fail(f'cannot load the config: {one_line(e)}')
  return config


def exit_on_user_errors(job: Callable, *args):
  """``job(*args)``; bad input or a failed run ends the process with its one-line message,
  a pre-emption with status 143, that of a process ended by SIGTERM."""
  try:
    return job(*args)
  except errors.Preempted as e:
    fail(one_line(e), status=143)
  except errors.UserFacingError as e:
    fail(one_line(e))
