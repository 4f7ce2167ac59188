"""Mixed precision: the super-network computes in ``model.compute_dtype`` while parameters,
optimiser state, BatchNorm statistics, drop logits, masks and the loss stay float32.

``apply`` casts the floating-point parameters and the images to the compute dtype, runs the
model and returns float32 logits. Gradients flow back through the casts to the float32
parameters. BatchNorm takes its batch statistics in float32 whatever the compute dtype (flax
reduces in float32) and keeps its running statistics in float32.
"""

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def cast_floats(tree: PyTree, dtype) -> PyTree:
  """Floating-point leaves cast to ``dtype``; integer leaves (pruned-channel indices) kept."""
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


def apply(model, variables: dict, images: jax.Array, compute_dtype: str, **kwargs):
  """``model.apply`` in the compute dtype. Only ``params`` are cast: masks are cast where
  they multiply activations, running BatchNorm statistics stay float32. Logits (and, with
  ``mutable``, the auxiliary logits sown in training) come back as float32."""
  dtype = DTYPES[compute_dtype]
  if dtype != jnp.float32:
    variables = {**variables, 'params': cast_floats(variables['params'], dtype)}
    images = images.astype(dtype)
  out = model.apply(variables, images, **kwargs)
  if dtype == jnp.float32:
    return out
  if kwargs.get('mutable'):
    logits, updates = out
    return logits.astype(jnp.float32), updates
  return out.astype(jnp.float32)
