"""Errors that answer bad input or a failed run; each message says what went wrong and how
to fix it, and the main job prints it as one line instead of a traceback."""


class UserFacingError(Exception):
  """Base class: the message is meant for the person running pgnas_jax."""


class ConfigError(UserFacingError, ValueError):
  """A config value that cannot run; the message names the field and what to use."""


class MissingDataError(UserFacingError, FileNotFoundError):
  """A data set is not where the config says; the message says how to get it."""


class DataError(UserFacingError, ValueError):
  """A data set's files or values cannot be used (unreadable, truncated, labels out of range,
  shapes that disagree, non-finite pixels); the message names the file or split and the fix."""


class NonFiniteLossError(UserFacingError, FloatingPointError):
  """Training produced a NaN or Inf loss; the message names the step."""


class CheckpointError(UserFacingError):
  """The workdir's checkpoints cannot be used; the message says which and what to do."""


class IncompatibleWorkdirError(UserFacingError):
  """The workdir holds a run made with another config."""


class Preempted(UserFacingError):
  """SIGTERM or Ctrl-C arrived; the run saved its state and stopped. Running it again
  resumes."""


class ExportError(UserFacingError):
  """A workdir or candidate that cannot be exported; the message says which and why."""


class WorkdirError(UserFacingError):
  """The workdir cannot hold this run (another job holds it, it is a file, not writable,
  full, or left in a state the run cannot continue from); the message says what to do."""


class BudgetError(UserFacingError):
  """No scored candidate fits search.max_params / search.max_flops; the message says how
  many were scored, the smallest found and what to change."""
