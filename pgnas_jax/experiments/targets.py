"""What a FLOPs target buys, against the baseline every pruning paper reports, with one
command:

    python -m pgnas_jax.experiments.targets --workdir=DIR [--quick]

writes ``DIR/targets.md``, ``DIR/results.json`` and ``DIR/figures/targets_pareto.png``. Every
training and search is the main job (``pipeline.run``) in its own workdir,
``DIR/runs/<arm>/seed<s>``, summarised beside it in ``study.json``; run the same command
again after an interruption and finished runs are skipped, an interrupted one resumes.
``DIR/sizes.json`` records the study's sizes; a workdir of other sizes is refused.

Arms, per FLOPs target (a share of the full super-network) and seed (``Study`` sets the
sizes; ``FULL`` is the committed study, ``QUICK`` the CI one):
  * ``target``: the super-network trained with ``objective.target_flops`` and searched; its
    winner without fine-tuning and after ``finetune.steps`` of it;
  * ``uniform``: the family's network with every width scaled by one multiplier so that it
    has the target's FLOPs, trained from scratch for as many steps with dropout all but off
    (``drop.mode='random'``, p = 0.001) and tested whole: the width-multiplier baseline;
  * ``init_from``: the ``target`` arm started from the ``pretrained`` run's weights
    (``train.init_from``, its last checkpoint) with a quarter of the steps;
  * ``pretrained`` (per seed, no target): the network that ``init_from`` prunes.
"""

import dataclasses
import os
import time

import jax
import ml_collections
from absl import logging

from pgnas_jax import config as config_lib
from pgnas_jax import data as data_lib
from pgnas_jax import parallel, pipeline, supernets, train
from pgnas_jax import space as space_lib
from pgnas_jax import workdir as workdir_lib
from pgnas_jax.experiments import studies, targets_report

ARMS = ('target', 'uniform', 'init_from')
NEARLY_OFF = 0.001  # the uniform arm's frozen drop probability


@dataclasses.dataclass(frozen=True)
class Study:
  seeds: tuple
  shares: tuple  # FLOPs targets, shares of the full super-network
  stem_width: int  # the SupNet-M-family super-network: stem and stage widths
  widths: tuple
  train_epochs: float
  train_steps: int  # > 0 overrides train_epochs
  batch_size: int
  validation_size: int
  candidates: int
  finetune_steps: int
  latency: bool  # measure every winner's latency (export.latency)


FULL = Study(
  seeds=(0, 1, 2),
  shares=(0.75, 0.5, 0.25),
  stem_width=16,
  widths=(16, 32, 64),
  train_epochs=1.5,
  train_steps=-1,
  batch_size=128,
  validation_size=2000,
  candidates=100,
  finetune_steps=100,
  latency=True,
)
QUICK = Study(
  seeds=(0,),
  shares=(0.5,),
  stem_width=4,
  widths=(4, 8),
  train_epochs=1.0,
  train_steps=8,
  batch_size=32,
  validation_size=200,
  candidates=4,
  finetune_steps=2,
  latency=False,
)


def base_config(study: Study, seed: int, data_dir: str | None) -> ml_collections.ConfigDict:
  """The embedded default with the study's network and budget: every arm starts from it."""
  c = config_lib.get_config()
  c.seed = seed
  c.model.shake_shake.stem_width = study.stem_width
  c.model.shake_shake.widths = study.widths
  if data_dir:
    c.data.data_dir = data_dir
  c.data.validation_size = study.validation_size
  c.train.num_epochs = study.train_epochs
  c.train.num_steps = study.train_steps
  c.train.batch_size = study.batch_size
  c.search.num_candidates = study.candidates
  # accuracy at the FLOPs asked for, as counted: candidates cut channel by channel, as the
  # uniform arm's widths are (a target's default, 'auto', keeps blocks of 16; docs/targets.md)
  c.search.channel_multiple = 1
  c.checkpoint.every_steps = 200
  c.export.latency = study.latency
  return c


def scaled_widths(study: Study, share: float, image_shape: tuple) -> tuple:
  """(stem width, stage widths) of the study's network with every width times one
  multiplier, the largest whose full network has at most ``share`` of the FLOPs (MACs); by
  bisection on the multiplier, widths rounded, one channel at least."""

  def flops(multiplier: float) -> tuple:
    stem = max(1, round(study.stem_width * multiplier))
    widths = tuple(max(1, round(w * multiplier)) for w in study.widths)
    c = config_lib.get_config()
    c.model.shake_shake.stem_width, c.model.shake_shake.widths = stem, widths
    space = space_lib.of_model(supernets.build(c.model, 10), image_shape)
    return int(space_lib.costs(space, space.template)[1]), (stem, widths)

  full, _ = flops(1.0)
  low, high = 0.0, 1.0
  for _ in range(8):  # 1/256: finer than a width of 64 channels can follow
    middle = (low + high) / 2
    low, high = (middle, high) if flops(middle)[0] <= share * full else (low, middle)
  return flops(max(low, 1e-3))[1]


