"""The sampling study (issue 13): gate estimators, candidate samplers and random generators
compared on Fashion-MNIST with a small super-network of the SupNet-M family, with one
command:

    python -m pgnas_jax.experiments.sampling --workdir=DIR [--quick] [--data_dir=...]

writes ``DIR/sampling.md``, ``DIR/results.json`` and the figures under ``DIR/figures/``
(``sampling_report.py``). What it measures:

  * training, per estimator (``drop.estimator``) and seed: the main job
    (``pipeline.run``) in ``DIR/runs/<estimator>/seed<s>``, one fixed budget of steps;
    its winner among ``candidates`` iid candidates (test accuracy, params), the learned
    drop probabilities and the wall time, cached in the run's ``study.json``;
  * candidates, per sampler (``search.sampler``), on each of those trained super-networks:
    candidates 0..C-1 scored on the validation split by the project's search
    (``search.rank_candidates``; ``iid``'s are the main job's own), into
    ``runs/<estimator>/seed<s>/samplers/<sampler>.jsonl``; their validation accuracies and
    params, and how many repeat an earlier candidate's mask, cached in ``samplers.json``;
  * the drop-logit gradient, per estimator, on one fixed super-network (the default
    estimator's first seed, trained) and one fixed training batch: mean and variance over
    many keys, against a reference, DisARM (unbiased) with many more keys drawn independently;
    ``DIR/gradients/<name>.json``;
  * speed: one train step per estimator and per generator (``rng.impl``), timed in turn on a
    synthetic batch, and the time to draw a chunk of candidate masks per generator;
    ``DIR/timing.json``.

Run the same command again after an interruption: finished pieces are skipped, an interrupted
run resumes from its last checkpoint or scored candidate. ``DIR/sizes.json`` records the
study's sizes; a workdir holding a study of other sizes (``--quick`` or not) is refused.
"""

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from pgnas_jax import checkpoint as checkpoint_lib
from pgnas_jax import config as config_lib
from pgnas_jax import data as data_lib
from pgnas_jax import (
  estimators,
  parallel,
  pipeline,
  report,
  rng,
  samplers,
  search,
  supernets,
  targets,
  train,
)
from pgnas_jax import records as records_lib
from pgnas_jax import trained as trained_lib
from pgnas_jax import workdir as workdir_lib
from pgnas_jax.experiments import replicate, sampling_report, studies, timing


@dataclasses.dataclass(frozen=True)
class Study:
  seeds: tuple
  stem_width: int  # the SupNet-M-family super-network: stem and stage widths
  widths: tuple
  train_epochs: float  # unused when train_steps > 0
  train_steps: int  # the one training budget of every estimator
  batch_size: int
  validation_size: int  # images held out of training for ranking
  candidates: int  # candidates 0..C-1 per sampler and trained super-network
  candidate_counts: tuple  # the N of best-of-N
  stratified_block: int  # search.stratified_block
  chunk_size: int  # search.chunk_size
  bootstrap_resamples: int
  gradient_batch: int  # images of the fixed batch the gradients are taken on
  gradient_draws: int  # keys per estimator
  reference_draws: int  # keys of the reference (DisARM)
  gradient_chunk: int  # keys per compiled call (draws are multiples of it)
  timing_rounds: int
  mask_chunk: int  # candidates per timed draw
  mask_repeats: int
  weight_prior_l2: float = 85.0  # the embedded default's weight prior (README)


FULL = Study(
  seeds=(0, 1, 2),
  stem_width=16,
  widths=(16, 32, 64),
  train_epochs=1.0,
  train_steps=900,  # about 2 epochs of the 59,000 training images at batch 128
  batch_size=128,
  validation_size=1000,
  candidates=100,
  candidate_counts=(1, 2, 5, 10, 20, 50, 100),
  stratified_block=16,
  chunk_size=16,
  bootstrap_resamples=1000,
  gradient_batch=64,
  gradient_draws=512,
  reference_draws=4096,
  gradient_chunk=16,
  timing_rounds=7,
  mask_chunk=16,
  mask_repeats=20,
)
QUICK = Study(
  seeds=(0,),
  stem_width=4,
  widths=(4,),
  train_epochs=1.0,
  train_steps=4,
  batch_size=32,
  validation_size=100,
  candidates=4,
  candidate_counts=(1, 2, 4),
  stratified_block=2,
  chunk_size=4,
  bootstrap_resamples=100,
  gradient_batch=8,
  gradient_draws=8,
  reference_draws=16,
  gradient_chunk=8,
  timing_rounds=1,
  mask_chunk=4,
  mask_repeats=2,
)
REFERENCE = 'reference'  # DisARM with reference_draws keys, drawn apart from the estimators'
GRADIENT_KEYS = {REFERENCE: 1}  # the root of a gradient's keys; every estimator's: 0


