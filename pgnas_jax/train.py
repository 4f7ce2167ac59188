"""Training the super-network: the train state, the jitted data-parallel ``train_step``
(weights and drop logits by one optimiser, Alg. 1 lines 1-6) and the training loop."""

import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pgnas_jax import targets as targets_lib
from pgnas_jax import context as context_lib
from pgnas_jax.backends.cpu import ops as cpu_ops
from pgnas_jax import data as data_lib
from pgnas_jax import masks as masks_lib
from pgnas_jax import estimators, metric_writers, objective, observe, optim, parallel, rng
from pgnas_jax import pretrained
from pgnas_jax import space as space_lib
from pgnas_jax import workdir as workdir_lib
from pgnas_jax.backends.cpu import xla_options
from pgnas_jax.errors import ConfigError, NonFiniteLossError, Preempted

PyTree = Any
KEY_PURPOSES = {'init': 0, 'train': 1, 'search': 2, 'finetune': 3}


def purpose_key(root_key: jax.Array, purpose: str) -> jax.Array:
  """Keys are derived from the root key by purpose, then by step or candidate index."""
  return jax.random.fold_in(root_key, KEY_PURPOSES[purpose])


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: PyTree  # {'weights': model params, 'drop_logits': one scalar per group}
  batch_stats: PyTree
  opt_state: PyTree
  root_key: jax.Array

  @property
  def variables(self) -> dict:
    """The super-network's weights and BatchNorm statistics, as ``model.apply`` takes them."""
    return {'params': self.params['weights'], 'batch_stats': self.batch_stats}

  @property
  def drop_logits(self) -> PyTree:
    return self.params['drop_logits']

  def key(self, purpose: str) -> jax.Array:
    return purpose_key(self.root_key, purpose)


def initialise(
  model,
  config: ml_collections.ConfigDict,
  image_shape: tuple,
  tx: optax.GradientTransformation,
  mesh,
) -> tuple:
  """(TrainState replicated on the mesh, SearchSpace)."""
  root_key = rng.root_key(config.seed, config.rng.impl)
  variables = space_lib.initial_variables(model, image_shape, purpose_key(root_key, 'init'))
  space = space_lib.from_variables(variables)
  p0 = config.drop.random_p if config.drop.mode == 'random' else config.drop.init_p
  params = {
    'weights': variables['params'],
    'drop_logits': masks_lib.init_drop_logits(space.template, p0),
  }
  state = TrainState(
    step=jnp.int32(0),
    params=params,
    batch_stats=variables.get('batch_stats', {}),  # none without BatchNorm
    opt_state=tx.init(params),
    root_key=root_key,
  )
  return parallel.put_replicated(state, mesh), space


def make_loss_fn(model, space: space_lib.SearchSpace, config: ml_collections.ConfigDict):
  """``loss_fn(params, batch_stats, batch, key, tau=drop.tau) -> (loss, (LossParts, logits,
  batch_stats))``: the step's negative ELBO under the masks of the estimator
  ``drop.estimator`` (``estimators.py``), whose gradient is that estimator's; ``tau`` is the
  step's temperature (``estimators.temperature``)."""
  learned = config.drop.mode == 'learned'
  masked_loss = objective.make_masked_loss(model, space.template, config, learned)
  estimate = estimators.ESTIMATORS[config.drop.estimator]

  def loss_fn(params, batch_stats, batch, key, tau=config.drop.tau):
    drop_logits = params['drop_logits']
    if not learned:
      drop_logits = jax.lax.stop_gradient(drop_logits)
    noise = masks_lib.logistic_noise(
      jax.random.fold_in(key, 0), space.template, batch['images'].shape[0]
    )
    shake_key = jax.random.fold_in(key, 1)  # the same in every pass of an estimator

    def loss(drop_logits, masks):
      weights = {'weights': params['weights'], 'drop_logits': drop_logits}
      return masked_loss(weights, batch_stats, masks, batch, shake_key)

    return estimate(loss, drop_logits, noise, tau, learned)

  return loss_fn


def mean_drop_probability(drop_logits: PyTree, template: PyTree) -> jax.Array:
  """Expected share of searchable channels dropped."""
  return masks_lib.mean_drop_probability(
    jax.tree.leaves(masks_lib.drop_probabilities(drop_logits)), masks_lib.channel_counts(template)
  )


