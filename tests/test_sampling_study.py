"""The sampling study: the quick variant end to end (every section, table and figure) through
its command line, resumed as a no-op; its statistics (bootstrap of best-of-N, duplicates)
and report on fixed inputs."""

import numpy as np
import pytest
import tiny

from pgnas_jax import estimators, rng, samplers
from pgnas_jax.experiments import sampling, sampling_report

SECTIONS = (
  '## Drop-logit gradient per estimator',
  '## Training per estimator',
  '## Candidate samplers: best of N',
  '## Candidate samplers: duplicates and sizes',
  '## Generators',
  '## What this measures and what it does not',
)


def _table_rows(text: str, section: str) -> list:
  """The first column of every row of the first table after ``section``."""
  lines = text.split(section, 1)[1].splitlines()
  first = next(i for i, line in enumerate(lines) if line.startswith('|'))
  rows = []
  for line in lines[first + 2 :]:
    if not line.startswith('|'):
      break
    rows.append(line.split('|')[1].strip())
  return rows


@pytest.mark.long(39)
def test_quick_study_runs_every_section_table_and_figure_and_resumes(tmp_path):
  results, _ = tiny.quick_study('sampling', tmp_path)
  study = sampling.QUICK
  assert set(results['training']) == set(results['candidates']) == set(estimators.NAMES)
  assert set(results['gradients']) == {sampling.REFERENCE, *estimators.NAMES}
  assert set(results['timing']['generators']) == set(rng.IMPLEMENTATIONS)

  run_dir = tmp_path / 'runs' / 'concrete' / 'seed0'
  candidates, arch = tiny.candidates(run_dir), tiny.arch(run_dir)
  run = results['training']['concrete'][0]
  assert run['winner']['index'] == arch['index'] and run['winner']['test_acc'] == arch['test_acc']
  drawn = results['candidates']['concrete'][0]
  assert drawn['iid']['val_accs'] == [r['val_acc'] for r in candidates]  # the main job's own
  for name in samplers.NAMES:
    count = 1 if name in samplers.ONE_CANDIDATE else study.candidates
    assert len(drawn[name]['val_accs']) == len(drawn[name]['params']) == count
    assert 0 <= drawn[name]['duplicates'] < count
  for name in ('antithetic', 'stratified', 'mode'):  # scored by the search, resumable
    assert (run_dir / 'samplers' / f'{name}.jsonl').exists()
  assert all(results['gradients'][n]['draws'] == study.gradient_draws for n in estimators.NAMES)
  assert results['gradients'][sampling.REFERENCE]['draws'] == study.reference_draws

  text = (tmp_path / 'sampling.md').read_text()
  for section in SECTIONS:
    assert section in text
  assert _table_rows(text, SECTIONS[0]) == list(estimators.NAMES)
  assert _table_rows(text, SECTIONS[1]) == list(estimators.NAMES)
  assert _table_rows(text, SECTIONS[2]) == ['all'] * len(samplers.NAMES)
  assert _table_rows(text, SECTIONS[3]) == list(samplers.NAMES)
  assert _table_rows(text, SECTIONS[4]) == list(rng.IMPLEMENTATIONS)
  for n in study.candidate_counts:
    assert f' N = {n} |' in text
  for name in sampling_report.FIGURES:
    assert (tmp_path / 'figures' / name).read_bytes()[:4] == b'\x89PNG'
    assert f'(figures/{name})' in text

  # run again: every piece is found finished, nothing is recomputed
  again, log = tiny.quick_study('sampling', tmp_path)
  for trace in ('train step', 'search ', 'study: gradients', 'resuming'):
    assert trace not in log, trace
  assert again == results


def test_bootstrap_best_of_n():
  # two candidates, 0 and 1: one candidate is either; the best of ten is 1 unless all ten
  # resampled are 0 (probability 2^-10, under the 2.5% tail)
  mean, low, high = sampling_report.bootstrap_best_of_n([[0.0, 1.0]], 1, 1, 2000)
  assert abs(mean - 0.5) < 0.05 and (low, high) == (0.0, 1.0)
  assert sampling_report.bootstrap_best_of_n([[0.0, 1.0]], 10, 1, 2000)[1:] == (1.0, 1.0)
  # pairs (0, 1) resampled whole: the first of a pair is always 0, the best of two always 1;
  # resampled one by one, they mix
  pairs = [[0.0, 1.0] * 4]
  assert sampling_report.bootstrap_best_of_n(pairs, 1, 2, 500) == (0.0, 0.0, 0.0)
  assert sampling_report.bootstrap_best_of_n(pairs, 2, 2, 500) == (1.0, 1.0, 1.0)
  assert sampling_report.bootstrap_best_of_n(pairs, 2, 1, 500)[1] == 0.0
  # the statistic is the mean over pools (trained super-networks)
  assert sampling_report.bootstrap_best_of_n([[0.2], [0.6]], 3, 1, 50) == pytest.approx(
    (0.4, 0.4, 0.4)
  )