def run_config(study: Study, estimator: str, seed: int, data_dir: str | None):
  """The replication study's base config with this study's budget and search sizes."""
  c = replicate.base_config(study, seed, data_dir)
  c.drop.estimator = estimator
  c.search.num_candidates = study.candidates
  c.search.chunk_size = study.chunk_size
  c.search.stratified_block = study.stratified_block
  c.export.latency = False  # not compared here
  config_lib.validate(c)
  return c


def logit_gradient_moments(
  trained: trained_lib.Trained,
  config: ml_collections.ConfigDict,
  batch: dict,
  key,
  draws: int,
  chunk: int,
) -> dict:
  """Mean and variance (over ``draws`` keys ``fold_in(key, i)``) of the drop-logit gradient
  that the estimator of ``config`` gives on ``batch`` at the ``trained`` weights and logits,
  one value per group in the order of the logit tree's leaves; ``seconds`` per draw."""
  state = trained.state
  loss_fn = train.make_loss_fn(trained.model, trained.space, config)

  def one(params, batch_stats, batch, key, i):
    k = jax.random.fold_in(key, i)
    loss = lambda t: loss_fn({**params, 'drop_logits': t}, batch_stats, batch, k)[0]
    return jnp.stack(jax.tree.leaves(jax.grad(loss)(params['drop_logits'])))

  # the key is an argument, not a constant: the reference and DisARM compile to one program
  many = jax.jit(jax.vmap(one, in_axes=(None, None, None, None, 0)))
  args = (state.params, state.batch_stats, batch, key)
  jax.block_until_ready(many(*args, jnp.arange(chunk)))  # compiles
  start = time.time()
  grads = np.concatenate(
    [np.asarray(many(*args, jnp.arange(i, i + chunk))) for i in range(0, draws, chunk)]
  )
  return {
    'draws': int(len(grads)),
    'mean': grads.mean(0).tolist(),
    'var': grads.var(0, ddof=1).tolist(),
    'seconds_per_draw': (time.time() - start) / len(grads),
  }


