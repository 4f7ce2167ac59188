"""Training the super-network: the train state, the jitted data-parallel ``train_step``
(weights and drop logits by one optimiser, Alg. 1 lines 1-6) and the training loop."""
import logging
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pgnas_jax import checkpoint as checkpoint_lib
from pgnas_jax import data as data_lib
from pgnas_jax import masks as masks_lib
from pgnas_jax import layers, metric_writers, objective, observe, optim, parallel, precision
from pgnas_jax import space as space_lib
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


def initialise(model, config: ml_collections.ConfigDict, image_shape: tuple,
               tx: optax.GradientTransformation, mesh) -> tuple:
  """(TrainState replicated on the mesh, SearchSpace)."""
  root_key = jax.random.key(config.seed)
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  variables = jax.jit(lambda k: model.init({'params': k}, dummy, train=False))(
      purpose_key(root_key, 'init'))
  space = space_lib.from_variables(variables)
  p0 = config.drop.random_p if config.drop.mode == 'random' else config.drop.init_p
  params = {'weights': variables['params'],
            'drop_logits': masks_lib.init_drop_logits(space.template, p0)}
  state = TrainState(step=jnp.int32(0), params=params, batch_stats=variables['batch_stats'],
                     opt_state=tx.init(params), root_key=root_key)
  return parallel.put_replicated(state, mesh), space


def make_loss_fn(model, space: space_lib.SearchSpace, config: ml_collections.ConfigDict):
  learned = config.drop.mode == 'learned'

  def loss_fn(params, batch_stats, batch, key):
    drop_logits = params['drop_logits']
    if not learned:
      drop_logits = jax.lax.stop_gradient(drop_logits)
    images = batch['images']
    masks = masks_lib.relaxed_masks(jax.random.fold_in(key, 0), drop_logits, space.template,
                                    images.shape[0], config.drop.tau)
    logits, updates = precision.apply(
        model, {'params': params['weights'], 'batch_stats': batch_stats, 'masks': masks},
        images, config.model.compute_dtype, train=True,
        rngs={'shake': jax.random.fold_in(key, 1)},
        mutable=['batch_stats', layers.AUXILIARY_LOGITS])
    auxiliary_logits = [a.astype(jnp.float32) for a in
                        jax.tree.leaves(updates.get(layers.AUXILIARY_LOGITS, {}))]
    loss, parts = objective.negative_elbo(logits, batch['labels'], params['weights'],
                                          drop_logits, space.template, config.objective,
                                          learned, auxiliary_logits)
    return loss, (parts, logits, updates['batch_stats'])

  return loss_fn


def mean_drop_probability(drop_logits: PyTree, template: PyTree) -> jax.Array:
  """Expected share of searchable channels dropped."""
  p = jax.tree.leaves(masks_lib.drop_probabilities(drop_logits))
  sizes = [m.shape[-1] for m in jax.tree.leaves(template)]
  return sum(q * n for q, n in zip(p, sizes)) / sum(sizes)


