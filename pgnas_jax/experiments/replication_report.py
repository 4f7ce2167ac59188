"""The replication study's report: ``replication.md`` and ``figures/*.png`` from the results
that ``replicate.run_study`` collects (``results.json``). Pure functions of those results, so
the report can be regenerated, and tested, without running anything:

    python -m pgnas_jax.experiments.replication_report DIR   (reads DIR/results.json)
"""

import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt

from pgnas_jax.experiments import studies

# The paper's numbers that each table is set against (AAAI 2020 paper, Tables 3 to 6).
PAPER = {
  'table3_supnet_m': 'SupNet-M: full model 2.58%, Random w/o FT 2.63%, Random w/ FT 2.56%, '
  'PGNAS 2.20% (21.6M params; Random 22.4M)',
  'table4': 'SupNet-MI, l2 = 50 / 150 / 250 / 500: error 2.13 / 2.06 / 2.27 / 2.39%, '
  'params 49.9 / 33.4 / 23.8 / 18.2M',
  'table5': 'SupNet-M: tau = 2/3 2.49%, tau = 1/5 2.20% (SupNet-EI 2.74% / 2.56%)',
  'table6': 'SupNet-MI, 50 / 500 / 1500 / 5000 / 10000 candidates: error 2.17 / 2.06 / 2.06 / '
  '2.04 / 1.98%, ranking 0.02 / 0.23 / 0.69 / 2.31 / 4.63 GPU-days',
}


def kendall_tau(x, y) -> float:
  """Kendall's tau-b (ties in either list counted as neither concordant nor discordant)."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  i, j = np.triu_indices(len(x), k=1)
  dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
  denominator = np.sqrt(np.sum(dx != 0) * np.sum(dy != 0))
  return float(np.sum(dx * dy) / denominator) if denominator else float('nan')


def mean_std(values) -> tuple:
  """(mean, sample standard deviation; nan for one value)."""
  values = np.asarray(values, float)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float('nan')


def _error(values) -> str:
  """Test error in % as mean ± std over seeds."""
  m, s = mean_std([100.0 * (1.0 - v) for v in values])
  return f'{m:.2f} ± {s:.2f}' if np.isfinite(s) else f'{m:.2f}'


def _params(values) -> str:
  return f'{np.mean(values):,.0f}'


# sweep -> (the study's values, the results' default, how an arm's name writes a value)
SWEEPS = {'l2': ('l2_values', 'default_l2', 'g'), 'tau': ('taus', 'default_tau', '.4g')}


def sweep_arm(kind: str, value: float, default: float) -> str:
  """The arm that ran ``value`` of the ``kind`` sweep: ``pgnas`` for the default."""
  return 'pgnas' if np.isclose(value, default) else f'{kind}_{value:{SWEEPS[kind][2]}}'


def table3(results: dict) -> list:
  """Rows (name, test accuracies per seed, params per seed)."""
  runs, C = results['runs'], str(results['study']['candidates'])
  w = lambda arm: [r['winners'][C] for r in runs[arm]]
  return [
    (
      'Full model (trained without dropout, evaluated whole)',
      [r['supernet']['test_acc'] for r in runs['full']],
      [r['supernet']['params'] for r in runs['full']],
    ),
    (
      'PGNAS super-network evaluated whole',
      [r['supernet']['test_acc'] for r in runs['pgnas']],
      [r['supernet']['params'] for r in runs['pgnas']],
    ),
    ('Random w/o FT', [x['test_acc'] for x in w('random')], [x['params'] for x in w('random')]),
    (
      'Random w/ FT',
      [r['finetuned']['test_acc'] for r in runs['random']],
      [x['params'] for x in w('random')],
    ),
    ('PGNAS w/o FT', [x['test_acc'] for x in w('pgnas')], [x['params'] for x in w('pgnas')]),
    (
      'PGNAS w/ FT',
      [r['finetuned']['test_acc'] for r in runs['pgnas']],
      [x['params'] for x in w('pgnas')],
    ),
  ]


def table6(results: dict) -> list:
  """Rows (C, test accuracies per seed, params per seed, ranking seconds per seed): the
  pgnas arm's winner among its first C candidates; ranking time is C times the run's
  measured search time per candidate."""
  rows = []
  for C in results['study']['candidate_counts']:
    runs = results['runs']['pgnas']
    rows.append(
      (
        C,
        [r['winners'][str(C)]['test_acc'] for r in runs],
        [r['winners'][str(C)]['params'] for r in runs],
        [C * r['search_seconds'] / r['num_candidates'] for r in runs],
      )
    )
  return rows


def sweep(results: dict, kind: str) -> list:
  """Rows (value, test accuracies, params, mean learned p, supernet test accuracies) of the
  ``kind`` sweep ('l2' or 'tau'), each arm's winner among ``sweep_candidates``."""
  values_key, default_key, _ = SWEEPS[kind]
  C = str(results['study']['sweep_candidates'])
  rows = []
  for v in results['study'][values_key]:
    runs = results['runs'][sweep_arm(kind, v, results[default_key])]
    rows.append(
      (
        v,
        [r['winners'][C]['test_acc'] for r in runs],
        [r['winners'][C]['params'] for r in runs],
        [r['mean_p'] for r in runs],
        [r['supernet']['test_acc'] for r in runs],
      )
    )
  return rows


