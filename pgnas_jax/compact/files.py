"""The compact network as files that run without pgnas_jax (issue 15).

``<name>.npz``: its weights, one array per '/'-joined path (NumPy alone reads them).
``<name>.stablehlo``: its inference function ``f(weights, images) -> logits`` serialised with
``jax.export`` (StableHLO, batch size symbolic, float32 images of the run's shape). Run it
with jax alone:

    import jax, numpy as np
    f = jax.export.deserialize(open('winner_compact.stablehlo', 'rb').read())
    logits = f.call(dict(np.load('winner_compact.npz')), images)  # images [B, H, W, C]
"""

import os

import jax
import numpy as np

from pgnas_jax import compact

PLATFORMS = ('cpu', 'cuda', 'tpu')  # lowered for each, so the file runs on any of them


def flat_weights(net: compact.CompactNet) -> dict:
  return {k: np.asarray(v) for k, v in net.weights.items()}


def exported(net: compact.CompactNet) -> jax.export.Exported:
  logits = compact.inference_fn(net)
  (batch,) = jax.export.symbolic_shape('batch')
  weights = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), flat_weights(net))
  images = jax.ShapeDtypeStruct((batch,) + net.image_shape, np.float32)
  return jax.export.export(jax.jit(logits), platforms=PLATFORMS)(weights, images)


def _write(path: str, data: bytes) -> None:
  """Written to a temporary file and renamed, so a kill never leaves half a file."""
  with open(path + '.tmp', 'wb') as f:
    f.write(data)
  os.replace(path + '.tmp', path)


def save(net: compact.CompactNet, folder: str, name: str) -> dict:
  """Writes ``<name>.npz`` and ``<name>.stablehlo`` in ``folder``; returns their names."""
  weights = os.path.join(folder, name + '.npz')
  with open(weights + '.tmp', 'wb') as f:
    np.savez(f, **flat_weights(net))
  os.replace(weights + '.tmp', weights)
  _write(os.path.join(folder, name + '.stablehlo'), exported(net).serialize())
  return {'weights': name + '.npz', 'stablehlo': name + '.stablehlo'}
