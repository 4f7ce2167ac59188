"""The workdir's records: search/candidates.jsonl lines that this run did not write are found
and cut back, metrics.jsonl reports a damaged middle line, JSON never holds NaN, and a
validation split too small to rank is named."""

import json
import logging
import math
import os
import shutil

import jax
import numpy as np
import pytest
import tiny

from pgnas_jax import metric_writers, records
from pgnas_jax import workdir as workdir_lib

RUN = 'a1b2c3d4e5f6a7b8'


def _strict(text):
  """JSON as other readers take it: NaN and Infinity are not JSON."""

  def refuse(name):
    raise ValueError(f'{name} in JSON')

  return json.loads(text, parse_constant=refuse)


def _lines(n, run=RUN):
  return [
    records.to_line(
      records.make(
        run, i, (0.5 + i / 100, 1.0 - i / 100), (100 - i, 200 - i), {'stage0/group0': i % 3}
      )
    )
    for i in range(n)
  ]


def test_json_files_hold_null_for_non_finite_values(tmp_path):
  path = tmp_path / 'arch.json'
  workdir_lib.write_json(
    str(path),
    {'a': float('nan'), 'b': [1.0, float('inf')], 'c': {'d': -float('inf')}, 'e': (2, 'x')},
  )
  assert _strict(path.read_text()) == {'a': None, 'b': [1.0, None], 'c': {'d': None}, 'e': [2, 'x']}
  writer = metric_writers.JsonlWriter(str(tmp_path / 'metrics.jsonl'), 0)
  writer.write_scalars(2, {'loss': float('nan'), 'mean_p': 0.1})
  writer.close()
  assert _strict((tmp_path / 'metrics.jsonl').read_text()) == {
    'step': 2,
    'loss': None,
    'mean_p': 0.1,
  }
  record = records.make(RUN, 0, (0.1, float('nan')), (1, 2), {})
  assert record['val_loss'] is None  # in memory as on disk
  assert _strict(records.to_line(record)) == record


def _damage(lines, how):
  """The lines with line 3 (candidate 2) damaged as ``how`` says."""
  line = json.loads(lines[2])
  if how == 'nan score':
    damaged = lines[2].replace(f'"val_acc": {line["val_acc"]}', '"val_acc": NaN')
  elif how == 'edited score':
    damaged = lines[2].replace(f'"val_acc": {line["val_acc"]}', '"val_acc": 0.99')
  elif how == 'another run':
    damaged = _lines(3, run='ffffffffffffffff')[2]
  elif how == 'missing fields':
    damaged = json.dumps({k: v for k, v in line.items() if k not in ('run', 'check')}) + '\n'
  elif how == 'blank':
    damaged = '\n'
  elif how == 'cut':
    damaged = lines[2][:25] + '\n'
  elif how == 'out of order':
    return lines[:2] + [lines[3], lines[2]] + lines[4:]
  return lines[:2] + [damaged] + lines[3:]


@pytest.mark.parametrize(
  'how, why',
  [
    ('nan score', 'is not a JSON record (NaN, which pgnas_jax never writes)'),
    ('edited score', 'does not match its checksum (edited or damaged)'),
    ('another run', f"was written by another run (run id ffffffffffffffff, this run's {RUN})"),
    ('missing fields', 'lacks run, check (edited, or written by an older version)'),
    ('blank', 'is blank'),
    ('cut', 'is not a JSON record (cut or damaged)'),
    ('out of order', 'holds candidate 3 where 2 belongs'),
  ],
)
def test_a_candidates_line_this_run_did_not_write_is_cut_back_with_its_reason(
  tmp_path, caplog, how, why
):
  lines = _lines(6)
  path = tmp_path / 'candidates.jsonl'
  path.write_text(''.join(_damage(lines, how)))
  with caplog.at_level(logging.WARNING):
    kept = records.resume(str(path), RUN)
  assert [r['index'] for r in kept] == [0, 1]
  assert kept == [json.loads(line) for line in lines[:2]]
  assert path.read_text() == ''.join(lines[:2])  # the valid prefix, byte for byte
  assert (
    f'{path}: line 3 {why}; cut back to the 2 valid lines before it, the search scores '
    f'again from candidate 2'
  ) in caplog.text


def test_a_candidates_file_of_another_run_is_cut_back_whole(tmp_path, caplog):
  path = tmp_path / 'candidates.jsonl'
  path.write_text(''.join(_lines(4, run='0123456789abcdef')))
  assert records.resume(str(path), RUN) == []
  assert path.read_text() == ''
  assert 'line 1 was written by another run' in caplog.text
  # a finished run's file is read without knowing its run id: the first line's
  path.write_text(''.join(_lines(4)))
  assert [r['index'] for r in records.read(str(path))] == [0, 1, 2, 3]


def test_processes_keep_the_prefix_valid_on_all_of_them(tmp_path, caplog, monkeypatch):
  from pgnas_jax import parallel

  path = tmp_path / 'candidates.jsonl'
  lines = _lines(4)
  path.write_text(''.join(lines))
  monkeypatch.setattr(parallel, 'min_over_processes', lambda n: min(n, 1))  # another's view
  assert [r['index'] for r in records.resume(str(path), RUN)] == [0]
  assert path.read_text() == lines[0]
  assert 'line 2 is not valid on another process; cut back to the 1 valid lines' in caplog.text