def histograms(results: dict) -> dict:
  """Validation accuracy of the first ``candidates`` candidates of every seed, per arm."""
  C = results['study']['candidates']
  return {
    arm: [a for r in results['runs'][arm] for a in r['val_accs'][:C]] for arm in ('random', 'pgnas')
  }


def _within_noise(diffs) -> bool:
  """Whether the mean of per-seed differences lies within 2 standard errors of zero (False
  for one seed: no estimate of the noise)."""
  d = np.asarray(diffs, float)
  return len(d) > 1 and abs(d.mean()) <= 2.0 * d.std(ddof=1) / np.sqrt(len(d))


def _direction(name: str, holds: bool, detail: str, noisy: bool = False) -> str:
  verdict = f'{"agrees" if holds else "does not agree"} at this scale'
  if noisy:
    verdict += ', within the noise'
  return f'- **{name}**: {verdict}. {detail}'


def _kendall_z(tau: float, n: int) -> float:
  """tau over its standard deviation when there is no correlation (normal approximation)."""
  return tau / np.sqrt(2.0 * (2 * n + 5) / (9.0 * n * (n - 1)))


def claims(results: dict) -> list:
  """One line per claim of the paper: whether the small-scale numbers point the same way,
  "within the noise" when the per-seed differences' mean is within 2 standard errors of
  zero, with the numbers to judge by."""
  t3 = {name: np.array(acc) for name, acc, _ in table3(results)}
  err = lambda name: 100.0 * (1.0 - t3[name])
  per_seed = lambda d: ', '.join(f'{x:+.2f}' for x in d)
  lines = []
  diff = err('Random w/o FT') - err('PGNAS w/o FT')
  lines.append(
    _direction(
      'PGNAS beats Random without fine-tuning (Table 3)',
      diff.mean() > 0,
      f'Random minus PGNAS test error: {diff.mean():+.2f} points (per seed {per_seed(diff)}); '
      f'PGNAS lower in {int(np.sum(diff > 0))} of {len(diff)} seeds.',
      _within_noise(diff),
    )
  )
  gains = (err('Random w/o FT') - err('Random w/ FT')) - (err('PGNAS w/o FT') - err('PGNAS w/ FT'))
  lines.append(
    _direction(
      'Fine-tuning helps Random more than PGNAS (Table 3; Table 5 †: under PGNAS weights '
      'and architecture already match)',
      gains.mean() > 0,
      f'error removed by fine-tuning: Random '
      f'{(err("Random w/o FT") - err("Random w/ FT")).mean():+.2f}, PGNAS '
      f'{(err("PGNAS w/o FT") - err("PGNAS w/ FT")).mean():+.2f} points (difference per seed '
      f'{per_seed(gains)}).',
      _within_noise(gains),
    )
  )
  diff = err('Full model (trained without dropout, evaluated whole)') - err('PGNAS w/o FT')
  lines.append(
    _direction(
      'The PGNAS winner, not fine-tuned, is at least as good as the full model (Table 3)',
      diff.mean() >= 0,
      f'PGNAS {err("PGNAS w/o FT").mean():.2f}%, full model '
      f'{err("Full model (trained without dropout, evaluated whole)").mean():.2f}% (full minus '
      f'PGNAS per seed {per_seed(diff)}).',
      _within_noise(diff),
    )
  )
  C = results['study']['candidates']
  seeds = lambda arm: [np.array(r['val_accs'][:C]) for r in results['runs'][arm]]
  means = np.array([p.mean() - r.mean() for p, r in zip(seeds('pgnas'), seeds('random'))])
  spreads = np.array([r.std() - p.std() for p, r in zip(seeds('pgnas'), seeds('random'))])
  lines.append(
    _direction(
      "Candidates sampled from the posterior are better on average than Random's (supplement "
      'Fig. 1)',
      means.mean() > 0,
      f'PGNAS minus Random mean validation accuracy of the candidates: {means.mean():+.4f} '
      f'(per seed {", ".join(f"{x:+.4f}" for x in means)}).',
      _within_noise(means),
    )
  )
  lines.append(
    _direction(
      "Candidates sampled from the posterior vary less than Random's (supplement Fig. 1)",
      spreads.mean() > 0,
      f"Random minus PGNAS standard deviation of the candidates' validation accuracy: "
      f'{spreads.mean():+.4f} (per seed {", ".join(f"{x:+.4f}" for x in spreads)}).',
      _within_noise(spreads),
    )
  )
  t6 = table6(results)
  diff = 100.0 * (np.array(t6[-1][1]) - np.array(t6[0][1]))
  lines.append(
    _direction(
      'More candidates, lower error (Table 6)',
      diff.mean() > 0,
      f'{t6[0][0]} candidates: {100 * (1 - np.mean(t6[0][1])):.2f}%, {t6[-1][0]}: '
      f'{100 * (1 - np.mean(t6[-1][1])):.2f}% (per seed {per_seed(diff)} points); ranking time '
      f'grows linearly with the number of candidates.',
      _within_noise(diff),
    )
  )
  l2 = sweep(results, 'l2')
  params = [np.mean(row[2]) for row in sorted(l2)]
  lines.append(
    _direction(
      'A larger l2 gives smaller winners (Table 4)',
      bool(np.all(np.diff(params) < 0)),
      'winner params by increasing l2: ' + ', '.join(f'{x:,.0f}' for x in params) + '.',
    )
  )
  tau = {row[0]: 100.0 * (1.0 - np.array(row[1])) for row in sweep(results, 'tau')}
  small, large = min(tau), max(tau)
  diff = tau[large] - tau[small]
  lines.append(
    _direction(
      'A smaller temperature tau gives a lower error (Table 5)',
      diff.mean() > 0,
      f'tau = {small:.3g}: {tau[small].mean():.2f}%, tau = {large:.3g}: '
      f'{tau[large].mean():.2f}% (per seed {per_seed(diff)} points).',
      _within_noise(diff),
    )
  )
  fidelity = results['fidelity']
  n = len(fidelity)
  k = kendall_tau([f['val_acc'] for f in fidelity], [f['finetuned_test_acc'] for f in fidelity])
  z = _kendall_z(k, n) if n > 1 else float('nan')
  lines.append(
    _direction(
      'Inherited weights rank candidates as fine-tuning would (the premise of ranking without '
      'fine-tuning)',
      k > 0,
      f'Kendall tau between inherited-weight validation accuracy and test accuracy after the '
      f'same fine-tuning, over {n} candidates: {k:.3f} ({z:.2f} standard deviations of tau '
      f'under no correlation).',
      bool(abs(z) < 2.0),
    )
  )
  return lines


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_histograms(results: dict, path: str) -> None:
  h = histograms(results)
  fig, ax = plt.subplots(figsize=(6.5, 4))
  bins = np.linspace(min(min(v) for v in h.values()), max(max(v) for v in h.values()), 40)
  ax.hist(h['random'], bins=bins, alpha=0.6, label=f'Random (p0 = {results["random_p"]:.2f})')
  ax.hist(h['pgnas'], bins=bins, alpha=0.6, label='PGNAS posterior')
  ax.set_xlabel('validation accuracy, inherited weights')
  ax.set_ylabel('candidates')
  ax.set_title(
    f'{results["study"]["candidates"]} candidates per seed, {len(results["study"]["seeds"])} seeds'
  )
  ax.legend()
  _save(fig, path)


