"""Budgets (search.max_params, search.max_flops) and the Pareto fronts of the candidates."""

import json

import pytest

import tiny

from pgnas_jax import budget as budget_lib
from pgnas_jax import errors, pareto, search


def _record(index, val_acc, params, flops=0):
  return {'index': index, 'val_acc': val_acc, 'params': params, 'flops': flops}


@pytest.mark.parametrize(
  'value, full, expected',
  [
    (0, 1000, None),
    (400, 1000, 400),
    (4e2, 1000, 400),
    (0.5, 1000, 500),
    (1.0, 1000, 1000),
    ('50%', 1000, 500),
    ('12.5%', 1000, 125),
    ('100%', 1000, 1000),
  ],
)
def test_budget_forms_resolve_to_counts(value, full, expected):
  assert budget_lib.is_valid(value)
  assert budget_lib.resolve(value, full) == expected


@pytest.mark.parametrize('value', [-1, 2.5, 0.0, -0.5, '0%', '150%', '50', 'half', True, None])
def test_budget_forms_that_are_refused(value):
  assert not budget_lib.is_valid(value)


def test_winner_is_the_best_candidate_that_fits():
  records = [
    _record(0, 0.95, 900, 90),
    _record(1, 0.93, 500, 60),
    _record(2, 0.93, 450, 80),
    _record(3, 0.91, 300, 30),
    _record(4, 0.94, 700, 40),
  ]
  assert search.choose_winner(records)['index'] == 0
  assert search.choose_winner(records, budget_lib.Budget(max_params=800))['index'] == 4
  # equal accuracy among those that fit: fewer parameters
  assert search.choose_winner(records, budget_lib.Budget(max_params=600))['index'] == 2
  # both budgets must hold
  assert search.choose_winner(records, budget_lib.Budget(600, 70))['index'] == 1
  assert search.choose_winner(records, budget_lib.Budget(max_flops=50))['index'] == 4
  assert search.choose_winner(records, budget_lib.Budget(300, 30))['index'] == 3
  marked = budget_lib.mark(records, budget_lib.Budget(600, 70))
  assert [r['fits'] for r in marked] == [False, True, False, True, False]


def test_a_budget_nothing_fits_says_what_to_change():
  records = [_record(0, 0.95, 900, 90), _record(1, 0.93, 500, 60), _record(2, 0.91, 600, 50)]
  with pytest.raises(errors.BudgetError) as e:
    search.choose_winner(records, budget_lib.Budget(max_params=400))
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith('none of the 3 scored candidates fits the budget (params <= 400)')
  assert 'the smallest has 500 params, the cheapest 50 FLOPs' in message
  for fix in ('search.max_params', 'search.num_candidates', 'objective.weight_prior_l2'):
    assert fix in message


def test_pareto_front_of_hand_made_records():
  records = [
    _record(0, 0.90, 100),
    _record(1, 0.92, 150),
    _record(2, 0.92, 200),  # as accurate as #1, larger: dominated
    _record(3, 0.89, 120),  # larger and less accurate than #0: dominated
    _record(4, 0.95, 300),
    _record(5, 0.95, 300),  # duplicates: both on the front
    _record(6, 0.93, 150),  # as large as #1, more accurate: #1 is dominated
    _record(7, 0.85, 100),  # as large as #0, less accurate: dominated
    _record(8, 0.80, 50),  # the smallest: on the front whatever its accuracy
    _record(9, 0.95, 400),  # as accurate as #4 and #5, larger: dominated
  ]
  assert [r['index'] for r in pareto.front(records, 'params')] == [8, 0, 6, 4, 5]
  # every point off the front is dominated, none on it is
  on = {r['index'] for r in pareto.front(records, 'params')}
  dominated = lambda r: any(
    s['val_acc'] >= r['val_acc']
    and s['params'] <= r['params']
    and (s['val_acc'], s['params']) != (r['val_acc'], r['params'])
    for s in records
  )
  assert on == {r['index'] for r in records if not dominated(r)}
  # the FLOPs front is computed on FLOPs: here the most accurate is also the cheapest
  flops = [dict(r, flops=1000 - r['params']) for r in records]
  assert [r['index'] for r in pareto.front(flops, 'flops')] == [9]
  assert pareto.front([], 'params') == []


