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


_SIXTEEN_BIT = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')


def to_rgb(im):
  """A PIL image of any mode as 8-bit RGB with its true range (the one conversion every reader uses):

  * 16-bit gray (``I;16*``, and ``I``, which is how PIL holds 16-bit PNG / TIFF pixels): 0..65535 scaled to 0..255
    (``round(v / 257)``; PIL's own ``convert`` clips them at 255, making most images white); an ``I`` value outside
    0..65535 is an error;
  * float (``F``): [0, 1] scaled by 255, else [0, 255] as is, else [0, 65535] as 16-bit; non-finite or negative
    values, or beyond 65535, are an error (the range cannot be told);
  * alpha (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour): dropped, the colour kept (as torchvision's
    ``pil_loader``), without PIL's palette-transparency warning;
  * 1-bit, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's conversion (8-bit already).
  Always a new, loaded image (the file may be closed after). Raises ValueError naming the mode and the range."""
  from PIL import Image
  mode = im.mode
  if mode in _SIXTEEN_BIT or mode == 'F':
    a = np.asarray(im).astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 65535:
      raise ValueError(f'a {mode} image with values {lo:g}..{hi:g}: outside 0..65535, its range cannot be told')
    if mode == 'F' and hi <= 1.0:
      scale = 255.0
    elif mode == 'F' and hi <= 255.0:
      scale = 1.0
    else:
      scale = 1.0 / 257.0
    gray = np.clip(np.round(a * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, 'L').convert('RGB')
  if mode == 'P' and 'transparency' in im.info:
    return im.convert('RGBA').convert('RGB')
  return im.convert('RGB')


def read_rgb(path: str) -> np.ndarray:
  """An image file (local or gs://) as a uint8 (H, W, 3) array (any mode, its true range: ``to_rgb``)."""
  from PIL import Image
  with fileio.path(path).open('rb') as f, Image.open(f) as im:
    return np.asarray(to_rgb(im))


def intact_image(path: str) -> bool:
  """True if ``path`` decodes completely as an image; a truncated or corrupt file (a write killed midway) does not."""
  from PIL import Image
  try:
    with fileio.path(path).open('rb') as f, Image.open(f) as im:
      im.load()
    return True
  except Exception:  # noqa: BLE001 - OSError, SyntaxError, PIL's DecompressionBombError ...: not intact
    return False
