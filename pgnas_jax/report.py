"""What a run leaves for people: ``posterior.json``, ``report.md`` and ``plots/``."""

import re

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt

from pgnas_jax import masks, pareto, targets
from pgnas_jax import workdir as workdir_lib


def layer_order(name: str):
  """Natural sort key, so stage2_block10 comes after stage2_block9."""
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def posterior_table(names, sizes, probabilities) -> list:
  rows = [
    {'name': n, 'channels': int(c), 'p': float(p)} for n, c, p in zip(names, sizes, probabilities)
  ]
  return sorted(rows, key=lambda r: layer_order(r['name']))


def mean_drop_probability(posterior: list) -> float:
  """Expected share of searchable channels dropped, from the rows of ``posterior_table``."""
  return masks.mean_drop_probability(
    [r['p'] for r in posterior], [r['channels'] for r in posterior]
  )


def plot_posterior(rows: list, path: str) -> None:
  fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows)), 4))
  ax.bar(range(len(rows)), [r['p'] for r in rows], color='tab:blue')
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels([r['name'].replace('/group0', '') for r in rows], rotation=90, fontsize=6)
  ax.set_ylabel('learned drop probability p')
  ax.set_title('Posterior drop probability per searchable group (layers in order)')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_candidates(
  val_accs: list, supernet_val_acc: float, winner_val_acc: float, path: str
) -> None:
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.hist(val_accs, bins=min(50, max(10, len(val_accs) // 5)), color='tab:gray')
  ax.axvline(supernet_val_acc, color='tab:red', label=f'full super-network {supernet_val_acc:.4f}')
  ax.axvline(
    winner_val_acc, color='tab:green', linestyle='--', label=f'winner {winner_val_acc:.4f}'
  )
  ax.set_xlabel('validation accuracy (inherited weights, no fine-tuning)')
  ax.set_ylabel('candidates')
  ax.set_title(f'{len(val_accs)} candidates sampled from the posterior')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_training(metrics: list, path: str) -> None:
  """Losses, training accuracy and mean drop probability by step; with cost targets
  (SPEC section 7) a fourth panel: each expected cost against its ceiling."""
  steps = [m['step'] for m in metrics]
  steered = [k for k in targets.KINDS if metrics and f'expected_{k}' in metrics[0]]
  fig, axes = plt.subplots(1, 4 if steered else 3, figsize=(17 if steered else 13, 3.5))
  for kind in steered:
    line = axes[3].plot(steps, [m[f'expected_{kind}'] for m in metrics], label=f'E[{kind}]')
    axes[3].plot(
      steps,
      [m[f'target_{kind}'] for m in metrics],
      '--',
      color=line[0].get_color(),
      label=f'{kind} ceiling',
    )
  if steered:
    axes[3].set_ylabel('share of the full super-network')
    axes[3].legend()
  axes[0].plot(steps, [m['nll'] for m in metrics], label='nll')
  axes[0].plot(steps, [m['loss'] for m in metrics], label='loss')
  axes[0].set_yscale('log')
  axes[0].legend()
  axes[1].plot(steps, [m['train_accuracy'] for m in metrics])
  axes[1].set_ylabel('train accuracy (relaxed masks)')
  axes[2].plot(steps, [m['mean_p'] for m in metrics])
  axes[2].set_ylabel('mean drop probability')
  for ax in axes:
    ax.set_xlabel('step')
    if not metrics:
      ax.text(0.5, 0.5, 'no training metrics (metrics.jsonl was missing)', ha='center')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _fmt(x, digits=4):
  return f'{x:.{digits}f}' if isinstance(x, float) else f'{x:,}' if isinstance(x, int) else str(x)


def write_markdown(
  path: str,
  arch: dict,
  timings: dict,
  num_candidates: int,
  posterior: list,
  front: dict | None = None,
) -> None:
  """``front``: ``pareto.summary``'s fronts, listed after the plots."""
  full = arch['supernet']
  mean_p = mean_drop_probability(posterior)
  lines = [
    '# PGNAS run report',
    '',
    '| | validation acc | test acc | params | FLOPs (MACs) |',
    '|---|---|---|---|---|',
    f'| full super-network | {_fmt(full["val_acc"])} | {_fmt(full["test_acc"])} | '
    f'{_fmt(full["params"])} | {_fmt(full["flops"])} |',
    f'| winner #{arch["index"]} of {num_candidates} (no fine-tuning) | {_fmt(arch["val_acc"])} | '
    f'{_fmt(arch["test_acc"])} | {_fmt(arch["params"])} | {_fmt(arch["flops"])} |',
    *(
      [
        f'| the winner fine-tuned {arch["finetuned"]["steps"]} steps | '
        f'{_fmt(arch["finetuned"]["val_acc"])} | {_fmt(arch["finetuned"]["test_acc"])} | '
        f'{_fmt(arch["params"])} | {_fmt(arch["flops"])} |'
      ]
      if 'finetuned' in arch
      else []
    ),
    '',
    f'Dropped channels: {arch["dropped_channel_share"]:.1%}; removed convolutions: '
    f'{len(arch["removed_convs"])} ({arch["removed_conv_share"]:.1%}). '
    f'Mean learned drop probability: {mean_p:.4f}.',
    '',
    *_compact_lines(arch),
    '| phase | seconds |',
    '|---|---|',
    *[f'| {k} | {v:.1f} |' for k, v in timings.items()],
    '',
    f'![drop probabilities]({workdir_lib.POSTERIOR_PLOT})',
    '',
    f'![candidate validation accuracy]({workdir_lib.CANDIDATES_PLOT})',
    '',
    f'![training]({workdir_lib.TRAINING_PLOT})',
    '',
    *(
      [f'![Pareto fronts]({workdir_lib.PARETO_PLOT})', '', *pareto.markdown(front)] if front else []
    ),
  ]
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


def _compact_lines(arch: dict) -> list:
  """The deployable winner (search/winner_compact.*): its counts beside the input-slice
  counts the search ranks by, and the latency table."""
  if 'compact_params' not in arch:
    return []
  lines = [
    '## The compact winner',
    '',
    '| | params | FLOPs (MACs) |',
    '|---|---|---|',
    f'| input slices (what the search ranks by) | {_fmt(arch["input_slice_params"])} | '
    f'{_fmt(arch["input_slice_flops"])} |',
    f'| compact network (`search/{arch["compact_files"]["stablehlo"]}`) | '
    f'{_fmt(arch["compact_params"])} | {_fmt(arch["compact_flops"])} |',
    '',
  ]
  latency = arch.get('latency_ms')
  if latency:
    sizes = list(latency['compact'])
    lines += [
      f'Latency in ms, {latency["statistic"]}, on {latency["device"]}:',
      '',
      '| network | ' + ' | '.join(f'batch {b}' for b in sizes) + ' |',
      '|---|' + '---|' * len(sizes),
    ]
    for name in ('compact', 'masked_supernet', 'supernet'):
      cells = ' | '.join(f'{latency[name][b]:.2f}' for b in sizes)
      lines.append(f'| {name.replace("_", " ")} | {cells} |')
    lines.append('')
  return lines
