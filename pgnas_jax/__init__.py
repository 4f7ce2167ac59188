"""pgnas_jax's public surface (docs/library.md): make a Flax linen module's convs and dense
layers searchable with ``SearchableConv`` and ``SearchableDense`` and search it on your data
with ``search_network``."""

from pgnas_jax.data.arrays import from_arrays
from pgnas_jax.layers import Conv, Dense, SearchableConv, SearchableDense, batch_norm

__all__ = [
  'Conv',
  'Dense',
  'SearchableConv',
  'SearchableDense',
  'batch_norm',
  'from_arrays',
  'search_network',
]


def __getattr__(name: str):
  # Imported on first use: the pipeline imports every module of the package, and importing
  # any one of them runs this file first.
  if name == 'search_network':
    from pgnas_jax.pipeline import search_network

    return search_network
  raise AttributeError(f'module pgnas_jax has no attribute {name!r}')
