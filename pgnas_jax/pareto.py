"""The accuracy-params and accuracy-FLOPs Pareto fronts of the scored candidates:
``search/pareto.json`` and ``plots/pareto.png``.

A candidate is on a front when no other candidate is at least as accurate (validation) and at
most as costly, and strictly better in one of the two. Candidates with equal accuracy and
cost are the same point: all of them are on the front, or none.
"""

import itertools

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt

COSTS = ('params', 'flops')
_FIELDS = ('index', 'val_acc', 'params', 'flops', 'fits')


def front(records: list, cost: str) -> list:
  """The records on the accuracy-``cost`` front, cheapest first (ties: lower index)."""
  ordered = sorted(records, key=lambda r: (r[cost], -r['val_acc'], r['index']))
  best_cheaper = float('-inf')  # best accuracy among strictly cheaper candidates
  on_front = []
  for _, same_cost in itertools.groupby(ordered, key=lambda r: r[cost]):
    same_cost = list(same_cost)
    top = same_cost[0]['val_acc']
    if top > best_cheaper:
      on_front += [r for r in same_cost if r['val_acc'] == top]
      best_cheaper = top
  return on_front


def summary(records: list, supernet: dict, winner_index: int | None, budget: dict) -> dict:
  """What ``search/pareto.json`` holds: both fronts (each candidate's index, validation
  accuracy, params, FLOPs and whether it fits the budget), the full super-network, the
  winner's index and the budget."""
  return {
    'supernet': supernet,
    'winner': winner_index,
    'budget': budget,
    **{
      cost: [{k: r[k] for k in _FIELDS if k in r} for r in front(records, cost)] for cost in COSTS
    },
  }


def plot(records: list, pareto: dict, path: str) -> None:
  """Every candidate, the two fronts, the full super-network and the winner."""
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  labels = {'params': 'parameters', 'flops': 'FLOPs (MACs)'}
  for ax, cost in zip(axes, COSTS):
    ax.scatter(
      [r[cost] for r in records],
      [r['val_acc'] for r in records],
      s=8,
      color='tab:gray',
      alpha=0.5,
      label=f'{len(records)} candidates',
    )
    points = pareto[cost]
    ax.step(
      [r[cost] for r in points],
      [r['val_acc'] for r in points],
      where='post',
      color='tab:blue',
      marker='o',
      markersize=4,
      label=f'Pareto front ({len(points)})',
    )
    full = pareto['supernet']
    ax.scatter(
      [full[cost]],
      [full['val_acc']],
      marker='*',
      s=150,
      color='tab:red',
      label='full super-network',
      zorder=3,
    )
    winner = [r for r in records if r['index'] == pareto['winner']]
    if winner:
      ax.scatter(
        [winner[0][cost]],
        [winner[0]['val_acc']],
        marker='D',
        s=50,
        facecolors='none',
        edgecolors='tab:green',
        linewidths=2,
        label=f'winner #{pareto["winner"]}',
        zorder=4,
      )
    limit = pareto['budget'].get(f'max_{cost}')
    if limit is not None:
      ax.axvline(limit, color='tab:orange', linestyle='--', label='budget')
    ax.set_xlabel(labels[cost])
    ax.set_ylabel('validation accuracy (inherited weights)')
    ax.legend(fontsize=7)
  fig.suptitle('Accuracy against size and compute of the scored candidates')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown(pareto: dict) -> list:
  """report.md's lines listing both fronts."""
  lines = ['## Pareto fronts', '']
  for cost, title in (('params', 'accuracy against params'), ('flops', 'accuracy against FLOPs')):
    lines += [
      f'Candidates on the {title} front (cheapest first; * the winner):',
      '',
      '| candidate | validation acc | params | FLOPs (MACs) | fits the budget |',
      '|---|---|---|---|---|',
    ]
    for r in pareto[cost]:
      mark = ' *' if r['index'] == pareto['winner'] else ''
      fits = {True: 'yes', False: 'no'}.get(r.get('fits'), '')
      lines.append(
        f'| #{r["index"]}{mark} | {r["val_acc"]:.4f} | {r["params"]:,} | {r["flops"]:,} | {fits} |'
      )
    lines.append('')
  return lines
