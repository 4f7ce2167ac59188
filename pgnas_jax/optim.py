"""The optimiser of weights and drop logits, and the learning-rate schedules (SPEC section 6)."""

import ml_collections
import optax


def learning_rate_schedule(
  train: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int
) -> optax.Schedule:
  lr = train.learning_rate
  if train.schedule == 'cosine':  # no restart, to zero at the last step
    return optax.cosine_decay_schedule(lr, max(total_steps, 1))
  if train.schedule == 'step':
    boundaries = {int(e * steps_per_epoch): 1.0 / train.step_factor for e in train.step_epochs}
    return optax.piecewise_constant_schedule(lr, boundaries)
  if train.schedule == 'sgdr':  # cosine with warm restarts, periods T0, T0*Tmul, ...
    lengths, period = [], train.sgdr_t0_epochs * steps_per_epoch
    while sum(lengths) < total_steps:
      lengths.append(max(int(round(period)), 1))
      period *= train.sgdr_t_mul
    cycles = [optax.cosine_decay_schedule(lr, n, alpha=train.sgdr_min_lr / lr) for n in lengths]
    boundaries = [sum(lengths[: i + 1]) for i in range(len(lengths) - 1)]
    return optax.join_schedules(cycles, boundaries)
  raise ValueError(f'unknown train.schedule {train.schedule!r}')


def make_optimizer(
  config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """One optimiser over {'weights', 'drop_logits'}: SGD (Nesterov) on both; the logits get
  their own learning-rate multiplier, and no update at all in the 'random' ablation."""

  def sgd(scale):
    return optax.sgd(
      lambda step: scale * schedule(step),
      momentum=config.train.momentum,
      nesterov=config.train.nesterov,
    )

  if config.drop.mode == 'random':
    logits_tx = optax.set_to_zero()
  else:
    logits_tx = sgd(config.drop.logit_lr_multiplier)
  return optax.multi_transform(
    {'weights': sgd(1.0), 'drop_logits': logits_tx},
    {'weights': 'weights', 'drop_logits': 'drop_logits'},
  )
