"""The run's random generator (``rng.impl``): which JAX PRNG implementations a run may use,
and why the others are refused.

Every key a run derives comes from one root key, ``jax.random.key(seed, impl=rng.impl)``
(``train.initialise``); ``fold_in`` keeps the implementation, so the choice reaches every
draw. An implementation is offered when the project's guarantees hold for it: candidate
``c``'s mask depends only on (search key, ``c``), whatever the chunk size, device count or
process count, and a resumed run is bitwise the uninterrupted one (tests/test_masks.py,
tests/test_train.py, tests/test_samplers.py; docs/sampling.md). Philox runs on one device
only: there the guarantees hold, on several devices its draws do not compile.
"""

import jax

DEFAULT = 'threefry2x32'
IMPLEMENTATIONS = ('threefry2x32', 'threefry4x32', 'philox2x32', 'philox4x32')

# Masks draw the leaves of one size together, vmap over their keys, and candidates of a chunk
# vmap over theirs; lax.rng_bit_generator's batching rule draws a whole batch from the first
# key of the batch, so under these implementations a mask would follow from its neighbours.
_FIRST_KEY_ONLY = (
  'under jax.vmap over keys it draws every key from the first key of the batch '
  "(lax.rng_bit_generator's batching rule), so candidate masks would change with the chunk "
  f'size; use one of {", ".join(IMPLEMENTATIONS)} (docs/sampling.md)'
)
REFUSED = {'rbg': _FIRST_KEY_ONLY, 'unsafe_rbg': _FIRST_KEY_ONLY}

# Philox's rounds use lax.mulhi, which XLA (jax 0.10.2, CPU) fails to compile in any program
# placed on several devices ("Unable to convert MHLO to StableHLO"), even a replicated one.
_NO_MULTI_DEVICE = (
  'XLA cannot compile its draws (lax.mulhi) on several devices; run on one device, or use '
  'threefry2x32 or threefry4x32 (docs/sampling.md)'
)
ONE_DEVICE_ONLY = {'philox2x32': _NO_MULTI_DEVICE, 'philox4x32': _NO_MULTI_DEVICE}


def root_key(seed: int, impl: str = DEFAULT) -> jax.Array:
  """The key every other key of a run is folded from."""
  return jax.random.key(seed, impl=impl)


def impl_name(key: jax.Array) -> str:
  """The implementation of a typed key, e.g. 'threefry2x32'."""
  return str(jax.random.key_impl(key))