def arm_config(study: Study, arm: str, share: float, seed: int, context: dict):
  """The main job's config of ``arm`` at FLOPs target ``share``; ``context``: the data
  folder, the training length in steps, the uniform widths, the pretrained checkpoint."""
  c = base_config(study, seed, context['data_dir'])
  if arm == 'uniform':
    c.drop.mode, c.drop.random_p = 'random', NEARLY_OFF
    c.search.num_candidates = 1  # tested whole: the full thinned network
    c.model.shake_shake.stem_width, c.model.shake_shake.widths = context['uniform'][share]
  else:
    c.objective.target_flops = share
    c.finetune.steps = study.finetune_steps
  if arm == 'init_from':
    c.train.init_from = context['pretrained'][seed]
    c.train.num_steps = max(1, context['steps'] // 4)
  config_lib.validate(c)
  return c


def summary(arm: str, share: float, seed: int, result: pipeline.Result) -> dict:
  """What the report needs of one finished run: test accuracy (and after fine-tuning),
  params, FLOPs and latency of the network one would deploy (the compact winner; for the
  uniform arm, its whole network)."""
  arch = result.arch
  whole = arm == 'uniform'
  latency = arch.get('latency_ms', {}).get('supernet' if whole else 'compact')
  return {
    'arm': arm,
    'share': share,
    'seed': seed,
    'test_acc': arch['supernet']['test_acc'] if whole else arch['test_acc'],
    'finetuned_test_acc': arch.get('finetuned', {}).get('test_acc'),
    'params': arch['supernet']['params'] if whole else arch.get('compact_params', arch['params']),
    'flops': arch['supernet']['flops'] if whole else arch.get('compact_flops', arch['flops']),
    'full_flops': None if whole else arch['supernet']['flops'],
    'latency_ms': latency and {k: latency[k] for k in ('1', '128')},
    'full_latency_ms': None if whole or not latency else arch['latency_ms']['supernet'],
    'train_seconds': result.timings['train'],
  }


class Runner:
  """Runs the study's main jobs under ``workdir``, skipping the finished ones."""

  def __init__(self, study: Study, workdir: str, data_dir: str | None):
    self.study, self.workdir = study, workdir
    config = base_config(study, 0, data_dir)
    dataset = data_lib.load(config.data)
    self.context = {
      'data_dir': data_dir,
      'steps': train.setup(config, dataset).total_steps,
      'pretrained': {},
      'uniform': self._uniform_widths(dataset.image_shape),
    }
    self.total = len(study.seeds) * (1 + len(ARMS) * len(study.shares))
    self.seen, self.start = 0, time.time()

  def _uniform_widths(self, image_shape: tuple) -> dict:
    """Per target, the uniform arm's widths (``scaled_widths``: a model compiled per try,
    minutes at full size), kept in ``DIR/uniform_widths.json`` for a resumed study."""
    path = os.path.join(self.workdir, 'uniform_widths.json')
    if os.path.exists(path):
      return {float(s): (w[0], tuple(w[1])) for s, w in workdir_lib.read_json(path).items()}
    logging.info("study: the uniform arm's widths for FLOPs targets %s", self.study.shares)
    widths = {s: scaled_widths(self.study, s, image_shape) for s in self.study.shares}
    if parallel.is_main_process():
      workdir_lib.write_json(path, {f'{s!r}': w for s, w in widths.items()})
    return widths

  def run_dir(self, arm: str, seed: int, share: float | None = None) -> str:
    name = arm if share is None else f'{arm}_{share:g}'
    return os.path.join(self.workdir, 'runs', name, f'seed{seed}')

  def _main_job(self, config, workdir: str, what: str) -> pipeline.Result:
    self.seen += 1
    logging.info(
      'study: run %d of %d: %s (%.0f min so far)',
      self.seen,
      self.total,
      what,
      (time.time() - self.start) / 60,
    )
    return pipeline.run(config, workdir)

  def pretrain(self, seed: int) -> None:
    """The seed's network trained without a target; its last checkpoint is what the
    ``init_from`` arm starts from."""
    workdir = self.run_dir('pretrained', seed)
    config = base_config(self.study, seed, self.context['data_dir'])
    config.search.num_candidates, config.export.latency = 1, False  # only its weights are used
    self._main_job(config, workdir, f'pretrained, seed {seed}')
    checkpoints = workdir_lib.path(workdir, workdir_lib.CHECKPOINTS)
    last = max(int(n) for n in os.listdir(checkpoints) if n.isdigit())
    self.context['pretrained'][seed] = os.path.join(checkpoints, str(last))

  def arm(self, arm: str, share: float, seed: int) -> dict:
    workdir = self.run_dir(arm, seed, share)
    cache = os.path.join(workdir, 'study.json')
    if os.path.exists(cache):
      self.seen += 1
      return workdir_lib.read_json(cache)
    config = arm_config(self.study, arm, share, seed, self.context)
    result = self._main_job(config, workdir, f'{arm}, FLOPs target {share:g}, seed {seed}')
    out = summary(arm, share, seed, result)
    if parallel.is_main_process():
      workdir_lib.write_json(cache, out)
    return out


def run_study(study: Study, workdir: str, data_dir: str | None = None, command: str = '') -> dict:
  """Runs (or resumes) the whole study and writes the report; returns the results."""
  studies.claim_workdir(study, workdir)
  runner = Runner(study, workdir, data_dir)
  runs = []
  for seed in study.seeds:
    runner.pretrain(seed)
    for share in study.shares:
      runs += [runner.arm(arm, share, seed) for arm in ARMS]
  results = {
    'study': dataclasses.asdict(study),
    'command': command,
    'machine': f'{jax.devices()[0].platform}, {os.cpu_count()} cores',
    'train_steps': runner.context['steps'],
    'uniform_widths': {f'{s:g}': w for s, w in runner.context['uniform'].items()},
    'runs': runs,
  }
  if parallel.is_main_process():
    workdir_lib.write_json(os.path.join(workdir, 'results.json'), results)
    targets_report.REPORT.write(results, workdir)
  return results


def cli():
  studies.cli(
    'pgnas_jax.experiments.targets',
    run_study,
    FULL,
    QUICK,
    'targets.md',
    'A tiny study (one seed, one target, a few steps) that runs every arm, table and figure.',
  )


if __name__ == '__main__':
  cli()
