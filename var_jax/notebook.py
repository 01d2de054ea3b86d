"""What the notebooks (``notebooks/*.ipynb``) share: loading a released model by name or local files, image grids and
PIL conversion, reading a user's image, display with a plain-Python fallback, and a throughput measurement.

Downloads go through ``Pipeline.from_pretrained`` (``var_jax.hub``: the Hugging Face hub cache, resumed downloads,
offline mode, revision pinning), never through hand-written URL code.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from var_jax import images as images_lib


def load(pipeline_cls, pretrained: Optional[str] = None, tokenizer_ckpt: Optional[str] = None,
         model_ckpt: Optional[str] = None, **model_args):
  """A pipeline of ``pipeline_cls`` (``VARPipeline``, ``ELMPipeline``, ``BiGRPipeline``): from local reference files
  when both ``tokenizer_ckpt`` and ``model_ckpt`` are given, else the released model ``pretrained`` (a name of
  ``var_jax.hub``, ``name@revision`` pins one). ``model_args``: what the tensors cannot tell (ELM / BiGR ModelArgs,
  VAR overrides)."""
  if bool(tokenizer_ckpt) != bool(model_ckpt):
    raise ValueError('give both the tokenizer and the model file (local weights), or neither (PRETRAINED), got '
                     f'tokenizer={tokenizer_ckpt!r}, model={model_ckpt!r}')
  if tokenizer_ckpt:
    return pipeline_cls.from_torch(str(tokenizer_ckpt), str(model_ckpt), **model_args)
  if not pretrained:
    raise ValueError('set PRETRAINED to a released name (python -m var_jax.hub lists them) or give local files')
  return pipeline_cls.from_pretrained(pretrained, **model_args)


def to_pil(image):
  """One HWC image, float in [0, 1] or uint8 -> ``PIL.Image``."""
  from PIL import Image
  a = np.asarray(image)
  return Image.fromarray(a if a.dtype == np.uint8 else images_lib.to_uint8(a))


def make_grid(images, ncols: int, pad: int = 2):
  """Images (N, H, W, 3) in [0, 1] -> one ``PIL.Image``, ``ncols`` per row, ``pad`` white pixels around each."""
  images = np.asarray(images, np.float32)
  n, h, w, _ = images.shape
  ncols = max(1, min(ncols, n))
  nrows = -(-n // ncols)
  grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), np.float32)
  for i, img in enumerate(images):
    r, c = divmod(i, ncols)
    y, x = pad + r * (h + pad), pad + c * (w + pad)
    grid[y:y + h, x:x + w] = img
  return to_pil(grid)


def load_image(path: str, size: int) -> np.ndarray:
  """Any image file (local or gs://) -> (size, size, 3) float32 in [0, 1]: the shorter side resized to ``size``
  (Lanczos), then center-cropped."""
  from PIL import Image
  img = Image.fromarray(images_lib.read_rgb(path))
  w, h = img.size
  s = size / min(w, h)
  img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.LANCZOS)
  w, h = img.size
  left, top = (w - size) // 2, (h - size) // 2
  return np.asarray(img.crop((left, top, left + size, top + size)), np.float32) / 255.0


def display(obj):
  """IPython's ``display`` in a notebook, ``print`` elsewhere."""
  try:
    from IPython.display import display as ipy_display
  except ImportError:
    print(obj)
    return
  ipy_display(obj)


def throughput(sample: Callable[..., Tuple[Any, Any]], labels: Sequence[int], seed: int, batch_size: int,
               **opts) -> Dict[str, float]:
  """Images/s of ``sample(labels, seed, batch_size=..., **opts)`` (a pipeline's ``sample``): one warm-up call on the
  first ``batch_size`` labels (compiles, or reuses, the sampler), then all ``labels`` timed, the transfer to the
  host included."""
  labels = np.asarray(labels, np.int32)
  sample(labels[:batch_size], seed, batch_size=batch_size, **opts)
  t0 = time.perf_counter()
  out, _ = sample(labels, seed, batch_size=batch_size, **opts)
  np.asarray(out)
  dt = time.perf_counter() - t0
  return {'images': len(out), 'seconds': dt, 'images_per_s': len(out) / dt}
