"""Image helpers for the libraries, CLIs and trainers: float images to uint8, labelled grids, atomic PNG files."""
from __future__ import annotations

import numpy as np

from var_jax import fileio


def to_uint8(images) -> np.ndarray:
  """Float images in [0, 1] -> uint8, rounding as PIL's PNG writer sees it (``round(x * 255)``, clipped)."""
  return np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def labelled_grid(images_u8, labels, cols: int):
  """A PIL grid of the images with their class label written in the corner of each tile."""
  from PIL import Image, ImageDraw
  n, h, w, _ = images_u8.shape
  cols = max(1, min(cols, n))
  rows = -(-n // cols)
  grid = Image.new('RGB', (cols * w, rows * h), (0, 0, 0))
  draw = ImageDraw.Draw(grid)
  for i in range(n):
    x, y = (i % cols) * w, (i // cols) * h
    grid.paste(Image.fromarray(images_u8[i]), (x, y))
    draw.rectangle([x, y, x + 6 * len(str(labels[i])) + 4, y + 11], fill=(0, 0, 0))
    draw.text((x + 2, y), str(labels[i]), fill=(255, 255, 255))
  return grid


def write_png(path: str, image) -> str:
  """Write a uint8 HWC array (or a PIL image) as PNG, atomically (``fileio``; local or gs://): a killed run never
  leaves a truncated file."""
  from PIL import Image
  im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
  return fileio.atomic_save(path, lambda f: im.save(f, format='PNG'))


def read_rgb(path: str) -> np.ndarray:
  """An image file (local or gs://) as a uint8 (H, W, 3) array."""
  from PIL import Image
  with fileio.path(path).open('rb') as f, Image.open(f) as im:
    return np.asarray(im.convert('RGB'))


def intact_image(path: str) -> bool:
  """True if ``path`` decodes completely as an image; a truncated or corrupt file (a write killed midway) does not."""
  from PIL import Image
  try:
    with fileio.path(path).open('rb') as f, Image.open(f) as im:
      im.load()
    return True
  except Exception:  # noqa: BLE001 - OSError, SyntaxError, PIL's DecompressionBombError ...: not intact
    return False
