"""The workdir of a run: the name of everything the run writes there, relative to the
workdir, and the atomic write that keeps a kill from leaving half a file. README.md, "What a
run writes", says what each one holds. Outside every workdir, ``cache_dir``: what pgnas_jax
builds or measures once per machine."""

import json
import math
import os

CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
POSTERIOR = 'posterior.json'
TIMINGS = 'timings.json'
REPORT = 'report.md'  # written last: its presence marks the run finished
SEARCH = 'search'
CANDIDATES = f'{SEARCH}/candidates.jsonl'
ARCH = f'{SEARCH}/arch.json'
WINNER_WEIGHTS = f'{SEARCH}/winner_weights.msgpack'
WINNER_FINETUNED_WEIGHTS = f'{SEARCH}/winner_finetuned_weights.msgpack'
PARETO = f'{SEARCH}/pareto.json'
LATENCY_TABLE = f'{SEARCH}/latency_table.json'  # when the run predicts latency
PLOTS = 'plots'
POSTERIOR_PLOT = f'{PLOTS}/drop_probabilities.png'
CANDIDATES_PLOT = f'{PLOTS}/candidate_val_accuracy.png'
TRAINING_PLOT = f'{PLOTS}/training.png'
PARETO_PLOT = f'{PLOTS}/pareto.png'
CHECKPOINTS = 'checkpoints'
UNREADABLE_CHECKPOINTS = 'checkpoints_unreadable'
TENSORBOARD = 'tensorboard'  # event files, when tensorboardX is installed
PROFILE = 'profile'  # jax.profiler traces of log.profile_steps
STARTED_OVER = '.started_over'  # the run was begun by --start_over: its rerun resumes it
MODULE_SOURCE = 'module_source.json'  # a custom module's source file and digest
# Everything above, the top-level names: what --start_over deletes.
OUTPUTS = (
  CONFIG,
  METRICS,
  POSTERIOR,
  TIMINGS,
  REPORT,
  SEARCH,
  PLOTS,
  CHECKPOINTS,
  UNREADABLE_CHECKPOINTS,
  TENSORBOARD,
  PROFILE,
  STARTED_OVER,
  MODULE_SOURCE,
)
# What a finished run holds beside report.md; one missing is made again by the rerun.
FINISHED_OUTPUTS = (
  CONFIG,
  METRICS,
  POSTERIOR,
  TIMINGS,
  CANDIDATES,
  ARCH,
  WINNER_WEIGHTS,
  POSTERIOR_PLOT,
  CANDIDATES_PLOT,
  TRAINING_PLOT,
)


def cache_dir() -> str:
  """``$XDG_CACHE_HOME/pgnas_jax`` (else ``~/.cache/pgnas_jax``): the CPU kernels' library
  and the latency table's entries, kept for every later run on this machine."""
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'pgnas_jax')


def path(workdir: str, name: str) -> str:
  """Where ``name`` (one of the names above) lies in ``workdir``."""
  return os.path.join(workdir, name)


def write_atomically(path: str, data: str | bytes) -> None:
  """Written to a temporary file and renamed, so a kill never leaves half a file."""
  with open(path + '.tmp', 'wb' if isinstance(data, bytes) else 'w') as f:
    f.write(data)
  os.replace(path + '.tmp', path)


def finite(obj):
  """``obj`` with every non-finite float replaced by None: JSON has no NaN or Infinity (the
  ``NaN`` Python writes by default is not JSON, and other readers refuse it)."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite(v) for v in obj]
  return obj


def to_json(obj, **kwargs) -> str:
  """The one way the workdir's JSON is written: non-finite floats as null."""
  return json.dumps(finite(obj), allow_nan=False, **kwargs)


def write_json(path: str, obj) -> None:
  write_atomically(path, to_json(obj, indent=1) + '\n')


def read_json(path: str):
  with open(path) as f:
    return json.load(f)
