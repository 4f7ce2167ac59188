"""Which examples are read when: the global batch of a training step follows from (seed,
step) alone, and each process reads its own contiguous rows of every global batch. Together
the processes' rows are the global batch, whatever the process count."""

import numpy as np

from pgnas_jax.errors import ConfigError


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return num_examples // batch_size


def global_batch(seed: int, step: int, num_examples: int, batch_size: int) -> tuple:
  """(epoch, position in the epoch, example indices of the global batch, sorted): each epoch
  is a fresh permutation drawn from (seed, epoch); the last partial batch is left out."""
  epoch, position = divmod(step, steps_per_epoch(num_examples, batch_size))
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return epoch, position, np.sort(order[position * batch_size : (position + 1) * batch_size])


def local_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """The rows of a global batch that process ``process_index`` of ``process_count`` reads."""
  if batch_size % process_count:
    raise ConfigError(
      f'a global batch of {batch_size} does not split over {process_count} '
      f'processes: use batch sizes divisible by the process count'
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f'process index {process_index} is not in [0, {process_count})')
  per_process = batch_size // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)
