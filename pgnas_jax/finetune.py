"""Fine-tuning one architecture (SPEC section 3, option): the super-network's weights trained
a few more steps under one fixed hard mask, starting from the inherited weights.

The loss is the training objective with the architecture fixed: cross-entropy of the masked
network plus the same weight-prior term over the architecture's own weights (drop logits
frozen, so no entropy term and no gradient to them). BatchNorm runs in training mode and
updates its running statistics.
Steps continue the training run's batch sequence (step ``first_step + i``), so every
architecture fine-tuned after the same run sees the same batches in the same order: an
identical fine-tuning. Kernel slices of dropped channels get no gradient (their inputs are
zero) and stay as they were, so the pruned export of a fine-tuned network is exact.
"""

import logging
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pgnas_jax import data as data_lib
from pgnas_jax import layers, objective, parallel, train
from pgnas_jax import space as space_lib
from pgnas_jax.errors import Preempted

PyTree = Any


@flax.struct.dataclass
class FinetuneState:
  step: jax.Array
  weights: PyTree
  batch_stats: PyTree
  opt_state: PyTree


class Finetuner:
  """``finetuner(variables, mask, drop_logits, key, first_step) -> variables``, or
  ``finetuner.tune(state, mask)`` after the training that left ``state``: compiled once for
  a super-network, reused for every architecture (the mask is an argument, not a
  constant)."""

  def __init__(
    self,
    model,
    config: ml_collections.ConfigDict,
    dataset: data_lib.Source,
    space: space_lib.SearchSpace,
    mesh,
  ):
    self._config, self._dataset, self._mesh = config, dataset, mesh
    self.space = space
    self.steps = config.finetune.steps
    schedule = optax.cosine_decay_schedule(config.finetune.learning_rate, max(self.steps, 1))
    self._tx = optax.sgd(schedule, momentum=config.train.momentum, nesterov=config.train.nesterov)
    template = space.template
    masked_loss = objective.make_masked_loss(model, template, config, learned=False)

    def loss_fn(weights, batch_stats, mask, drop_logits, batch, key):
      # the prior of the architecture's own weights: those of dropped channels are not in it
      loss, (_, _, batch_stats) = masked_loss(
        {'weights': weights, 'drop_logits': drop_logits},
        batch_stats,
        mask,
        batch,
        key,
        prior_weights=layers.mask_params(weights, template, mask),
      )
      return loss, batch_stats

    def step(state, mask, drop_logits, key, batch):
      (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.weights,
        state.batch_stats,
        mask,
        drop_logits,
        batch,
        jax.random.fold_in(key, state.step),
      )
      updates, opt_state = self._tx.update(grads, state.opt_state, state.weights)
      return state.replace(
        step=state.step + 1,
        weights=optax.apply_updates(state.weights, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
      ), loss

    replicated = parallel.replicated(mesh)
    self._step = jax.jit(
      step,
      in_shardings=(replicated,) * 4 + (parallel.batch_sharded(mesh),),
      out_shardings=(replicated, replicated),
      donate_argnums=0,
    )

  def __call__(
    self,
    variables: dict,
    mask: PyTree,
    drop_logits: PyTree,
    key: jax.Array,
    first_step: int,
    guard=None,
  ) -> dict:
    """With a ``checkpoint.PreemptionGuard``, a SIGTERM or Ctrl-C stops it within one step
    (raising Preempted: fine-tuning keeps no checkpoint, the next run starts it again)."""
    config = self._config
    state = parallel.put_replicated(
      FinetuneState(
        step=jnp.int32(0),
        weights=variables['params'],
        batch_stats=variables['batch_stats'],
        opt_state=self._tx.init(variables['params']),
      ),
      self._mesh,
    )
    mask, drop_logits, key = parallel.put_replicated((mask, drop_logits, key), self._mesh)
    batches = data_lib.train_batches(
      self._dataset,
      config.data,
      config.seed,
      range(first_step, first_step + self.steps),
      config.train.batch_size,
      self._mesh,
    )
    losses = []
    every, start = config.train.log_every_steps, time.time()
    for batch in batches:
      state, loss = self._step(state, mask, drop_logits, key, batch)
      losses.append(loss)
      done = len(losses)
      if done % every == 0 or done == self.steps:  # progress, as training shows it
        seconds = time.time() - start
        logging.info(
          'fine-tune step %d/%d  loss %.4f  eta %.0fs',
          done,
          self.steps,
          float(loss),
          seconds / done * (self.steps - done),
        )
      if guard is not None and parallel.any_process(guard.requested):
        raise Preempted(
          f'stopped by {guard.signal_name} at fine-tuning step {len(losses)} of '
          f'{self.steps}; training and the search are saved. Run the same command '
          f'again to resume (fine-tuning starts again)'
        )
    losses = np.asarray(jax.device_get(losses))
    train.check_finite(
      losses,
      1,
      'non-finite loss at fine-tuning step {step}; the trained '
      'super-network is untouched. Lower --config.finetune.learning_rate',
    )
    logging.info('fine-tuned %d steps: loss %.4f -> %.4f', len(losses), losses[0], losses[-1])
    return {'params': state.weights, 'batch_stats': state.batch_stats}

  def tune(self, state: train.TrainState, mask: PyTree, guard=None) -> dict:
    """The super-network trained into ``state`` fine-tuned under ``mask``, continuing the
    training run's batch sequence."""
    return self(
      state.variables, mask, state.drop_logits, state.key('finetune'), int(state.step), guard
    )
