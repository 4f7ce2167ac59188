"""What a run shows about itself besides its results: the mean drop probability per stage,
the parameter overview logged at start, ``jax.profiler`` traces of chosen training steps,
and the start-up log line that is only noise on CPU and GPU, hidden."""

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from pgnas_jax import layers, masks

PyTree = Any


def stage_of(group_name: str) -> str:
  """The stage a searchable group belongs to: the first part of its name up to '_'
  (``stage1_block0/...`` -> ``stage1``, DenseNet ``block2_layer5/...`` -> ``block2``); an
  ENAS cell (``cell7/...``) is its own stage, as its names carry no stage."""
  return group_name.split('/')[0].split('_')[0]


def stage_mean_p(drop_logits: PyTree, template: PyTree) -> dict:
  """``{'mean_p/<stage>': p}``: per stage, the expected share of its searchable channels
  dropped (the stage's part of ``mean_p``)."""
  logits = jax.device_get(drop_logits)  # tiny: one scalar per group
  paths = jax.tree_util.tree_flatten_with_path(template)[0]
  groups = {}  # stage -> (drop probabilities, channel counts), groups in order
  for (path, mask), logit in zip(paths, jax.tree.leaves(logits)):
    p, n = groups.setdefault(stage_of('/'.join(k.key for k in path)), ([], []))
    p.append(1.0 / (1.0 + np.exp(-float(logit))))
    n.append(mask.shape[-1])
  return {f'mean_p/{stage}': masks.mean_drop_probability(p, n) for stage, (p, n) in groups.items()}


def parameter_overview(params: PyTree, template: PyTree) -> str:
  """A table of the super-network's parameter arrays, one line each: name, shape, count and,
  for the kernels of a searchable conv, the input channels of each of its groups."""
  flat_template = traverse_util.flatten_dict(template)
  groups = {
    conv: '+'.join(str(flat_template[g].shape[-1]) for g in group_paths)
    for conv, group_paths in layers.groups_by_conv(template).items()
  }
  rows = [
    (
      '/'.join(path),
      'x'.join(map(str, x.shape)) or 'scalar',
      f'{int(np.prod(x.shape)):,}',
      groups.get(path[:-1], ''),
    )
    for path, x in traverse_util.flatten_dict(params).items()
  ]
  header = ('parameter', 'shape', 'count', 'groups (input channels)')
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
  lines = [
    f'{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}'.rstrip()
    for r in [header] + rows
  ]
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  searchable = jax.tree.leaves(template)
  lines.append(
    f'{total:,} parameters in {len(rows)} arrays; {len(searchable)} searchable '
    f'groups, {sum(m.shape[-1] for m in searchable):,} channels'
  )
  return 'super-network parameters:\n' + '\n'.join(lines)


def _consecutive_runs(steps: Sequence[int]) -> list:
  """(first, last) of each run of consecutive steps: (3, 4, 5, 9) -> [(3, 5), (9, 9)]."""
  runs = []
  for s in sorted(set(steps)):
    if runs and s == runs[-1][1] + 1:
      runs[-1] = (runs[-1][0], s)
    else:
      runs.append((s, s))
  return runs


class StepProfiler:
  """``jax.profiler`` traces of chosen training steps (counted from 1, as metrics.jsonl's
  ``step``). Each run of consecutive chosen steps is one trace in its own folder,
  ``DIRECTORY/steps_A-B/`` (TensorBoard's profile plugin reads it; its ``trace.json.gz``
  opens in Perfetto); a run resumed inside such a run traces the rest of it. The device work
  before the first traced step is waited for, and so is the last traced step's, so a trace
  holds exactly its steps. With no steps chosen it only calls the step."""

  def __init__(self, directory: str, steps: Sequence[int], total_steps: int, enabled: bool = True):
    self._directory = directory
    runs = _consecutive_runs(steps) if enabled else []
    self._last_of = {s: last for first, last in runs for s in range(first, last + 1)}
    self._last = None  # the last step of the trace in progress
    self._trace_dir = None
    late = [s for s in sorted(set(steps)) if s > total_steps]
    if enabled and late:
      logging.warning(
        'log.profile_steps %s come after the last training step, %d: not traced', late, total_steps
      )

  def call(self, step: int, step_fn: Callable, state, *args):
    """``step_fn(state, *args)``, the training step ``step``, traced when chosen."""
    if self._last is None and step in self._last_of:
      jax.block_until_ready(state)
      self._last = self._last_of[step]
      self._trace_dir = os.path.join(self._directory, f'steps_{step}-{self._last}')
      jax.profiler.start_trace(self._trace_dir)
    if self._last is None:
      return step_fn(state, *args)
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      out = step_fn(state, *args)
    if step == self._last:
      jax.block_until_ready(out)
      self.stop()
    return out

  def stop(self) -> None:
    if self._last is not None:
      self._last = None
      jax.profiler.stop_trace()
      logging.info('profiler trace written to %s', self._trace_dir)

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.stop()  # training stopped inside a trace (end, SIGTERM, non-finite loss)


_MISSING_TPU_NOTICE = "Unable to initialize backend 'tpu'"


def is_missing_tpu_notice(record: logging.LogRecord) -> bool:
  """JAX's INFO line at start-up that libtpu is not installed, which every CPU and GPU run
  prints. On a machine with a TPU but without libtpu JAX warns separately ('A Google TPU may
  be present ...'); a TPU that libtpu fails to open is another message, kept."""
  return (
    record.name == 'jax._src.xla_bridge'
    and record.levelno == logging.INFO
    and record.getMessage().startswith(_MISSING_TPU_NOTICE)
    and 'Failed to open libtpu' in record.getMessage()
  )
