"""The targets study (``python -m pgnas_jax.experiments.targets``): the quick variant end to
end through its command line (every arm, the table and the figure), resumed as a no-op; the
width multiplier of the uniform baseline; the intervals of the report."""

import dataclasses
import json

import pytest
import tiny

from pgnas_jax import config as config_lib
from pgnas_jax import space as space_lib
from pgnas_jax import supernets
from pgnas_jax.experiments import targets, targets_report


@pytest.mark.long(150)
def test_quick_study_runs_every_arm_table_and_figure_and_resumes(tmp_path):
  results, _ = tiny.quick_study('targets', tmp_path)
  study = targets.QUICK
  runs = {(r['arm'], r['share'], r['seed']) for r in results['runs']}
  assert runs == {(a, s, 0) for a in targets.ARMS for s in study.shares}

  def config(arm):
    return json.loads((tmp_path / 'runs' / f'{arm}_0.5' / 'seed0' / 'config.json').read_text())

  steps = results['train_steps']
  assert config('target')['objective']['target_flops'] == 0.5
  assert config('target')['finetune']['steps'] == study.finetune_steps
  init = config('init_from')
  assert init['train']['num_steps'] == max(1, steps // 4)
  assert init['train']['init_from'].startswith(str(tmp_path / 'runs' / 'pretrained' / 'seed0'))
  uniform = config('uniform')
  assert uniform['drop']['mode'] == 'random' and uniform['drop']['random_p'] == 0.001
  stem, widths = results['uniform_widths']['0.5']
  assert uniform['model']['shake_shake']['widths'] == widths
  assert uniform['model']['shake_shake']['stem_width'] == stem
  for run in results['runs']:
    arch = tiny.arch(tmp_path / 'runs' / f'{run["arm"]}_0.5' / 'seed0')
    if run['arm'] != 'uniform':  # the deployed network is the compact winner, within target
      assert run['flops'] == arch['compact_flops'] <= arch['budget']['max_flops']
      assert run['finetuned_test_acc'] == arch['finetuned']['test_acc']
    else:  # the thinned network whole, at most the target's FLOPs
      assert run['flops'] == arch['supernet']['flops']
      assert run['flops'] <= 0.5 * _full_flops(targets.QUICK)

  text = (tmp_path / 'targets.md').read_text()
  for name in targets_report.ARM_NAMES.values():
    assert f'| 50% | {name} | 1 |' in text
  assert (tmp_path / 'figures' / 'targets_pareto.png').read_bytes()[:4] == b'\x89PNG'

  again, log = tiny.quick_study('targets', tmp_path)
  assert 'train step' not in log
  assert again == results


def _full_flops(study) -> int:
  c = config_lib.get_config()
  c.model.shake_shake.stem_width, c.model.shake_shake.widths = study.stem_width, study.widths
  space = space_lib.of_model(supernets.build(c.model, 10), (28, 28, 1))
  return int(space_lib.costs(space, space.template)[1])


def test_the_uniform_baseline_has_at_most_the_targets_flops_and_close_to_them():
  """Every width times one multiplier: within the 50% target and no more than 15% under it
  (widths are whole channels: at this size one more channel in each moves FLOPs by about
  10%), on a network of the study's shape at half its width."""
  study = dataclasses.replace(targets.FULL, stem_width=8, widths=(8, 16, 32))
  full = _full_flops(study)
  stem, widths = targets.scaled_widths(study, 0.5, (28, 28, 1))
  thinned = dataclasses.replace(study, stem_width=stem, widths=widths)
  assert 0.85 * 0.5 * full <= _full_flops(thinned) <= 0.5 * full, (stem, widths)
  assert all(w < full_w for w, full_w in zip(widths, study.widths))


def test_intervals_are_students_t_over_the_seeds():
  mean, half = targets_report.interval([1.0, 2.0, 3.0])
  assert mean == 2.0 and half == pytest.approx(4.303 / 3**0.5)
  assert targets_report.interval([0.5]) == (0.5, None)
  assert targets_report.interval([None, None]) == (None, None)
