"""pgnas_jax's public surface (docs/library.md): make a Flax linen module's convs searchable
with ``SearchableConv`` and search it on your data with ``search_network``."""

from pgnas_jax.data.arrays import from_arrays
from pgnas_jax.layers import Conv, Dense, SearchableConv, batch_norm

__all__ = ['Conv', 'Dense', 'SearchableConv', 'batch_norm', 'from_arrays', 'search_network']


def __getattr__(name: str):
  # Imported on first use: importing pgnas_jax.main here would make `python -m
  # pgnas_jax.main` (and .export) warn that the module ran after being imported.
  if name == 'search_network':
    from pgnas_jax.main import search_network

    return search_network
  raise AttributeError(f'module pgnas_jax has no attribute {name!r}')
