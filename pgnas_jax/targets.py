"""Cost targets that steer training (SPEC section 7): the expected params and FLOPs of the
posterior, and the projection that holds them under a ceiling that falls from the initial
posterior's cost to the target over the first ``objective.target_ramp`` of training.

``Targets`` is built once per run from the config and the search space; with no target set
``from_config`` gives None and training is the paper's, untouched.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pgnas_jax import budget, masks
from pgnas_jax import space as space_lib
from pgnas_jax.errors import ConfigError

PyTree = Any
KINDS = ('params', 'flops')  # a target's name is objective.target_<kind>
BISECTION = (64.0, 48)  # largest logit shift, halvings: 64 / 2**48 is below float32's step


class Cost(NamedTuple):
  """One cost of the space (params or MACs) as a function of the drop probabilities."""

  kind: str
  fixed: float  # F: what no candidate can remove
  per_group: np.ndarray  # |g| c_g, in flattening order of the groups
  full: float  # every channel kept
  target: float  # T, a count
  start: float  # E_0, the initial posterior's expected cost

  def expected(self, drop_logits: PyTree) -> jax.Array:
    """E[C] = F + sum_g |g| c_g (1 - p_g)."""
    p = jax.nn.sigmoid(jnp.stack(jax.tree.leaves(drop_logits)))
    return self.fixed + jnp.sum(jnp.asarray(self.per_group, jnp.float32) * (1.0 - p))

  def ceiling(self, step: jax.Array, ramp_steps: float) -> jax.Array:
    """T_t: from E_0 at step 0 to T at ``ramp_steps``, then T."""
    done = jnp.minimum(1.0, step.astype(jnp.float32) / max(ramp_steps, 1.0))
    return self.start + (self.target - self.start) * done


class Targets(NamedTuple):
  costs: tuple  # of Cost, those with a target
  ramp_steps: float

  def project(self, drop_logits: PyTree, step: jax.Array) -> tuple:
    """(logits shifted by the smallest b >= 0 that puts every expected cost at or under its
    ceiling at ``step``, metrics: each cost's expected value and ceiling as shares of the
    full super-network, and ``target_shift`` b)."""
    shift = jnp.float32(0.0)
    metrics = {}
    for cost in self.costs:
      ceiling = cost.ceiling(step, self.ramp_steps)
      shift = jnp.maximum(shift, _shift_to(cost, drop_logits, ceiling))
      metrics[f'target_{cost.kind}'] = ceiling / cost.full
    shifted = jax.tree.map(lambda t: t + shift, drop_logits)
    for cost in self.costs:
      metrics[f'expected_{cost.kind}'] = cost.expected(shifted) / cost.full
    return shifted, {**metrics, 'target_shift': shift}


def _shift_to(cost: Cost, drop_logits: PyTree, ceiling: jax.Array) -> jax.Array:
  """The smallest b >= 0 with E[C](theta + b) <= ceiling, by bisection (E[C] falls in b)."""
  top, halvings = BISECTION

  def over(b):
    return cost.expected(jax.tree.map(lambda t: t + b, drop_logits)) > ceiling

  def halve(_, bounds):
    low, high = bounds
    middle = 0.5 * (low + high)
    return jnp.where(over(middle), middle, low), jnp.where(over(middle), high, middle)

  _, high = jax.lax.fori_loop(0, halvings, halve, (jnp.float32(0.0), jnp.float32(top)))
  return jnp.where(over(jnp.float32(0.0)), high, 0.0)


def from_config(config, space: space_lib.SearchSpace, total_steps: int) -> Targets | None:
  """The run's targets, checked against the space (``ConfigError`` in one line); None
  without any."""
  wanted = [k for k in KINDS if config.objective[f'target_{k}']]
  if not wanted:
    return None
  if config.drop.mode != 'learned':
    raise ConfigError(
      f'--config.objective.target_{wanted[0]} steers the drop logits, which '
      "drop.mode='random' freezes: use one or the other"
    )
  per_channel = np.stack([np.asarray(c, np.float64) for c in jax.tree.leaves(space.channel_costs)])
  sizes = np.asarray(masks.channel_counts(space.template), np.float64)
  fixed = {'params': space.fixed_params, 'flops': space.fixed_macs}
  costs = []
  for column, kind in enumerate(KINDS):
    if kind not in wanted:
      continue
    per_group = sizes * per_channel[:, column]
    full = fixed[kind] + per_group.sum()
    target = budget.resolve(config.objective[f'target_{kind}'], int(full))
    if target <= fixed[kind]:
      raise ConfigError(
        f'--config.objective.target_{kind}={config.objective[f"target_{kind}"]!r} asks for '
        f'{target:,} {kind}, but the layers no search can remove already have '
        f'{fixed[kind]:,} (of {int(full):,}): ask for more'
      )
    start = fixed[kind] + (1.0 - config.drop.init_p) * per_group.sum()
    costs.append(Cost(kind, float(fixed[kind]), per_group, float(full), float(target), start))
  return Targets(tuple(costs), config.objective.target_ramp * total_steps)