TINY = tiny.flags(
  {
    'train.num_steps': 4,
    'train.log_every_steps': 2,
    'search.num_candidates': 6,
    'search.bn_recalibration_batches': 1,
    'log.tensorboard': False,
  }
)


def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.long(22)
def test_a_budget_nothing_fits_stops_and_a_larger_one_reuses_the_candidates(tmp_path):
  result = tiny.main(tmp_path, *TINY, '--config.search.max_params=1')
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('pgnas_jax: none of the 6 scored candidates fits the budget (params <= 1)')
  candidates = _lines(tmp_path / 'search' / 'candidates.jsonl')
  assert len(candidates) == 6 and not any(c['fits'] for c in candidates)
  smallest = min(c['params'] for c in candidates)
  assert f'the smallest has {smallest:,} params' in last
  assert not (tmp_path / 'report.md').exists()
  assert json.loads((tmp_path / 'search' / 'pareto.json').read_text())['winner'] is None

  # the second smallest size as the budget (a share of the full super-network)
  full = json.loads((tmp_path / 'search' / 'pareto.json').read_text())['supernet']['params']
  limit = sorted({c['params'] for c in candidates})[min(1, len(candidates) - 1)]
  share = f'{100 * (limit + 0.5) / full}%'
  result = tiny.main(tmp_path, *TINY, f"--config.search.max_params='{share}'")
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resuming after 6 recorded candidates' in result.stderr
  rescored = _lines(tmp_path / 'search' / 'candidates.jsonl')
  assert [c['fits'] for c in rescored] == [c['params'] <= limit for c in candidates]
  # the same records but for fits (and the checksum that covers it)
  assert [{**c, 'fits': None, 'check': None} for c in rescored] == [
    {**c, 'fits': None, 'check': None} for c in candidates
  ]
  arch = json.loads((tmp_path / 'search' / 'arch.json').read_text())
  fitting = [c for c in rescored if c['fits']]
  assert arch['index'] == min(fitting, key=search.ranking_key)['index']
  assert arch['budget'] == {'max_params': int(full * (limit + 0.5) / full), 'max_flops': None}
  front = json.loads((tmp_path / 'search' / 'pareto.json').read_text())
  assert front['winner'] == arch['index']
  assert [r['index'] for r in front['params']] == [
    r['index'] for r in pareto.front(rescored, 'params')
  ]
  report = (tmp_path / 'report.md').read_text()
  assert '## Pareto fronts' in report
  assert all(f'| #{r["index"]}' in report for r in front['params'] + front['flops'])
  assert (tmp_path / 'plots' / 'pareto.png').read_bytes()[:4] == b'\x89PNG'

  # a finished run given another budget chooses again, without training or scoring again
  result = tiny.main(tmp_path, *TINY, '--config.search.max_params=0')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'choosing the winner again' in result.stderr
  assert 'resuming after 6 recorded candidates' in result.stderr
  arch = json.loads((tmp_path / 'search' / 'arch.json').read_text())
  assert arch['index'] == search.choose_winner(rescored)['index']
  assert all(c['fits'] for c in _lines(tmp_path / 'search' / 'candidates.jsonl'))

  # the finished run chosen again under a budget nothing fits: refused, its report kept
  report = (tmp_path / 'report.md').read_bytes()
  result = tiny.main(tmp_path, *TINY, '--config.search.max_params=1')
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'none of the 6 scored candidates fits the budget' in result.stderr.splitlines()[-1]
  assert (tmp_path / 'report.md').read_bytes() == report