class Runner:
  """Runs and analyses the pieces of one study under ``workdir``, skipping what is done."""

  def __init__(self, study: Study, workdir: str, data_dir: str | None):
    self.study, self.workdir, self.data_dir = study, workdir, data_dir
    self.mesh = parallel.make_mesh()
    self.dataset = data_lib.load(self.config(estimators.DEFAULT, study.seeds[0]).data)
    self._runs_total = len(estimators.NAMES) * len(study.seeds)
    self._runs_seen = 0
    self._start = time.time()

  def config(self, estimator: str, seed: int):
    return run_config(self.study, estimator, seed, self.data_dir)

  def run_dir(self, estimator: str, seed: int) -> str:
    return os.path.join(self.workdir, 'runs', estimator, f'seed{seed}')

  def _write(self, path: str, obj) -> None:
    if parallel.is_main_process():
      os.makedirs(os.path.dirname(path), exist_ok=True)
      workdir_lib.write_json(path, obj)

  def _trained(self, estimator: str, seed: int):
    return trained_lib.restore(
      self.run_dir(estimator, seed), self.config(estimator, seed), self.dataset, self.mesh
    )

  def training(self, estimator: str, seed: int) -> dict:
    """Trains and searches with the main job; its winner, learned p and wall time."""
    workdir = self.run_dir(estimator, seed)
    cache = os.path.join(workdir, 'study.json')
    self._runs_seen += 1
    if os.path.exists(cache):
      return workdir_lib.read_json(cache)
    logging.info(
      'study: run %d of %d: %s, seed %d (%.0f min so far)',
      self._runs_seen,
      self._runs_total,
      estimator,
      seed,
      (time.time() - self._start) / 60,
    )
    start = time.time()
    done = pipeline.run(self.config(estimator, seed), workdir)
    arch, posterior, timings = done.arch, done.posterior, done.timings
    result = {
      'estimator': estimator,
      'seed': seed,
      'winner': {k: arch[k] for k in ('index', 'val_acc', 'test_acc', 'params')},
      'supernet': arch['supernet'],
      'mean_p': report.mean_drop_probability(posterior),
      'p': [g['p'] for g in posterior],
      'train_seconds': timings['train'],
      'search_seconds': timings['search'],
      'wall_seconds': time.time() - start,
    }
    self._write(cache, result)
    return result

  def candidates(self, estimator: str, seed: int) -> dict:
    """Per sampler: validation accuracy and params of candidates 0..C-1 of this trained
    super-network, and how many of them repeat an earlier candidate's mask."""
    workdir = self.run_dir(estimator, seed)
    cache = os.path.join(workdir, 'samplers.json')
    if os.path.exists(cache):
      return workdir_lib.read_json(cache)
    start = time.time()
    config = self.config(estimator, seed)
    trained = self._trained(estimator, seed)
    scorer = search.Scorer(trained.model, self.mesh, config.model.compute_dtype)
    validation = data_lib.replicated_batches(
      self.dataset.validation, self.dataset, config.search.eval_batch_size, self.mesh
    )
    result = {}
    multiple = targets.channel_multiple(config, trained.space.template)
    for name in samplers.NAMES:
      search_config = config.search.copy_and_resolve_references()
      search_config.sampler = name
      sampler = samplers.from_config(search_config, multiple)
      if name == config.search.sampler:  # the main job's own candidates
        records = records_lib.read(workdir_lib.path(workdir, workdir_lib.CANDIDATES))
      else:
        path = os.path.join(workdir, 'samplers', f'{name}.jsonl')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with checkpoint_lib.PreemptionGuard() as guard:
          log = search.RankingLog(path, guard, budget=search.budget(config, trained.space))
          records = search.rank_candidates(
            scorer,
            trained.state,
            trained.space,
            search.Validation(validation),
            search_config,
            sampler,
            log,
          )
      drawn = search.draw_candidates(
        trained.state.key('search'),
        jnp.arange(len(records)),
        trained.state.drop_logits,
        trained.space.template,
        sampler,
      )
      result[name] = {
        'val_accs': [r['val_acc'] for r in records],
        'params': [r['params'] for r in records],
        'duplicates': sampling_report.count_duplicates(drawn),  # on the host
      }
    result['wall_seconds'] = time.time() - start
    self._write(cache, result)
    return result

  def gradients(self) -> dict:
    """Mean and variance of the drop-logit gradient of every estimator, and the reference,
    on the first seed's trained super-network of the default estimator."""
    study, seed = self.study, self.study.seeds[0]
    names = (REFERENCE,) + estimators.NAMES
    paths = {n: os.path.join(self.workdir, 'gradients', f'{n}.json') for n in names}
    result = {n: workdir_lib.read_json(p) for n, p in paths.items() if os.path.exists(p)}
    todo = [n for n in names if n not in result]
    if not todo:
      return result
    config = self.config(estimators.DEFAULT, seed)
    trained = self._trained(estimators.DEFAULT, seed)
    batch = self.dataset.train_batch(config.data, seed, 0, study.gradient_batch)
    for name in todo:
      start = time.time()
      c = config.copy_and_resolve_references()
      c.drop.estimator = 'disarm' if name == REFERENCE else name
      draws = study.reference_draws if name == REFERENCE else study.gradient_draws
      result[name] = logit_gradient_moments(
        trained,
        c,
        batch,
        jax.random.key(GRADIENT_KEYS.get(name, 0)),
        draws,
        study.gradient_chunk,
      )
      result[name]['wall_seconds'] = time.time() - start
      logging.info('study: gradients of %s, %d draws', name, draws)
      self._write(paths[name], result[name])
    return result

  def timing(self) -> dict:
    """Train-step time per estimator and per generator, the runs' step (optimiser, schedule,
    temperature) on the first training batch, timed in turn on one device (the default
    estimator with the default generator is one step of both), and the time to draw a chunk
    of iid candidate masks per generator."""
    cache = os.path.join(self.workdir, 'timing.json')
    if os.path.exists(cache):
      return workdir_lib.read_json(cache)
    start, study = time.time(), self.study
    config = self.config(estimators.DEFAULT, study.seeds[0])
    model = supernets.build(config.model, self.dataset.num_classes)
    configs = {}
    for name in estimators.NAMES:
      configs[name] = config.copy_and_resolve_references()
      configs[name].drop.estimator = name
    for impl in rng.IMPLEMENTATIONS[1:]:  # the first is the default, in configs already
      configs[impl] = config.copy_and_resolve_references()
      configs[impl].rng.impl = impl
    # the runs' batch size: their compiled steps are reused
    batch = self.dataset.train_batch(config.data, config.seed, 0, study.batch_size)
    one_device = parallel.make_mesh(jax.devices()[:1])
    steps = timing.interleaved_step_times(
      configs, model, batch, study.timing_rounds, one_device, self.dataset
    )
    template = timing.mask_template(model, self.dataset.image_shape)
    result = {
      'estimators': {name: steps[name] for name in estimators.NAMES},
      'generators': {
        impl: {
          **steps[impl if impl != rng.DEFAULT else estimators.DEFAULT],
          'draw_ms': 1e3
          * timing.mask_draw_seconds(
            template, impl, samplers.IID, study.mask_chunk, study.mask_repeats
          ),
        }
        for impl in rng.IMPLEMENTATIONS
      },
      'wall_seconds': time.time() - start,
    }
    self._write(cache, result)
    return result


