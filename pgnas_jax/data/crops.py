"""Crops of images of any size to a square network input: the random-resized crop of
training (Inception's "distorted bounding box": 8% to 100% of the area, aspect ratio 3/4 to
4/3) and the resize + centre crop of evaluation. Each crop is one PIL resampling of a box of
the original image (bilinear, antialiased when it shrinks)."""

import math

import numpy as np
from PIL import Image

AREA = (0.08, 1.0)
ASPECT = (3 / 4, 4 / 3)
ATTEMPTS = 10
# evaluation resizes the shorter side to this multiple of the crop (256 for a 224 crop)
EVAL_RESIZE = 256 / 224


def _resample(image: np.ndarray, box: tuple, size: int) -> np.ndarray:
  """The ``box`` (left, top, right, bottom; floats) of ``image`` resized to size x size."""
  out = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, box=box)
  return np.asarray(out)


def random_box(height: int, width: int, rng: np.random.Generator) -> tuple:
  """(left, top, right, bottom) of a random crop covering a uniform share of ``AREA`` of the
  image with a log-uniform aspect ratio in ``ASPECT``; after ``ATTEMPTS`` draws that do not
  fit, the largest centred box whose aspect ratio is within ``ASPECT``."""
  log_aspect = (math.log(ASPECT[0]), math.log(ASPECT[1]))
  for _ in range(ATTEMPTS):
    area = height * width * rng.uniform(*AREA)
    aspect = math.exp(rng.uniform(*log_aspect))
    w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < w <= width and 0 < h <= height:
      top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  aspect = min(max(width / height, ASPECT[0]), ASPECT[1])
  w, h = min(width, round(height * aspect)), min(height, round(width / aspect))
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 [size, size, c]: a ``random_box`` of ``image`` (uint8 [h, w, c]) resized."""
  return _resample(image, random_box(image.shape[0], image.shape[1], rng), size)


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [size, size, c]: the centre size x size of ``image`` resized so its shorter side is
  ``size * EVAL_RESIZE``, computed as one resampling of the matching box of the original."""
  height, width = image.shape[:2]
  side = min(height, width) / EVAL_RESIZE  # the crop's side in original pixels
  box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
  return _resample(image, box, size)
