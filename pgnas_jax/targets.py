"""Cost targets that steer training (SPEC section 7): the expected params, FLOPs and
predicted latency of the posterior, and the projection that holds them under a ceiling that
falls from the initial posterior's cost to the target over the first
``objective.target_ramp`` of training.

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
KINDS = ('params', 'flops', 'latency')
FIELDS = dict(zip(KINDS, ('target_params', 'target_flops', 'target_latency_ms')))  # objective.*
BISECTION = (64.0, 48)  # largest logit shift, halvings: 64 / 2**48 is below float32's step
# search.channel_multiple='auto' with a target: float32 lanes of an AVX-512 vector (two of
# AVX2's); narrower kept widths run at a fraction of their MACs' rate (docs/targets.md)
AUTO_MULTIPLE = 16


class Cost(NamedTuple):
  """One cost of the space (params, MACs or predicted milliseconds) as a function of the
  drop probabilities."""

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


def steered(config) -> bool:
  """Whether the config sets a target."""
  return any(config.objective[field] for field in FIELDS.values())


def requested_multiple(config) -> int | str:
  """``search.channel_multiple`` as far as the config alone says: ``'auto'`` is 1 without
  a target (the paper's search); with one it stays ``'auto'`` (``channel_multiple``)."""
  requested = config.search.channel_multiple
  return 1 if requested == 'auto' and not steered(config) else requested


def channel_multiple(config, template: PyTree) -> int:
  """``search.channel_multiple`` as a number for the network of mask ``template``:
  ``'auto'`` is 1 without a target (the paper's search) and with one the largest of
  ``AUTO_MULTIPLE``, its halves and 1 that divides every group's width, so that a target's
  saving is realised: on this project's CPU a convolution below 16 channels costs nearly
  what a 16-channel one does (docs/targets.md)."""
  requested = requested_multiple(config)
  if requested != 'auto':
    return requested
  widths = masks.channel_counts(template)
  multiple = AUTO_MULTIPLE
  while any(width % multiple for width in widths):
    multiple //= 2
  return multiple


def from_config(
  config, space: space_lib.SearchSpace, total_steps: int, latency=None
) -> Targets | None:
  """The run's targets, checked against the space (``ConfigError`` in one line); None
  without any. ``latency``: the run's ``latency_table.Table``, needed by a latency target."""
  wanted = [k for k in KINDS if config.objective[FIELDS[k]]]
  if not wanted:
    return None
  if config.drop.mode != 'learned':
    raise ConfigError(
      f'--config.objective.{FIELDS[wanted[0]]} steers the drop logits, which '
      "drop.mode='random' freezes: use one or the other"
    )
  costs = [_cost(kind, config, space, latency) for kind in wanted]
  return Targets(tuple(costs), config.objective.target_ramp * total_steps)


def _cost(kind: str, config, space: space_lib.SearchSpace, latency) -> Cost:
  sizes = np.asarray(masks.channel_counts(space.template), np.float64)
  value = config.objective[FIELDS[kind]]
  if kind == 'latency':
    per_group = sizes * np.asarray(latency.channel_ms, np.float64)
    full = float(latency.full_ms)
    fixed, target = full - per_group.sum(), budget.resolve_ms(value, full)
    floor = max(fixed, latency.smallest_ms)
    if target <= floor:
      raise ConfigError(
        f'--config.objective.target_latency_ms={value!r} asks for {target:.3f} ms at '
        f'{latency.batch} images, but the smallest candidate is predicted at {floor:.3f} ms '
        f'(the full network: {full:.3f} ms, on {latency.device}): ask for more'
      )
  else:
    column = KINDS.index(kind)
    per_channel = np.stack(
      [np.asarray(c, np.float64) for c in jax.tree.leaves(space.channel_costs)]
    )
    per_group = sizes * per_channel[:, column]
    fixed = {'params': space.fixed_params, 'flops': space.fixed_macs}[kind]
    full = fixed + per_group.sum()
    target = budget.resolve(value, int(full))
    if target <= fixed:
      raise ConfigError(
        f'--config.objective.{FIELDS[kind]}={value!r} asks for {target:,} {kind}, but the '
        f'layers no search can remove already have {fixed:,} (of {int(full):,}): ask for more'
      )
  start = fixed + (1.0 - config.drop.init_p) * per_group.sum()
  return Cost(kind, float(fixed), per_group, float(full), float(target), float(start))
