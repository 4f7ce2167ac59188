"""Pixel values as the networks see them."""

import numpy as np


def statistics(images: np.ndarray) -> tuple:
  """(mean, std) per channel of ``images`` (uint8 0 to 255, or float on that scale) in [0, 1]
  units, as float32; summed in float64, so float images of any finite scale do not
  overflow."""
  flat = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
  return flat.mean(0).astype(np.float32), flat.std(0).astype(np.float32)


def normalise(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """uint8 pixels to float32, per channel to zero mean and unit deviation (``mean`` and
  ``std`` in [0, 1] units)."""
  return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
