"""The targets study's report (``targets.md``) and figure from its ``results.json``:

    python -m pgnas_jax.experiments.targets_report DIR

Per FLOPs target and arm, over the seeds: test accuracy (and after fine-tuning), params,
FLOPs and latency at batch 1 and 128 of the network one would deploy, each as a mean with
its 95% interval (Student's t over the seeds; none for one seed)."""

import math

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np

from pgnas_jax.experiments import studies

# 97.5% quantiles of Student's t by degrees of freedom (n seeds - 1)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}
ARM_NAMES = {
  'target': 'FLOPs target, searched',
  'uniform': 'uniformly thinned, from scratch',
  'init_from': 'FLOPs target from a trained network, 1/4 of the steps',
}


def interval(values) -> tuple:
  """(mean, half-width of its 95% interval; None for fewer than two values)."""
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  mean = float(np.mean(values))
  if len(values) < 2:
    return mean, None
  t = _T975.get(len(values) - 1, 1.96)
  return mean, t * float(np.std(values, ddof=1)) / math.sqrt(len(values))


def _cell(values, digits: int = 4) -> str:
  mean, half = interval(values)
  if mean is None:
    return ''
  return f'{mean:.{digits}f}' + ('' if half is None else f' ± {half:.{digits}f}')


def groups(results: dict) -> list:
  """((share, arm), its runs), targets largest first, arms in the study's order."""
  shares = sorted({r['share'] for r in results['runs']}, reverse=True)
  arms = list(ARM_NAMES)
  return [
    ((share, arm), [r for r in results['runs'] if r['share'] == share and r['arm'] == arm])
    for share in shares
    for arm in arms
  ]


def _full_flops(results: dict) -> float:
  return next(r['full_flops'] for r in results['runs'] if r['full_flops'])


def table(results: dict) -> list:
  full = _full_flops(results)
  lines = [
    '| target | arm | seeds | test acc | fine-tuned test acc | params | FLOPs (share) | '
    'latency b1 (ms) | latency b128 (ms) |',
    '|---|---|---:|---|---|---|---|---|---|',
  ]
  for (share, arm), runs in groups(results):
    latency = lambda b: [r['latency_ms'][b] if r['latency_ms'] else None for r in runs]
    lines.append(
      f'| {share:.0%} | {ARM_NAMES[arm]} | {len(runs)} | {_cell([r["test_acc"] for r in runs])} | '
      f'{_cell([r["finetuned_test_acc"] for r in runs])} | '
      f'{_cell([r["params"] for r in runs], digits=0)} | '
      f'{_cell([r["flops"] / full for r in runs], digits=3)} | '
      f'{_cell(latency("1"), digits=2)} | {_cell(latency("128"), digits=2)} |'
    )
  return lines


def plot(results: dict, path: str) -> None:
  """Test accuracy against FLOPs share: every run, and each arm's mean per target with its
  interval."""
  full = _full_flops(results)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = dict(zip(ARM_NAMES, ('tab:blue', 'tab:orange', 'tab:green')))
  for (share, arm), runs in groups(results):
    if not runs:
      continue
    x = [r['flops'] / full for r in runs]
    y = [r['test_acc'] for r in runs]
    ax.scatter(x, y, s=12, color=colors[arm], alpha=0.4)
    mean, half = interval(y)
    ax.errorbar(
      [np.mean(x)],
      [mean],
      yerr=None if half is None else [[half], [half]],
      color=colors[arm],
      marker='o',
      capsize=3,
      label=ARM_NAMES[arm] if share == max(r['share'] for r in results['runs']) else None,
    )
  ax.set_xlabel('FLOPs (MACs), share of the full super-network')
  ax.set_ylabel('test accuracy (no fine-tuning)')
  ax.legend(fontsize=8)
  ax.set_title('What a FLOPs target buys')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown(results: dict) -> str:
  study = results['study']
  widths = ', '.join(
    f'{s}: stem {w[0]}, stages {tuple(w[1])}' for s, w in results['uniform_widths'].items()
  )
  lines = [
    '# What a FLOPs target buys',
    '',
    f'`{results["command"]}` on {results["machine"]}: the SupNet-M-family network (stem '
    f'{study["stem_width"]}, stages {tuple(study["widths"])}) on Fashion-MNIST, '
    f'{results["train_steps"]} training steps of batch {study["batch_size"]}, '
    f'{study["candidates"]} candidates, fine-tuning {study["finetune_steps"]} steps, seeds '
    f'{tuple(study["seeds"])}. Means with 95% intervals over the seeds. Params, FLOPs and '
    f'latency are those of the network one would deploy: the compact winner, or the '
    f'thinned network whole. Uniform widths per target: {widths}.',
    '',
    *table(results),
    '',
    '![accuracy against FLOPs](figures/targets_pareto.png)',
    '',
  ]
  return '\n'.join(lines)


REPORT = studies.Report('targets.md', markdown, {'targets_pareto.png': plot})


if __name__ == '__main__':
  REPORT.rewrite('usage: python -m pgnas_jax.experiments.targets_report DIR')
