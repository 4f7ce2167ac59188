"""The workdir of a run: the name of everything the run writes there, relative to the
workdir, and the atomic write that keeps a kill from leaving half a file. README.md, "What a
run writes", says what each one holds."""
import json
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
PLOTS = 'plots'
POSTERIOR_PLOT = f'{PLOTS}/drop_probabilities.png'
CANDIDATES_PLOT = f'{PLOTS}/candidate_val_accuracy.png'
TRAINING_PLOT = f'{PLOTS}/training.png'
PARETO_PLOT = f'{PLOTS}/pareto.png'
CHECKPOINTS = 'checkpoints'
UNREADABLE_CHECKPOINTS = 'checkpoints_unreadable'
TENSORBOARD = 'tensorboard'  # event files, when tensorboardX is installed
PROFILE = 'profile'  # jax.profiler traces of log.profile_steps
# Everything above, the top-level names: what --start_over deletes.
OUTPUTS = (CONFIG, METRICS, POSTERIOR, TIMINGS, REPORT, SEARCH, PLOTS, CHECKPOINTS,
           UNREADABLE_CHECKPOINTS, TENSORBOARD, PROFILE)


def path(workdir: str, name: str) -> str:
  """Where ``name`` (one of the names above) lies in ``workdir``."""
  return os.path.join(workdir, name)


def write_atomically(path: str, data: str | bytes) -> None:
  """Written to a temporary file and renamed, so a kill never leaves half a file."""
  with open(path + '.tmp', 'wb' if isinstance(data, bytes) else 'w') as f:
    f.write(data)
  os.replace(path + '.tmp', path)


def write_json(path: str, obj) -> None:
  write_atomically(path, json.dumps(obj, indent=1) + '\n')


def read_json(path: str):
  with open(path) as f:
    return json.load(f)
