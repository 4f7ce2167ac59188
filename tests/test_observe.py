"""Observability: TensorBoard event files beside metrics.jsonl (and nothing else changed
without tensorboardX), mean p per stage, the search's best so far, profiler traces of chosen
steps, the parameter overview, and JAX's missing-TPU line kept out of the log."""

import glob
import gzip
import json
import logging
import os
import struct
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

import tiny
from tensorboardX.proto import event_pb2

from pgnas_jax import config as config_lib
from pgnas_jax import data as data_lib
from pgnas_jax import cli, masks, metric_writers, observe, parallel, samplers, search
from pgnas_jax import space as space_lib

STEPS, LOG_EVERY, PROFILED = 4, 2, 3


def _events(path: str):
  """The Event records of one file: TFRecord framing (length, its CRC, the serialised
  Event, its CRC), read without TensorBoard."""
  with open(path, 'rb') as f:
    data = f.read()
  i = 0
  while i < len(data):
    (n,) = struct.unpack('<Q', data[i : i + 8])
    yield event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
    i += 12 + n + 4


def read_scalars(directory: str) -> dict:
  """tag -> [(step, value)] over the event files in ``directory``."""
  scalars = {}
  for path in sorted(glob.glob(os.path.join(directory, 'events.out.tfevents.*'))):
    for event in _events(path):
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


@pytest.fixture(scope='module')
def run(tiny_net, tmp_path_factory):
  """One tiny training with tensorboardX installed (the test extra)."""
  workdir = tmp_path_factory.mktemp('run')
  config = tiny.default_config(
    {
      'train.batch_size': 8,
      'train.num_steps': STEPS,
      'train.log_every_steps': LOG_EVERY,
      'log.profile_steps': (PROFILED,),
    }
  )
  state, space = tiny.trained(tiny_net, config, workdir)
  return workdir, jax.device_get(state.params['drop_logits']), space


@pytest.mark.xdist_group('observe_run')  # shares a module fixture
def test_event_files_hold_the_logged_scalars_and_mean_p_per_stage(run):
  workdir, logits, space = run
  metrics = tiny.metrics(workdir)
  assert [m['step'] for m in metrics] == [2, 4]
  scalars = read_scalars(str(workdir / 'tensorboard' / 'train'))
  assert set(scalars) == (set(metrics[0]) - {'step'}) | {'mean_p/stage0', 'mean_p/stage1'}
  assert all([s for s, _ in values] == [2, 4] for values in scalars.values())
  for name in set(metrics[0]) - {'step'}:  # event files hold float32
    np.testing.assert_allclose(
      [v for _, v in scalars[name]], [m[name] for m in metrics], rtol=1e-6, atol=1e-12
    )
  # mean p per stage after the last step, from the final drop logits
  p = {
    '/'.join(k.key for k in path): (1 / (1 + np.exp(-float(x))), mask.shape[-1])
    for (path, mask), x in zip(
      jax.tree_util.tree_flatten_with_path(space.template)[0], jax.tree.leaves(logits)
    )
  }
  for stage in ('stage0', 'stage1'):
    rows = [(q, n) for name, (q, n) in p.items() if name.startswith(stage + '_')]
    expected = sum(q * n for q, n in rows) / sum(n for _, n in rows)
    assert scalars[f'mean_p/{stage}'][-1][1] == pytest.approx(expected, rel=1e-6)


def _write_training_scalars(workdir, resume_step=0):
  with metric_writers.for_training(
    str(workdir), resume_step, config_lib.get_config().log
  ) as writer:
    for step in (2, 4):
      writer.write_scalars(step, {'loss': 1.0 / step, 'mean_p': 0.1, 'mean_p/stage0': 0.2})


def test_without_tensorboardx_no_event_files_and_nothing_else_changes(tmp_path, monkeypatch):
  """The training loop writes only through the writer ``for_training`` makes; without
  tensorboardX it is metrics.jsonl alone, written exactly as with it."""
  (tmp_path / 'with').mkdir()
  (tmp_path / 'without').mkdir()
  _write_training_scalars(tmp_path / 'with')
  monkeypatch.setitem(sys.modules, 'tensorboardX', None)  # import raises ImportError
  _write_training_scalars(tmp_path / 'without')
  with metric_writers.for_search(str(tmp_path / 'without'), config_lib.get_config().log) as w:
    w.write_scalars(4, {'best_val_acc': 0.5})
  assert os.listdir(tmp_path / 'without') == ['metrics.jsonl']
  assert sorted(os.listdir(tmp_path / 'with')) == ['metrics.jsonl', 'tensorboard']
  assert (
    (tmp_path / 'with' / 'metrics.jsonl').read_bytes()
    == (tmp_path / 'without' / 'metrics.jsonl').read_bytes()
    == b'{"step": 2, "loss": 0.5, "mean_p": 0.1}\n{"step": 4, "loss": 0.25, "mean_p": 0.1}\n'
  )


def test_a_resumed_run_purges_the_events_it_writes_again(tmp_path):
  """Resumed at step 2 after logging step 4: metrics.jsonl drops the line, and TensorBoard
  is told to drop the events from step 3 on (SessionLog START at the purge step)."""
  _write_training_scalars(tmp_path)
  metric_writers.for_training(str(tmp_path), 2, config_lib.get_config().log).close()
  assert [m['step'] for m in tiny.metrics(tmp_path)] == [2]
  files = sorted(glob.glob(str(tmp_path / 'tensorboard' / 'train' / 'events.out.tfevents.*')))
  assert len(files) == 2
  starts = [
    e.step for e in _events(files[-1]) if e.session_log.status == event_pb2.SessionLog.START
  ]
  assert starts == [3]


