"""Size and compute budgets of the search (``search.max_params``, ``search.max_flops``):
what a config value means, whether a candidate fits, and the one-line answer when none
does. Every candidate is scored and recorded whatever the budget; the budget only narrows
the choice, so a run may be resumed with another one (its scored candidates are reused)."""

import re
from typing import NamedTuple

from pgnas_jax import records as records_lib
from pgnas_jax.errors import BudgetError

_PERCENT = re.compile(r'^\s*(\d+(\.\d*)?|\.\d+)\s*%\s*$')


def is_valid(value) -> bool:
  """0 (no budget), a whole number >= 1 (int, or a float such as 1e6), a share in (0, 1]
  (a float) or a percentage string in (0%, 100%], e.g. '50%'."""
  if type(value) is int:
    return value >= 0
  if type(value) is float:
    return 0.0 < value <= 1.0 or (value > 1.0 and value.is_integer())
  if type(value) is str:
    match = _PERCENT.match(value)
    return bool(match) and 0.0 < float(match.group(1)) <= 100.0
  return False


RULE = (
  '0 (no budget), a whole number (e.g. 100000 or 1e5), a share of the full '
  "super-network in (0, 1] (e.g. 0.5) or a percentage string (e.g. '50%')"
)


def is_valid_ms(value) -> bool:
  """0 (none), a positive number of milliseconds, or a percentage string in (0%, 100%]."""
  if type(value) in (int, float):
    return value >= 0 and value == value and value != float('inf')
  return type(value) is str and is_valid(value)


RULE_MS = (
  "0 (none), milliseconds (e.g. 40.0) or a share of the full network's measured latency "
  "as a percentage string (e.g. '50%')"
)


def resolve_ms(value, full_ms: float) -> float | None:
  """The latency a valid config ``value`` means when the full network takes ``full_ms``."""
  if type(value) is str:
    return full_ms * float(_PERCENT.match(value).group(1)) / 100.0
  return float(value) or None


def resolve(value, full: int) -> int | None:
  """The budget a valid config ``value`` means for a super-network of ``full`` params or
  FLOPs: None for no budget, else the largest count that fits."""
  if type(value) is str:
    return int(full * float(_PERCENT.match(value).group(1)) / 100.0)
  if type(value) is float and value <= 1.0:
    return int(full * value)
  return int(value) or None


class Budget(NamedTuple):
  """Largest params, FLOPs and predicted latency a candidate may have; None: no limit."""

  max_params: int | None = None
  max_flops: int | None = None
  max_latency_ms: float | None = None

  @classmethod
  def from_config(
    cls, config, full_params: int, full_flops: int, full_ms: float | None = None
  ) -> 'Budget':
    """``search.max_params`` / ``max_flops`` / ``max_latency_ms``; where one is 0, the
    objective's target of the same cost (SPEC section 7), so a target-steered run's winner
    fits its target. ``full_ms``: the full network's measured latency, for a share."""
    search, objective = config.search, config.objective
    latency = search.max_latency_ms or objective.target_latency_ms
    return cls(
      resolve(search.max_params or objective.target_params, full_params),
      resolve(search.max_flops or objective.target_flops, full_flops),
      resolve_ms(latency, full_ms) if latency and full_ms is not None else None,
    )

  def fits(self, record: dict) -> bool:
    """Within every limit; a latency limit needs the record's prediction (``latency_ms``)."""
    return (
      (self.max_params is None or record['params'] <= self.max_params)
      and (self.max_flops is None or record['flops'] <= self.max_flops)
      and (
        self.max_latency_ms is None or record.get('latency_ms', float('inf')) <= self.max_latency_ms
      )
    )

  def describe(self) -> str:
    limits = [
      f'{name} <= {v:,}'
      for name, v in (('params', self.max_params), ('FLOPs', self.max_flops))
      if v is not None
    ]
    if self.max_latency_ms is not None:
      limits.append(f'predicted latency <= {self.max_latency_ms:.3f} ms')
    return ' and '.join(limits) or 'no budget'

  def as_dict(self) -> dict:
    """As arch.json and pareto.json hold it; a latency limit only where there is one."""
    limits = {'max_params': self.max_params, 'max_flops': self.max_flops}
    if self.max_latency_ms is not None:
      limits['max_latency_ms'] = self.max_latency_ms
    return limits


UNLIMITED = Budget()


def mark(records: list, budget: Budget) -> list:
  """``records`` with ``fits`` set for ``budget``."""
  return [records_lib.amend(r, fits=budget.fits(r)) for r in records]


def fitting(records: list, budget: Budget) -> list:
  """The records that fit ``budget``; BudgetError with what to change when none does."""
  fit = [r for r in records if budget.fits(r)]
  if not fit:
    raise BudgetError(none_fits_message(records, budget))
  return fit


def none_fits_message(records: list, budget: Budget) -> str:
  smallest_params = min(r['params'] for r in records)
  smallest_flops = min(r['flops'] for r in records)
  fastest = min((r['latency_ms'] for r in records if 'latency_ms' in r), default=None)
  fastest = '' if fastest is None else f', the fastest is predicted at {fastest:.3f} ms'
  return (
    f'none of the {len(records)} scored candidates fits the budget ({budget.describe()}):'
    f' the smallest has {smallest_params:,} params, the cheapest {smallest_flops:,} '
    f'FLOPs{fastest}. Rerun with a larger search.max_params / search.max_flops / '
    f'search.max_latency_ms (the scored '
    f'candidates in search/candidates.jsonl are reused), or start over (--start_over) '
    f'with more candidates (search.num_candidates) or a larger '
    f'objective.weight_prior_l2 so that more channels drop'
  )