def cache_compilations(workdir: str) -> None:
  """The study compiles the same programs again and again (every run, restore and timing
  initialises the same model; the timing's train steps are the runs'): unless a persistent
  compilation cache is configured, one under ``DIR/compilation_cache`` compiles each once. A
  hit runs the very same executable (the cache is keyed by the program and the JAX
  version), so no result changes; compile times measured after a hit are a cache read."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'compilation_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)


def run_study(study: Study, workdir: str, data_dir: str | None = None, command: str = '') -> dict:
  """Runs (or resumes) the whole study and writes the report; returns the results."""
  studies.claim_workdir(study, workdir)
  cache_compilations(workdir)
  runner = Runner(study, workdir, data_dir)
  training = {e: [runner.training(e, s) for s in study.seeds] for e in estimators.NAMES}
  candidates = {e: [runner.candidates(e, s) for s in study.seeds] for e in estimators.NAMES}
  gradients = runner.gradients()
  speed = runner.timing()
  wall = (
    sum(r['wall_seconds'] for rs in (*training.values(), *candidates.values()) for r in rs)
    + sum(g['wall_seconds'] for g in gradients.values())
    + speed['wall_seconds']
  )
  results = {
    'study': dataclasses.asdict(study),
    'command': command,
    'machine': f'{jax.devices()[0].platform}, {os.cpu_count()} cores',
    'network': run_config(study, estimators.DEFAULT, study.seeds[0], data_dir).model.to_dict(),
    'estimators': list(estimators.NAMES),
    'samplers': list(samplers.NAMES),
    'generators': list(rng.IMPLEMENTATIONS),
    'default_estimator': estimators.DEFAULT,
    'training': training,
    'candidates': candidates,
    'gradients': gradients,
    'timing': speed,
    'wall_seconds': wall,
  }
  if parallel.is_main_process():
    workdir_lib.write_json(os.path.join(workdir, 'results.json'), results)
    sampling_report.write(results, workdir)
  return results


def cli():
  studies.cli(
    'pgnas_jax.experiments.sampling',
    run_study,
    FULL,
    QUICK,
    'sampling.md',
    'A tiny study (one seed, a few steps) that runs every table and figure.',
  )


if __name__ == '__main__':
  cli()