def make_train_step(model, space: space_lib.SearchSpace, config: ml_collections.ConfigDict,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh) -> Callable:
  """``train_step(state, batch) -> (state, metrics)``, jitted over the mesh: state
  replicated, batch sharded over 'data', the state donated."""
  loss_fn = make_loss_fn(model, space, config)

  def train_step(state: TrainState, batch: dict):
    key = jax.random.fold_in(purpose_key(state.root_key, 'train'), state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (parts, logits, batch_stats)), grads = grad_fn(state.params, state.batch_stats,
                                                          batch, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        'loss': loss, **parts._asdict(), 'grad_norm': optax.tree.norm(grads),
        'train_accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['labels']),
        'learning_rate': schedule(state.step),
        'mean_p': mean_drop_probability(state.params['drop_logits'], space.template),
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics

  replicated = parallel.replicated(mesh)
  return jax.jit(train_step, in_shardings=(replicated, parallel.batch_sharded(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


class TrainSetup(NamedTuple):
  total_steps: int
  steps_per_epoch: int
  schedule: optax.Schedule
  tx: optax.GradientTransformation


def setup(config: ml_collections.ConfigDict, dataset: data_lib.Source) -> TrainSetup:
  per_epoch = data_lib.steps_per_epoch(dataset, config.train.batch_size)
  if per_epoch == 0:
    raise ConfigError(f'--config.train.batch_size={config.train.batch_size} is larger than the '
                     f'{data_lib.num_examples(dataset.train)} training images')
  total = (config.train.num_steps if config.train.num_steps > 0
           else int(round(config.train.num_epochs * per_epoch)))
  schedule = optim.learning_rate_schedule(config.train, total, per_epoch)
  return TrainSetup(total, per_epoch, schedule, optim.make_optimizer(config, schedule))


def _check_finite(pending: list, first_step: int) -> None:
  """Raises on the first step among ``pending`` whose loss or gradient is not finite (steps
  counted from 1). The gradient is checked too: a NaN input can leave the loss finite (ReLU
  maps NaN to 0 on XLA:CPU) and still poison the update."""
  values = np.asarray(jax.device_get([(m['loss'], m['grad_norm']) for m in pending]))
  bad = np.flatnonzero(~np.all(np.isfinite(values), axis=1))
  if bad.size:
    raise NonFiniteLossError(
        f'non-finite loss or gradient at training step {first_step + int(bad[0])} (counting '
        f'from 1); the '
        f'checkpoints before it are intact. Lower --config.train.learning_rate or check the '
        f'data, then rerun with --start_over')


def train(model, config: ml_collections.ConfigDict, dataset: data_lib.Source, workdir: str,
          mesh, checkpointer: checkpoint_lib.Checkpointer,
          guard: checkpoint_lib.PreemptionGuard) -> tuple:
  """Trains to the end, resuming from the newest checkpoint in the workdir; writes
  ``metrics.jsonl`` (and TensorBoard's ``tensorboard/train/``, profiler traces on request)
  and checkpoints. Returns (state, search space)."""
  run = setup(config, dataset)
  state, space = initialise(model, config, data_lib.image_shape(dataset), run.tx, mesh)
  logging.info('%s', observe.parameter_overview(state.params['weights'], space.template))
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state = restored
    logging.info('resuming from the checkpoint at step %d', int(state.step))
  first = int(state.step)
  if first >= run.total_steps:
    return state, space
  train_step = make_train_step(model, space, config, run.tx, run.schedule, mesh)
  batch_size = config.train.batch_size
  logging.info('training: %d steps (%.2f epochs of %d images), %d searchable groups, '
               '%d channels, %d devices in %d processes', run.total_steps,
               run.total_steps / run.steps_per_epoch, data_lib.num_examples(dataset.train),
               space.num_groups, space.num_channels, mesh.devices.size, jax.process_count())
  pending, start, last = [], time.time(), time.time()
  profiler = observe.StepProfiler(os.path.join(workdir, 'profile'), config.log.profile_steps,
                                  run.total_steps, enabled=parallel.is_main_process())
  with metric_writers.for_training(workdir, first, config.log) as writer, profiler:
    # this process's rows of each step's batch, read ahead in the background, placed ahead
    batches = parallel.prefetch_to_mesh(data_lib.in_background(
        data_lib.train_batch(dataset, config.data, config.seed, step, batch_size,
                             jax.process_index(), jax.process_count())
        for step in range(first, run.total_steps)), mesh)
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
      if save_now:
        checkpointer.save(done, state)
      if log_now:
        host = jax.device_get(pending)
        summary = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        writer.write_scalars(done, {**summary, **observe.stage_mean_p(state.params['drop_logits'],
                                                                      space.template)})
        now = time.time()
        rate = len(pending) * batch_size / (now - last)
        logging.info('train step %d/%d  loss %.4f  nll %.4f  acc %.3f  mean p %.3f  '
                     'lr %.4f  %.0f img/s  eta %.0fs', done, run.total_steps,
                     summary['loss'], summary['nll'], summary['train_accuracy'],
                     summary['mean_p'], summary['learning_rate'], rate,
                     (run.total_steps - done) * batch_size / rate)
        pending, last = [], now
      if stop:
        checkpointer.wait()
        raise Preempted(f'stopped by SIGTERM after training step {done}; the checkpoint is '
                        f'saved. Run the same command again to resume')
  checkpointer.wait()
  logging.info('training done in %.0fs', time.time() - start)
  return state, space
