"""Candidate samplers (``search.sampler``): how candidate ``c``'s hard mask follows from the
search key, ``c`` and the learned drop probabilities (Alg. 1 line 8; docs/sampling.md).

Every sampler gives each channel a uniform ``u`` and keeps it iff ``u >= p``
(``masks.keep_where``), so each channel is dropped with probability ``p`` alone; samplers
differ only in how the uniforms of different candidates are coupled. Candidate ``c``'s mask
is a function of (search key, ``c``) alone, never of the other candidates drawn with it (the
chunk), of the devices or of the processes.

A sampler is a function ``draw(sampler, search_key, indices, drop_logits, template) ->
masks`` registered by name in ``DRAWS``; the config chooses it by that name
(``search.sampler``), ``from_config`` builds the ``Sampler``. It returns the masks packed
(``masks.unpack``): per group size, the masks of the groups of that size stacked, candidates
first (``[candidates, groups, channels]``), so that drawing D-121's 593 groups compiles a
handful of operations, not one per group.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pgnas_jax import masks as masks_lib
from pgnas_jax.errors import ConfigError

PyTree = Any
DEFAULT = 'iid'


def _iid(sampler, search_key, indices, drop_logits, template) -> dict:
  """Independent masks, candidate c from ``fold_in(search_key, c)``."""
  logits = masks_lib.pack_logits(drop_logits, template)

  def draw(c):
    u = masks_lib.packed_uniforms(jax.random.fold_in(search_key, c), template)
    return masks_lib.packed_keep_where(u, logits)

  return jax.vmap(draw)(indices)


def _antithetic(sampler, search_key, indices, drop_logits, template) -> dict:
  """Candidates 2k and 2k+1 share the uniforms of ``fold_in(search_key, k)``: 2k keeps
  where u >= p, 2k+1 where 1 - u >= p."""
  logits = masks_lib.pack_logits(drop_logits, template)

  def draw(c):
    u = masks_lib.packed_uniforms(jax.random.fold_in(search_key, c // 2), template)
    u = jax.tree.map(lambda x: jnp.where(c % 2 == 1, 1.0 - x, x), u)
    return masks_lib.packed_keep_where(u, logits)

  return jax.vmap(draw)(indices)


def _stratified(sampler, search_key, indices, drop_logits, template) -> dict:
  """Latin-hypercube per channel over blocks of B candidates. In block b = c // B, from
  ``fold_in(search_key, b)``, every position r = 0..B-1 of every channel gets 32 random bits;
  candidate c (position r) takes the stratum s = the rank of its bits among the block's
  (ties by position), so the B candidates of a block hold the strata 0..B-1 in a random
  order per channel, plus a jitter v: u = (s + v) / B."""
  size = sampler.block
  logits = masks_lib.pack_logits(drop_logits, template)

  def draw(c):
    position = c % size

    def leaf(k, channels):
      bits = jax.random.bits(jax.random.fold_in(k, 0), (size, channels))
      mine = bits[position]
      before = jnp.arange(size)[:, None] < position
      stratum = jnp.sum((bits < mine) | ((bits == mine) & before), axis=0)
      jitter = jax.random.uniform(
        jax.random.fold_in(jax.random.fold_in(k, 1), position), (channels,)
      )
      return (stratum.astype(jnp.float32) + jitter) / size

    u = masks_lib.packed_leaf_draws(jax.random.fold_in(search_key, c // size), template, leaf)
    return masks_lib.packed_keep_where(u, logits)

  return jax.vmap(draw)(indices)


def _mode(sampler, search_key, indices, drop_logits, template) -> dict:
  """The posterior mode, the same for every index: keep a channel iff p < 0.5."""
  logits = masks_lib.pack_logits(drop_logits, template)
  return {
    size: jnp.broadcast_to(
      (jax.nn.sigmoid(theta) < 0.5).astype(jnp.float32)[:, None],
      indices.shape + theta.shape + (size,),
    )
    for size, theta in logits.items()
  }


DRAWS = {'iid': _iid, 'antithetic': _antithetic, 'stratified': _stratified, 'mode': _mode}
NAMES = tuple(DRAWS)
ONE_CANDIDATE = ('mode',)  # samplers whose every candidate is the same


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A sampler by name, with its parameters; hashable, so jit takes it as a static argument."""

  name: str = DEFAULT
  block: int = 0  # candidates per block of 'stratified'; 0 for the others
  channel_multiple: int = 1  # channels kept or dropped together (search.channel_multiple)

  def packed(self, search_key, indices, drop_logits, template) -> dict:
    """The masks of candidates ``indices``, packed (``[candidates, groups, channels]`` per
    group size): what ``search.draw_candidates`` compiles."""
    drawn = DRAWS[self.name](self, search_key, indices, drop_logits, template)
    return drawn if self.channel_multiple == 1 else in_blocks(drawn, self.channel_multiple)

  def __call__(self, search_key, indices, drop_logits, template) -> PyTree:
    """The masks of candidates ``indices``, leaves with a leading candidate axis."""
    packed = self.packed(search_key, indices, drop_logits, template)
    return masks_lib.unpack(packed, template, leading=1)

  def num_candidates(self, requested: int) -> int:
    """How many distinct candidates there are to score: 1 for 'mode'."""
    return 1 if self.name in ONE_CANDIDATE else requested

  @property
  def id(self) -> str:
    """What of the sampler the candidates follow from, e.g. 'iid', 'stratified/16' or
    'iid x8' (channels in blocks of 8)."""
    name = f'{self.name}/{self.block}' if self.block else self.name
    return name if self.channel_multiple == 1 else f'{name} x{self.channel_multiple}'


def in_blocks(drawn: PyTree, multiple: int) -> PyTree:
  """Masks whose channels go in aligned blocks of ``multiple``: each block takes the draw
  of its first channel, so it is dropped with that channel's probability, whole."""

  def leaf(m):
    blocks = m.reshape(m.shape[:-1] + (m.shape[-1] // multiple, multiple))
    return jnp.repeat(blocks[..., :1], multiple, axis=-1).reshape(m.shape)

  return jax.tree.map(leaf, drawn)


IID = Sampler()


def from_config(search_config, channel_multiple) -> Sampler:
  """The sampler of ``search_config`` keeping channels in blocks of ``channel_multiple``
  (``targets.channel_multiple``: the field with ``'auto'`` resolved)."""
  name = search_config.sampler
  block = search_config.stratified_block if name == 'stratified' else 0
  return Sampler(name, block, channel_multiple)


def check_blocks(multiple: int, sizes: dict) -> None:
  """``ConfigError`` in one line unless ``multiple`` divides every group's channel count
  (``sizes``: group name -> channels)."""
  odd = {name: n for name, n in sizes.items() if n % multiple}
  if odd:
    name, n = next(iter(odd.items()))
    raise ConfigError(
      f'--config.search.channel_multiple={multiple} does not divide the {n} input channels '
      f'of group {name} ({len(odd)} of {len(sizes)} groups): use a divisor of every '
      "group's width, or 1"
    )