def plot_candidates(results: dict, path: str) -> None:
  rows = table6(results)
  counts = [r[0] for r in rows]
  errors = [[100 * (1 - a) for a in r[1]] for r in rows]
  fig, ax = plt.subplots(figsize=(6.5, 4))
  ax.errorbar(
    counts,
    [np.mean(e) for e in errors],
    yerr=[np.std(e, ddof=1) if len(e) > 1 else 0 for e in errors],
    marker='o',
    capsize=3,
    label='winner test error (mean ± std over seeds)',
  )
  ax.set_xscale('log')
  ax.set_xticks(counts, [str(c) for c in counts])
  ax.minorticks_off()
  ax.set_xlabel('candidates ranked')
  ax.set_ylabel('test error (%)')
  right = ax.twinx()
  right.plot(
    counts,
    [np.mean(r[3]) for r in rows],
    color='tab:gray',
    linestyle='--',
    marker='.',
    label='ranking time',
  )
  right.set_ylabel('ranking time (s), dashed')
  ax.legend(loc='upper center')
  _save(fig, path)


def plot_l2(results: dict, path: str) -> None:
  rows = sorted(sweep(results, 'l2'))
  fig, ax = plt.subplots(figsize=(6.5, 4))
  ax.plot([r[0] for r in rows], [100 * (1 - np.mean(r[1])) for r in rows], marker='o')
  ax.set_xscale('log')
  ax.set_xticks([r[0] for r in rows], [f'{r[0]:g}' for r in rows])
  ax.minorticks_off()
  ax.set_xlabel('weight prior l2')
  ax.set_ylabel('winner test error (%)')
  right = ax.twinx()
  right.plot(
    [r[0] for r in rows],
    [np.mean(r[2]) for r in rows],
    color='tab:orange',
    marker='s',
    linestyle='--',
  )
  right.set_ylabel('winner params', color='tab:orange')
  _save(fig, path)


