"""Pixel values as the networks see them."""

import numpy as np


def normalise(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """uint8 pixels to float32, per channel to zero mean and unit deviation (``mean`` and
  ``std`` in [0, 1] units)."""
  return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