def test_duplicates_are_candidates_repeating_an_earlier_mask_in_every_group():
  a = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], np.float32)
  differ_in_b = {'a': a, 'b': np.array([[1], [0], [1], [0]], np.float32)}
  assert sampling_report.count_duplicates(differ_in_b) == 1  # only candidate 3 repeats (1)
  assert sampling_report.count_duplicates({'a': a, 'b': np.ones((4, 1))}) == 2
  assert sampling_report.count_duplicates({'a': np.ones((5, 3))}) == 4


def _fixed_results():
  """Two estimators, two seeds, every sampler; numbers chosen so the tables can be checked
  by hand."""
  names, sampler_names = ['concrete', 'disarm'], list(samplers.NAMES)
  study = {
    'seeds': [0, 1],
    'train_steps': 100,
    'batch_size': 32,
    'validation_size': 500,
    'candidates': 4,
    'candidate_counts': [1, 2, 4],
    'stratified_block': 2,
    'bootstrap_resamples': 200,
    'gradient_batch': 16,
    'gradient_draws': 100,
    'reference_draws': 100,
    'timing_rounds': 3,
    'mask_chunk': 4,
    'mask_repeats': 2,
  }

  def run(acc, params):
    return {
      'winner': {'index': 0, 'val_acc': acc, 'test_acc': acc, 'params': params},
      'supernet': {'params': 1000},
      'mean_p': 0.2,
      'p': [0.1, params / 3000],
      'train_seconds': 10.0,
      'wall_seconds': 20.0,
    }

  def pool(name):
    count = 1 if name == 'mode' else 4
    return {
      'val_accs': [0.5 + 0.1 * i for i in range(count)],
      'params': [800 + 100 * i for i in range(count)],
      'duplicates': 1 if name == 'iid' else 0,
      'wall_seconds': 1.0,
    }

  step = {'compile_s': 1.0, 'step_ms': 10.0}
  return {
    'study': study,
    'command': 'python -m pgnas_jax.experiments.sampling --workdir=X',
    'machine': 'cpu, 2 cores',
    'network': tiny.STUDY_MODEL,
    'estimators': names,
    'samplers': sampler_names,
    'generators': ['threefry2x32'],
    'default_estimator': 'concrete',
    'training': {
      'concrete': [run(0.90, 700), run(0.92, 900)],
      'disarm': [run(0.85, 600), run(0.85, 600)],
    },
    'candidates': {n: [{s: pool(s) for s in sampler_names}] * 2 for n in names},
    'gradients': {
      'reference': {'draws': 100, 'mean': [1.0, 0.0], 'var': [4.0, 4.0], 'seconds_per_draw': 0.1},
      'concrete': {'draws': 100, 'mean': [1.3, 0.4], 'var': [1.0, 1.0], 'seconds_per_draw': 0.01},
      'disarm': {'draws': 100, 'mean': [1.0, 0.0], 'var': [4.0, 4.0], 'seconds_per_draw': 0.02},
    },
    'timing': {
      'estimators': {'concrete': step, 'disarm': {'compile_s': 2.0, 'step_ms': 12.5}},
      'generators': {'threefry2x32': {**step, 'draw_ms': 0.25}},
    },
    'wall_seconds': 600.0,
  }


def test_report_tables_on_fixed_inputs(tmp_path):
  path = sampling_report.write(_fixed_results(), str(tmp_path))
  text = open(path).read()
  assert 'stage widths 16/32/64, 1 block per stage, 2 branches, 1,000 params' in text
  # concrete: bias (0.3, 0.4), |bias| 0.5 of |reference| 1; each logit's standard error^2
  # 1/100 + 4/100: noise sqrt(0.1) = 0.316, bias in SE sqrt((1.8 + 3.2) / 2) = 1.58;
  # cosine 1.3 / sqrt(1.85) = 0.956; variance (1 + 1) / 1
  assert '| concrete | 100 | 0.500 | 0.316 | 1.58 | 0.956 | 2 | 10.0 | 10.0 |' in text
  assert '| disarm | 100 | 0.000 | 0.400 | 0.00 | 1.000 | 8 | 20.0 | 12.5 |' in text
  # winner error over two seeds: 10 and 8 %
  assert '| concrete | 9.00 ± 1.41 | 800 | 0.200 | 0.100 to 0.300 | 10 | 20 |' in text
  assert '| disarm | 15.00 ± 0.00 | 600 |' in text
  # best of 4 of (0.5, 0.6, 0.7, 0.8) resampled; mode has one candidate
  assert '| all | mode | 0.5000 [0.5000, 0.5000] | 0.5000 [0.5000, 0.5000] |' in text
  assert '| disarm | stratified |' in text
  # 2 estimators x 2 seeds x 4 candidates, one duplicate each; params 800..1100
  assert '| iid | 16 | 4 | 950 | 112 | 800 | 1,100 |' in text
  assert '| mode | 4 | 0 | 800 | 0 | 800 | 800 |' in text
  assert '| threefry2x32 | 10.0 | 0.250 |' in text
  for name in sampling_report.FIGURES:
    assert (tmp_path / 'figures' / name).read_bytes()[:4] == b'\x89PNG'