def plot_fidelity(results: dict, path: str) -> None:
  f = results['fidelity']
  fig, ax = plt.subplots(figsize=(5, 4.5))
  ax.scatter([x['val_acc'] for x in f], [x['finetuned_test_acc'] for x in f])
  ax.set_xlabel('validation accuracy, inherited weights')
  ax.set_ylabel(f'test accuracy after {results["study"]["finetune_steps"]} fine-tuning steps')
  tau = kendall_tau([x['val_acc'] for x in f], [x['finetuned_test_acc'] for x in f])
  ax.set_title(f'Kendall tau {tau:.3f}')
  _save(fig, path)


FIGURES = {
  'candidates_histogram.png': plot_histograms,
  'candidates_vs_error.png': plot_candidates,
  'l2_sweep.png': plot_l2,
  'ranking_fidelity.png': plot_fidelity,
}


def _network(results: dict) -> str:
  net = results['runs']['pgnas'][0]['config']['model']['shake_shake']
  return (
    f'a SupNet-M-family super-network (stem {net["stem_width"]}, stage widths '
    f'{"/".join(str(w) for w in net["widths"])}, {net["blocks_per_stage"]} block per stage, '
    f'{len(net["kernel_sizes"])} branches, {results["runs"]["pgnas"][0]["supernet"]["params"]:,} '
    f'params)'
  )


