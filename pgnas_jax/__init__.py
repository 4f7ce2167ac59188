"""pgnas_jax's public surface (docs/library.md): make a Flax linen module's convs and dense
layers searchable with ``SearchableConv`` and ``SearchableDense`` (an NNX module's with
``pgnas_jax.nnx.SearchableConv`` and ``.SearchableDense``, passed as ``from_nnx(Class,
**kwargs)``) and search it on your data with ``search_network``."""

from pgnas_jax.data.arrays import from_arrays
from pgnas_jax.layers import (
  Conv,
  Dense,
  SearchableAttention,
  SearchableConv,
  SearchableDense,
  batch_norm,
)

__all__ = [
  'Conv',
  'Dense',
  'SearchableAttention',
  'SearchableConv',
  'SearchableDense',
  'batch_norm',
  'from_arrays',
  'from_nnx',
  'nnx',
  'search_network',
]


def __getattr__(name: str):
  # Imported on first use: the pipeline imports every module of the package, and importing
  # any one of them runs this file first.
  if name == 'search_network':
    from pgnas_jax.pipeline import search_network

    return search_network
  if name == 'nnx':
    from pgnas_jax import nnx_layers

    return nnx_layers
  if name == 'from_nnx':
    from pgnas_jax.supernets.nnx_bridge import from_nnx

    return from_nnx
  raise AttributeError(f'module pgnas_jax has no attribute {name!r}')