def test_run_id_follows_the_weights_the_drop_logits_and_the_search_key():
  key = jax.random.key(3)
  logits = {'a': np.float32(0.5), 'b': np.float32(-1.0)}
  variables = {'params': {'w': np.arange(6, dtype=np.float32)}, 'batch_stats': {}}
  base = records.run_id(key, logits, variables)
  assert len(base) == 16 and base == records.run_id(key, dict(logits), variables)
  weights = {'params': {'w': np.arange(6, dtype=np.float32) + 1e-7}, 'batch_stats': {}}
  others = [
    records.run_id(jax.random.key(4), logits, variables),
    records.run_id(key, {**logits, 'a': np.float32(0.5000001)}, variables),
    records.run_id(key, logits, weights),
  ]
  assert len({base, *others}) == 4


def test_metrics_report_a_cut_middle_line_and_keep_the_lines_after_it(tmp_path, caplog):
  path = tmp_path / 'metrics.jsonl'
  good = [json.dumps({'step': s, 'loss': 1.0 / s}) + '\n' for s in (2, 4, 6, 8, 10)]
  path.write_text(good[0] + good[1][:9] + '\n' + ''.join(good[2:]) + '{"step": 12, "lo')
  with caplog.at_level(logging.WARNING):
    metric_writers.JsonlWriter(str(path), resume_step=8).close()
  # line 2 is named; steps 6 and 8 after it are kept; 10 is past the resumed step; the last
  # line, cut by a kill, goes quietly
  assert path.read_text() == good[0] + good[2] + good[3]
  assert (
    f'{path}: line 2 is not a JSON record with a step (cut or damaged); dropped, the '
    f'lines after it are kept'
  ) in caplog.text
  assert 'line 6' not in caplog.text


def _accs(n, counts):
  return [{'val_acc': c / n} for c in counts]


def test_a_validation_split_too_small_to_rank_is_named_with_the_smallest_useful_size():
  tied = records.unresolved_ranking(_accs(16, [8] * 5), 16)
  assert tied == (
    '--config.data.validation_size=16 is too small to rank: all 5 candidates tie '
    'at validation accuracy 0.5000, so the winner was picked mostly by fewer '
    'parameters; use at least 160 (the differences between candidates are below '
    'one image; 10x is a first guess), or a data set with more images'
  )
  counts = [50] * 9 + [51]  # one candidate one image better: standard deviation 0.3 images
  spread = np.std(np.array(counts) / 100)
  coarse = records.unresolved_ranking(_accs(100, counts), 100)
  assert f'use at least {math.ceil(1 / spread)} (one image is then' in coarse
  assert math.ceil(1 / spread) == 334
  # spread over several images: the ranking resolves them
  assert records.unresolved_ranking(_accs(100, [50, 52, 55, 49, 47]), 100) is None
  assert records.unresolved_ranking(_accs(100, [50]), 100) is None  # one candidate: no ranking


@pytest.fixture
def one_device(monkeypatch):
  monkeypatch.setattr(jax, 'devices', lambda *a: jax.local_devices()[:1])


def _tiny_config():
  return tiny.config(
    {
      'train.num_steps': 2,
      'train.log_every_steps': 1,
      'search.eval_batch_size': 250,
      'search.num_candidates': 8,
      'search.chunk_size': 2,
    }
  )


def test_a_damaged_candidates_file_is_cut_back_and_the_run_ends_as_an_uninterrupted_one(
  tmp_path, caplog, one_device
):
  from pgnas_jax import pipeline

  config = _tiny_config()
  whole, resumed = tmp_path / 'whole', tmp_path / 'resumed'
  arch = pipeline.run(config, str(whole)).arch
  shutil.copytree(whole, resumed)
  # as if killed during the search, after another run's line and a NaN had got in
  for name in ('report.md', 'timings.json', 'search/arch.json'):
    os.remove(resumed / name)
  lines = (whole / 'search' / 'candidates.jsonl').read_text().splitlines(keepends=True)
  nan = lines[3].replace(f'"val_acc": {json.loads(lines[3])["val_acc"]}', '"val_acc": NaN')
  (resumed / 'search' / 'candidates.jsonl').write_text(''.join(lines[:3]) + nan + lines[4])
  with caplog.at_level(logging.WARNING):
    again = pipeline.run(config, str(resumed)).arch
  assert (
    'line 4 is not a JSON record (NaN, which pgnas_jax never writes); cut back to the 3 '
    'valid lines before it, the search scores again from candidate 3'
  ) in caplog.text
  for name in ('search/candidates.jsonl', 'posterior.json', 'search/winner_weights.msgpack'):
    assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name
  assert (resumed / 'report.md').exists()
  assert {k: again[k] for k in ('index', 'val_acc', 'test_acc', 'params')} == {
    k: arch[k] for k in ('index', 'val_acc', 'test_acc', 'params')
  }
  # every line carries this run's id and a checksum
  written = [_strict(line) for line in lines]
  assert len({r['run'] for r in written}) == 1 and all(len(r['check']) == 16 for r in written)
  # the run warns exactly when its candidates cannot be ranked
  unresolved = records.unresolved_ranking(written, config.data.validation_size)
  assert (unresolved in caplog.text) if unresolved else ('too small to rank' not in caplog.text)