def make_train_step(
  model,
  space: space_lib.SearchSpace,
  config: ml_collections.ConfigDict,
  run: 'TrainSetup',
  mesh,
  latency=None,
) -> Callable:
  """``train_step(state, batch) -> (state, metrics)`` of the run set up as ``run`` (its
  optimiser, learning-rate and tau schedules), jitted over the mesh: state replicated,
  batch sharded over 'data', the state donated; on CPU compiled with
  ``xla_options.CPU_TRAIN_OPTIONS``, its convolutions and BatchNorm on the CPU kernels
  (``backends.cpu.ops.in_use``). ``latency``: the run's ``latency_table.Table``, which a
  latency target needs."""
  tx, schedule, temperature = run.tx, run.schedule, run.temperature
  loss_fn = make_loss_fn(model, space, config)
  targets = targets_lib.from_config(config, space, run.total_steps, latency)

  def train_step(state: TrainState, batch: dict):
    key = jax.random.fold_in(state.key('train'), state.step)
    tau = temperature(state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    with cpu_ops.in_use(mesh):
      (loss, (parts, logits, batch_stats)), grads = grad_fn(
        state.params, state.batch_stats, batch, key, tau
      )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    steering = {}
    if targets is not None:  # SPEC section 7: the posterior held under the cost ceiling
      drop_logits, steering = targets.project(params['drop_logits'], state.step + 1)
      params = {**params, 'drop_logits': drop_logits}
    metrics = {
      'loss': loss,
      **parts._asdict(),
      'grad_norm': optax.tree.norm(grads),
      'train_accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['labels']),
      'learning_rate': schedule(state.step),
      'mean_p': mean_drop_probability(state.drop_logits, space.template),
      'tau': jnp.float32(tau),
      **steering,
    }
    new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, metrics

  replicated = parallel.replicated(mesh)
  return jax.jit(
    train_step,
    in_shardings=(replicated, parallel.batch_sharded(mesh)),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
    compiler_options=xla_options.train_compiler_options(mesh),
  )


class TrainSetup(NamedTuple):
  total_steps: int
  steps_per_epoch: int
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  temperature: Callable  # tau of a step (estimators.temperature)


def setup(config: ml_collections.ConfigDict, dataset: data_lib.Source) -> TrainSetup:
  per_epoch = data_lib.steps_per_epoch(dataset, config.train.batch_size)
  if per_epoch == 0:
    raise ConfigError(
      f'--config.train.batch_size={config.train.batch_size} is larger than the '
      f'{dataset.train.num_examples} training images'
    )
  total = (
    config.train.num_steps
    if config.train.num_steps > 0
    else int(round(config.train.num_epochs * per_epoch))
  )
  if total < 1:  # a run must train to finish: the search ranks a trained posterior
    raise ConfigError(
      f'--config.train.num_epochs={config.train.num_epochs} gives no training step ('
      f'{per_epoch} steps per epoch of batch {config.train.batch_size}): use at least '
      f'{0.5 / per_epoch:.2g} epochs, or --config.train.num_steps'
    )
  return fixed_setup(config, total, per_epoch)


def fixed_setup(
  config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int
) -> TrainSetup:
  """The setup of a run of ``total_steps`` steps, epochs of ``steps_per_epoch``, whatever
  the data (``setup`` counts them from the data set)."""
  schedule = optim.learning_rate_schedule(config.train, total_steps, steps_per_epoch)
  return TrainSetup(
    total_steps,
    steps_per_epoch,
    schedule,
    optim.make_optimizer(config, schedule),
    estimators.temperature(config.drop, total_steps),
  )


def check_finite(values: list, first_step: int, message: str) -> None:
  """Raises ``NonFiniteLossError(message)`` on the first step whose values (one entry per
  step, counted from ``first_step``: a scalar or a tuple of them) hold a NaN or Inf;
  ``{step}`` in the message names it."""
  values = np.asarray(jax.device_get(values))
  bad = np.flatnonzero(~np.all(np.isfinite(values), axis=tuple(range(1, values.ndim))))
  if bad.size:
    raise NonFiniteLossError(message.format(step=first_step + int(bad[0])))


def _check_finite(pending: list, first_step: int) -> None:
  """Raises on the first step among ``pending`` whose loss or gradient is not finite (steps
  counted from 1). The gradient is checked too: a NaN input can leave the loss finite (ReLU
  maps NaN to 0 on XLA:CPU) and still poison the update."""
  check_finite(
    [(m['loss'], m['grad_norm']) for m in pending],
    first_step,
    'non-finite loss or gradient at training step {step} (counting from 1); the '
    'checkpoints before it are intact. Lower --config.train.learning_rate or check '
    'the data, then rerun with --start_over',
  )


def resume(model, config: ml_collections.ConfigDict, dataset: data_lib.Source, mesh, checkpointer):
  """(TrainState, SearchSpace) of the run whose checkpoints ``checkpointer`` keeps: its newest
  readable checkpoint, or the initial state where there is none. Every restore of a trained
  run goes through here: the training loop's, the export command's and the studies'
  (``trained.restore``)."""
  run = setup(config, dataset)
  state, space = initialise(model, config, dataset.image_shape, run.tx, mesh)
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state = restored
    logging.info('resuming from the checkpoint at step %d', int(state.step))
  elif config.train.init_from:
    state = _started_from(state, config.train.init_from, run.tx, mesh)
  return state, space


def _started_from(state: TrainState, path: str, tx, mesh) -> TrainState:
  """``state`` with the weights (and BatchNorm statistics, where given) of ``path``
  (``train.init_from``); its drop logits are the run's own initial ones."""
  loaded = pretrained.load(path, jax.device_get(state.variables))
  params = {'weights': loaded['params'], 'drop_logits': jax.device_get(state.drop_logits)}
  batch_stats = loaded.get('batch_stats', jax.device_get(state.batch_stats))
  logging.info('starting from the weights in %s', path)
  started = state.replace(params=params, batch_stats=batch_stats, opt_state=tx.init(params))
  return parallel.put_replicated(jax.device_get(started), mesh)


def _announce(run: TrainSetup, dataset: data_lib.Source, space, mesh) -> None:
  logging.info(
    'training: %d steps (%.2f epochs of %d images), %d searchable groups, '
    '%d channels, %d devices in %d processes',
    run.total_steps,
    run.total_steps / run.steps_per_epoch,
    dataset.train.num_examples,
    space.num_groups,
    space.num_channels,
    mesh.devices.size,
    jax.process_count(),
  )


def _show_progress(
  done: int, total: int, summary: dict, images_per_second: float, batch_size: int
) -> None:
  logging.info(
    'train step %d/%d  loss %.4f  nll %.4f  acc %.3f  mean p %.3f  lr %.4f  %.0f img/s  eta %.0fs',
    done,
    total,
    summary['loss'],
    summary['nll'],
    summary['train_accuracy'],
    summary['mean_p'],
    summary['learning_rate'],
    images_per_second,
    (total - done) * batch_size / images_per_second,
  )
  steered = [k for k in targets_lib.KINDS if f'expected_{k}' in summary]
  if steered:  # SPEC section 7
    logging.info(
      '  target: %s  shift %.3f',
      '  '.join(
        f'E[{k}] {summary[f"expected_{k}"]:.3f} <= {summary[f"target_{k}"]:.3f}' for k in steered
      ),
      summary['target_shift'],
    )


def train(ctx: context_lib.Context) -> tuple:
  """Trains to the end, resuming from the newest checkpoint in the workdir; writes
  ``metrics.jsonl`` (and TensorBoard's ``tensorboard/train/``, profiler traces on request)
  and checkpoints. Returns (state, search space)."""
  model, config, dataset, mesh = ctx.model, ctx.config, ctx.dataset, ctx.mesh
  checkpointer, guard = ctx.checkpointer, ctx.guard
  run = setup(config, dataset)
  state, space = resume(model, config, dataset, mesh, checkpointer)
  logging.info('%s', observe.parameter_overview(state.params['weights'], space.template))
  first = int(state.step)
  if first >= run.total_steps:
    return state, space
  train_step = make_train_step(model, space, config, run, mesh, ctx.latency)
  batch_size = config.train.batch_size
  _announce(run, dataset, space, mesh)
  pending, start, last = [], time.time(), time.time()
  profiler = observe.StepProfiler(
    workdir_lib.path(ctx.workdir, workdir_lib.PROFILE),
    config.log.profile_steps,
    run.total_steps,
    enabled=parallel.is_main_process(),
  )
  with metric_writers.for_training(ctx.workdir, first, config.log) as writer, profiler:
    batches = data_lib.train_batches(
      dataset, config.data, config.seed, range(first, run.total_steps), batch_size, mesh
    )
    for step, batch in zip(range(first, run.total_steps), batches):
      state, metrics = profiler.call(step + 1, train_step, state, batch)
      pending.append(metrics)
      done = step + 1
      log_now = done % config.train.log_every_steps == 0 or done == run.total_steps
      stop = guard.requested  # read once: a signal arriving later is seen at the next step
      if jax.process_count() > 1:  # all processes must stop at the same step: they agree
        stop = log_now and parallel.any_process(stop)  # where they wait for results anyway
      save_now = checkpointer.due(done) or done == run.total_steps or stop
      if log_now or save_now:  # never save a state whose loss was not seen to be finite
        _check_finite(pending, done - len(pending) + 1)
      if save_now and not stop:
        checkpointer.save(done, state)
      if log_now:
        host = jax.device_get(pending)
        summary = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        writer.write_scalars(
          done, {**summary, **observe.stage_mean_p(state.params['drop_logits'], space.template)}
        )
        now = time.time()
        rate = len(pending) * batch_size / (now - last)
        _show_progress(done, run.total_steps, summary, rate, batch_size)
        pending, last = [], now
      if stop:
        with guard.finishing():  # a deadline on the stop waits for this save
          checkpointer.save(done, state)
          checkpointer.wait()
        raise Preempted(
          f'stopped by {guard.signal_name} after training step {done}; the checkpoint is '
          f'saved. Run the same command again to resume'
        )
  checkpointer.wait()
  logging.info('training done in %.0fs', time.time() - start)
  return state, space