def markdown(results: dict) -> str:
  s = results['study']
  seeds = len(s['seeds'])
  budget = f'{s["train_steps"]} steps' if s['train_steps'] > 0 else f'{s["train_epochs"]:g} epochs'
  lines = [
    '# PGNAS ablations at small scale',
    '',
    f'Made by `{results["command"]}` on {results["machine"]}; wall time '
    f'{results["wall_seconds"] / 60:.1f} min (training, ranking and fine-tuning, summed over '
    f'runs). Fashion-MNIST, {_network(results)}, {seeds} '
    f'seed(s) per arm, {budget} of training at batch {s["batch_size"]} for every arm, '
    f'{s["validation_size"]} validation images held out of training for ranking, test '
    f'error on the 10,000 test images. Errors are mean ± sample std over seeds.',
    '',
    '## Guided vs predefined sampling (paper Table 3)',
    '',
    f'Winners among {s["candidates"]} candidates per arm. Random: every drop probability '
    f"frozen at p0 = {results['random_p']:.2f}, chosen so that Random's candidates are as "
    f"large as PGNAS's winners: p0 = 1 - the share of searchable weights the PGNAS winners "
    f'keep (mean over seeds). Fine-tuning (FT): {s["finetune_steps"]} steps of the same '
    f'objective with the architecture fixed, learning rate 0.01 to 0 (cosine). The full '
    f'model is trained with p frozen at {s["full_p"]:g}.',
    '',
    '| | test error (%) | params |',
    '|---|---|---|',
    *[f'| {name} | {_error(acc)} | {_params(params)} |' for name, acc, params in table3(results)],
    '',
    f'Paper: {PAPER["table3_supnet_m"]}.',
    '',
    '## Candidate accuracy, Random vs PGNAS (supplement Figure 1)',
    '',
    '![candidate histograms](figures/candidates_histogram.png)',
    '',
    '## Number of candidates (paper Table 6)',
    '',
    '| candidates | test error (%) | params | ranking time (s) |',
    '|---|---|---|---|',
    *[
      f'| {C} | {_error(acc)} | {_params(params)} | {np.mean(sec):.1f} |'
      for C, acc, params, sec in table6(results)
    ],
    '',
    f'Paper: {PAPER["table6"]}.',
    '',
    '![error against candidates](figures/candidates_vs_error.png)',
    '',
    f'## Weight prior l2 (paper Table 4), winners among {s["sweep_candidates"]} candidates',
    '',
    '| l2 | test error (%) | params | mean learned p | super-network error (%) |',
    '|---|---|---|---|---|',
    *[
      f'| {v:g} | {_error(acc)} | {_params(params)} | {np.mean(p):.3f} | {_error(full)} |'
      for v, acc, params, p, full in sorted(sweep(results, 'l2'))
    ],
    '',
    f'Paper: {PAPER["table4"]}.',
    '',
    '![l2 sweep](figures/l2_sweep.png)',
    '',
    f'## Temperature tau (paper Table 5), winners among {s["sweep_candidates"]} candidates',
    '',
    '| tau | test error (%) | params | mean learned p |',
    '|---|---|---|---|',
    *[
      f'| {v:.3g} | {_error(acc)} | {_params(params)} | {np.mean(p):.3f} |'
      for v, acc, params, p, _ in sorted(sweep(results, 'tau'))
    ],
    '',
    f'Paper: {PAPER["table5"]}.',
    '',
    '## Ranking fidelity',
    '',
    f'{len(results["fidelity"])} candidates at evenly spaced places of the ranking of the '
    f"first seed's PGNAS run, each fine-tuned the same way ({s['finetune_steps']} steps, "
    f'the same batches).',
    '',
    '| place | candidate | val acc (inherited) | test acc (inherited) | test acc (fine-tuned) |',
    '|---|---|---|---|---|',
    *[
      f'| {f["place"]} | #{f["index"]} | {f["val_acc"]:.4f} | {f["test_acc"]:.4f} | '
      f'{f["finetuned_test_acc"]:.4f} |'
      for f in results['fidelity']
    ],
    '',
    '![ranking fidelity](figures/ranking_fidelity.png)',
    '',
    "## The paper's claims at this scale",
    '',
    *claims(results),
    '',
  ]
  return '\n'.join(lines)


REPORT = studies.Report('replication.md', markdown, FIGURES)
write = REPORT.write  # (results, workdir) -> the markdown path


if __name__ == '__main__':
  REPORT.rewrite(__doc__)
