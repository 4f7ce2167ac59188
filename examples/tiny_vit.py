"""A small vision transformer made searchable: its attention heads and MLP hidden units.

Patches of ``patch_size`` pixels become ``width``-wide tokens (a strided ``pgnas_jax.Conv``)
with a learned position embedding; each of ``depth`` pre-norm blocks is a
``SearchableAttention`` (the search keeps or drops each head whole) and an MLP whose hidden
units the search keeps or drops (they are the input features of the ``SearchableDense``
that reads them), both with residual adds; the classifier reads the mean token. No
BatchNorm, so ``train`` changes nothing.
"""

import flax.linen as nn
import jax.numpy as jnp

import pgnas_jax


class TinyViT(nn.Module):
  num_classes: int
  patch_size: int = 4
  width: int = 32  # features of a token
  depth: int = 2  # blocks
  num_heads: int = 4  # of width // num_heads features each
  mlp_ratio: int = 2  # hidden units per token feature

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = pgnas_jax.Conv(self.width, self.patch_size, strides=self.patch_size, name='patches')(x)
    tokens = x.reshape(x.shape[0], -1, self.width)
    tokens = tokens + self.param('position', nn.initializers.normal(0.02), tokens.shape[1:])
    for i in range(self.depth):
      attention = pgnas_jax.SearchableAttention(
        self.num_heads, self.width // self.num_heads, name=f'block{i}_attention'
      )
      tokens = tokens + attention(nn.LayerNorm(name=f'block{i}_norm0')(tokens))
      hidden = pgnas_jax.Dense(self.width * self.mlp_ratio, name=f'block{i}_mlp_in')(
        nn.LayerNorm(name=f'block{i}_norm1')(tokens)
      )
      tokens = tokens + pgnas_jax.SearchableDense(self.width, name=f'block{i}_mlp_out')(
        nn.gelu(hidden)
      )
    return pgnas_jax.Dense(self.num_classes, name='head')(
      jnp.mean(nn.LayerNorm(name='norm')(tokens), axis=1)
    )