@pytest.mark.xdist_group('observe_run')  # shares a module fixture
def test_profiler_traces_the_chosen_step(run):
  workdir = run[0]
  assert os.listdir(workdir / 'profile') == [f'steps_{PROFILED}-{PROFILED}']
  traces = glob.glob(
    str(workdir / 'profile' / '*' / 'plugins' / 'profile' / '*' / '*.trace.json.gz')
  )
  assert len(traces) == 1 and glob.glob(traces[0].replace('.trace.json.gz', '.xplane.pb'))
  with gzip.open(traces[0]) as f:
    events = json.load(f)['traceEvents']
  steps = {e['args'].get('step_num') for e in events if e.get('name') == 'train'}
  assert steps == {str(PROFILED)}


def test_profiler_resumed_inside_a_run_traces_the_rest(tmp_path, caplog):
  step_fn = jax.jit(lambda x: x + 1)
  x = jax.numpy.zeros(3)
  with observe.StepProfiler(str(tmp_path), (2, 3, 4, 7), total_steps=5) as profiler:
    for step in range(3, 6):  # resumed after step 2
      x = profiler.call(step, step_fn, x)
  assert os.listdir(tmp_path) == ['steps_3-4'] and float(x[0]) == 3.0
  assert 'log.profile_steps [7] come after the last training step, 5' in caplog.text


def test_search_writes_best_so_far_against_candidates_scored(tiny_net, tiny_variables, tmp_path):
  class Recorder:
    def __init__(self):
      self.rows = []

    def write_scalars(self, step, scalars):
      self.rows.append((step, scalars['best_val_acc']))

  mesh = parallel.make_mesh(jax.devices()[:1])
  dataset = tiny.synthetic_dataset()
  variables = {k: tiny_variables[k] for k in ('params', 'batch_stats')}
  space = space_lib.from_variables(tiny_variables)
  logits = masks.init_drop_logits(space.template, 0.4)
  validation = data_lib.replicated_batches(dataset.validation, dataset, 16, mesh)
  # what rank_candidates reads of the train state: weights, drop logits, the search key
  state = types.SimpleNamespace(
    variables=variables, drop_logits=logits, key=lambda purpose: jax.random.key(1)
  )
  scorer = search.Scorer(tiny_net, mesh, 'float32')
  out = str(tmp_path / 'candidates.jsonl')
  guard = types.SimpleNamespace(requested=False)
  written = Recorder()
  for num in (4, 10):  # the second call resumes after the four recorded candidates
    config = config_lib.get_config().search
    config.num_candidates, config.chunk_size = num, 4
    log = search.RankingLog(out, guard, written)
    records = search.rank_candidates(
      scorer, state, space, search.Validation(validation), config, samplers.IID, log
    )
  accs = [r['val_acc'] for r in records]
  assert written.rows == [(n, max(accs[:n])) for n in (4, 8, 10)]


def test_parameter_overview_lists_every_array_and_the_groups(tiny_variables):
  text = observe.parameter_overview(tiny_variables['params'], tiny_variables['masks'])
  rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:-1]}
  flat = {
    '/'.join(k.key for k in path): x
    for path, x in jax.tree_util.tree_flatten_with_path(tiny_variables['params'])[0]
  }
  assert set(rows) == set(flat)
  for name, x in flat.items():
    assert rows[name][:2] == ['x'.join(map(str, x.shape)), f'{x.size:,}']
  # searchable kernels: the input channels of their groups (stage 1 reads 4, then 8)
  assert rows['stage1_block0/branch0/conv0/kernel'][2:] == ['4']
  assert rows['stage1_block0/branch0/conv1/kernel'][2:] == ['8']
  assert rows['stem/kernel'][2:] == []
  total = sum(x.size for x in flat.values())
  assert text.splitlines()[-1].startswith(f'{total:,} parameters in {len(flat)} arrays; 8 ')


def test_new_log_fields_are_validated():
  c = config_lib.get_config()
  c.log.profile_steps = (0, 3)
  with pytest.raises(config_lib.ConfigError, match='log.profile_steps'):
    config_lib.validate(c)


def test_jax_missing_tpu_line_is_kept_out_of_the_log_and_nothing_else():
  """A fresh process without JAX_PLATFORMS, as users run it: JAX logs the line, and
  cli.quiet_libraries (the log's filter) drops that record and no other of JAX's."""
  code = (
    'import logging, jax\n'
    'from pgnas_jax import cli\n'
    'records = []\n'
    'handler = logging.Handler(); handler.emit = records.append\n'
    'logging.getLogger("jax").addHandler(handler); logging.getLogger("jax").setLevel(1)\n'
    'jax.devices()\n'
    'for r in records: print(cli.quiet_libraries(r), r.levelname, r.getMessage()[:60])\n'
  )
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS', 'XLA_FLAGS')}
  out = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120, check=True
  ).stdout.splitlines()
  hidden = [line for line in out if line.startswith('False')]
  assert hidden == ["False INFO Unable to initialize backend 'tpu': INTERNAL: Failed to open"]
  # a TPU that libtpu fails to open, and any warning, are still shown
  for level, message in (
    (logging.INFO, "Unable to initialize backend 'tpu': TPU busy"),
    (logging.WARNING, 'A Google TPU may be present on this machine'),
  ):
    record = logging.LogRecord('jax._src.xla_bridge', level, 'xla_bridge.py', 1, message, (), None)
    assert cli.quiet_libraries(record)
