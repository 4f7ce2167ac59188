"""The replication study: the quick variant end to end (every arm, table and figure) through its
command line, resumed as a no-op; the report generator and p0's choice on fixed inputs."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tiny

from pgnas_jax import errors
from pgnas_jax.experiments import replicate, replication_report

SECTIONS = (
  '## Guided vs predefined sampling (paper Table 3)',
  '## Candidate accuracy, Random vs PGNAS (supplement Figure 1)',
  '## Number of candidates (paper Table 6)',
  '## Weight prior l2 (paper Table 4)',
  '## Temperature tau (paper Table 5)',
  '## Ranking fidelity',
  "## The paper's claims at this scale",
)


@pytest.mark.long(34)
def test_quick_study_runs_every_arm_table_and_figure_and_resumes(tmp_path):
  results, _ = tiny.quick_study('replicate', tmp_path)
  study = replicate.QUICK
  assert set(results['runs']) == {'pgnas', 'random', 'full', 'l2_250', 'tau_0.6667'}
  assert all(len(runs) == len(study.seeds) for runs in results['runs'].values())
  assert 0.01 <= results['random_p'] <= 0.95

  pgnas = results['runs']['pgnas'][0]
  run_dir = tmp_path / 'runs' / 'pgnas' / 'seed0'
  candidates, arch = tiny.candidates(run_dir), tiny.arch(run_dir)
  assert len(candidates) == pgnas['num_candidates'] == study.pgnas_candidates()
  for C in study.candidate_counts:  # the winner among the first C, as the main job picks
    best = min(candidates[:C], key=lambda r: (-r['val_acc'], r['params'], r['index']))
    assert pgnas['winners'][str(C)]['index'] == best['index']
  # the study's own test evaluation of a winner agrees with the main job's
  assert pgnas['winners'][str(study.pgnas_candidates())]['test_acc'] == arch['test_acc']
  random_config = json.loads((tmp_path / 'runs' / 'random' / 'seed0' / 'config.json').read_text())
  assert random_config['drop'] == {
    **random_config['drop'],
    'mode': 'random',
    'random_p': results['random_p'],
  }
  assert len(results['fidelity']) == study.fidelity_candidates

  text = (tmp_path / 'replication.md').read_text()
  for section in SECTIONS:
    assert section in text
  assert sum(line.startswith('- **') and line.endswith('.') for line in text.splitlines()) == 9
  for C in study.candidate_counts:
    assert f'\n| {C} | ' in text
  for name in replication_report.FIGURES:
    assert (tmp_path / 'figures' / name).read_bytes()[:4] == b'\x89PNG'

  # run again: every run and analysis is found finished, nothing is recomputed
  again, log = tiny.quick_study('replicate', tmp_path)
  assert 'train step' not in log and 'fine-tuned' not in log
  assert again == results


def _run(test_acc, params, val_accs=(0.5,), finetuned=None, mean_p=0.1, supernet=0.9):
  counts = (10, 50, 200)
  run = {
    'config': {'model': tiny.STUDY_MODEL},
    'supernet': {'test_acc': supernet, 'params': 1100, 'val_acc': supernet, 'flops': 1},
    'fixed_params': 100,
    'mean_p': mean_p,
    'val_accs': list(val_accs),
    'num_candidates': 200,
    'search_seconds': 40.0,
    'train_seconds': 100.0,
    'wall_seconds': 150.0,
    'winners': {
      str(C): {
        'index': C,
        'val_acc': 0.9,
        'params': params,
        'test_acc': test_acc - 0.01 * (C == 10),
      }
      for C in counts
    },
  }
  if finetuned is not None:
    run['finetuned'] = {'C': 200, 'index': 200, 'steps': 100, 'test_acc': finetuned}
  return run


def _fixed_results():
  """Three seeds; PGNAS beats Random without fine-tuning; fine-tuning helps Random more;
  larger l2 gives smaller winners; the larger tau is better (so that claim disagrees)."""
  rng = np.random.default_rng(0)
  study = {
    'seeds': [0, 1, 2],
    'train_epochs': 1.5,
    'train_steps': -1,
    'batch_size': 128,
    'validation_size': 2000,
    'candidates': 200,
    'sweep_candidates': 200,
    'candidate_counts': [10, 50, 200],
    'l2_values': [10.0, 50.0, 250.0],
    'taus': [2 / 3, 0.2],
    'finetune_steps': 100,
    'fidelity_candidates': 4,
    'full_p': 0.001,
  }
  runs = {
    'pgnas': [
      _run(a, 700, rng.normal(0.88, 0.005, 200), finetuned=a + 0.001) for a in (0.90, 0.91, 0.92)
    ],
    'random': [
      _run(a, 750, rng.normal(0.80, 0.05, 200), finetuned=a + 0.05) for a in (0.85, 0.86, 0.84)
    ],
    'full': [_run(0.0, 1100, supernet=a) for a in (0.89, 0.90, 0.91)],
    'l2_10': [_run(0.90, 900) for _ in range(3)],
    'l2_250': [_run(0.90, 400) for _ in range(3)],
    'tau_0.6667': [_run(0.95, 700) for _ in range(3)],
  }
  fidelity = [
    {
      'place': p,
      'index': p,
      'val_acc': v,
      'params': 700,
      'test_acc': v,
      'finetuned_test_acc': f,
      'wall_seconds': 1.0,
    }
    for p, v, f in [(1, 0.9, 0.91), (67, 0.8, 0.85), (133, 0.7, 0.86), (200, 0.6, 0.7)]
  ]
  return {
    'study': study,
    'command': 'python -m pgnas_jax.experiments.replicate --workdir=X',
    'machine': 'cpu, 2 cores',
    'default_l2': 50.0,
    'default_tau': 0.2,
    'random_p': 0.3,
    'runs': runs,
    'fidelity': fidelity,
    'wall_seconds': 3600.0,
  }


def test_report_tables_and_verdicts_on_fixed_inputs(tmp_path):
  results = _fixed_results()
  path = replication_report.write(results, str(tmp_path))
  text = open(path).read()
  # test error in % over the three seeds, mean ± sample std
  assert (
    'a SupNet-M-family super-network (stem 16, stage widths 16/32/64, 1 block per stage, '
    '2 branches, 1,100 params)'
  ) in text
  assert '| Random w/o FT | 15.00 ± 1.00 | 750 |' in text
  assert '| Random w/ FT | 10.00 ± 1.00 | 750 |' in text
  assert '| PGNAS w/o FT | 9.00 ± 1.00 | 700 |' in text
  assert '| PGNAS w/ FT | 8.90 ± 1.00 | 700 |' in text
  assert '| Full model (trained without dropout, evaluated whole) | 10.00 ± 1.00 | 1,100 |' in text
  assert '| 10 | 10.00 ± 1.00 | 700 | 2.0 |' in text  # ranking time: 10 x 40 s / 200
  assert '| 200 | 9.00 ± 1.00 | 700 | 40.0 |' in text
  assert '| 250 | 10.00 ± 0.00 | 400 | 0.100 | 10.00 ± 0.00 |' in text
  verdicts = {
    line.split('**')[1]: 'does not agree' not in line
    for line in text.splitlines()
    if line.startswith('- **')
  }
  assert len(verdicts) == 9
  assert verdicts['PGNAS beats Random without fine-tuning (Table 3)']
  assert verdicts['A larger l2 gives smaller winners (Table 4)']
  assert verdicts['More candidates, lower error (Table 6)']
  assert verdicts[
    'The PGNAS winner, not fine-tuned, is at least as good as the full model (Table 3)'
  ]
  assert not verdicts['A smaller temperature tau gives a lower error (Table 5)']
  assert 'PGNAS lower in 3 of 3 seeds' in text
  # fidelity: one discordant pair of six (places 67 and 133); with 4 candidates that is
  # 1.36 standard deviations of tau under no correlation: within the noise
  fidelity_line = next(
    line for line in text.splitlines() if line.startswith('- **Inherited weights')
  )
  assert 'over 4 candidates: 0.667 (1.36 standard deviations' in fidelity_line
  assert 'agrees at this scale, within the noise' in fidelity_line
  beats_line = next(line for line in text.splitlines() if line.startswith('- **PGNAS beats Random'))
  assert 'agrees at this scale. ' in beats_line  # 5, 5 and 8 points: far outside the noise
  for name in replication_report.FIGURES:
    assert (tmp_path / 'figures' / name).read_bytes()[:4] == b'\x89PNG'


@pytest.mark.parametrize(
  'x, y, tau',
  [
    ([1, 2, 3, 4], [1, 2, 3, 4], 1.0),
    ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
    ([1, 2, 3, 4], [1, 3, 2, 4], 4 / 6),
    ([1, 1, 2], [1, 2, 3], 2 / np.sqrt(2 * 3)),  # tau-b: the tie in x leaves 2 of 3 pairs
  ],
)
def test_kendall_tau(x, y, tau):
  assert replication_report.kendall_tau(x, y) == pytest.approx(tau)


def test_random_p0_matches_the_pgnas_winners_size():
  # searchable weights: 1000 of 1100; the winners keep 800 and 600 of them: p0 = 1 - 0.7
  runs = [
    {'fixed_params': 100, 'supernet': {'params': 1100}, 'winners': {'200': {'params': 100 + kept}}}
    for kept in (800, 600)
  ]
  assert replicate.choose_random_p(runs, 200) == pytest.approx(0.3)


def test_a_workdir_holding_a_study_of_other_sizes_is_refused(tmp_path):
  (tmp_path / 'sizes.json').write_text(json.dumps(dataclasses.asdict(replicate.QUICK)))
  with pytest.raises(errors.IncompatibleWorkdirError, match='seeds differ'):
    replicate.run_study(dataclasses.replace(replicate.QUICK, seeds=(0, 1)), str(tmp_path))
  assert os.listdir(tmp_path) == ['sizes.json']
