"""The reference VAR image augmentation (torchvision semantics) in numpy/PIL, as grain transforms.

The reference (``VAR/utils/data.py``) builds, with ``mid = round(mid_reso * final_reso)``::

  train: [RandomHorizontalFlip() if hflip,] Resize(mid, LANCZOS), RandomCrop(final), ToTensor(), x + x - 1
  eval:  Resize(mid, LANCZOS), CenterCrop(final), ToTensor(), x + x - 1

``Resize(int)`` scales the shorter side to ``mid`` and the longer one to ``int(mid * long / short)``, with PIL's
resampling (which antialiases). ``RandomCrop`` draws ``top`` uniformly in ``[0, h - final]`` and ``left`` in
``[0, w - final]``; ``CenterCrop`` uses ``top = int(round((h - final) / 2.0))``, ``left`` likewise. The flip is applied
first (the reference inserts it at the front). ``data.train_crop='center'`` trains on the eval crop instead (flip,
resize, center crop: deterministic but for the flip, what ``var_jax.data.token_cache`` tokenizes once). Outputs are
float32 HWC in [-1, 1], computed exactly as torch does (``float32(x) / 255``, then ``x + x - 1``). Randomness comes
from the ``np.random.Generator`` grain hands ``RandomMap.random_map`` (one per element, derived from the pipeline
seed and the element's index), drawn in the order flip, top, left.

Unreadable images do not raise inside the pipeline: the transforms return a marker record (``is_corrupt``), which
``FilterCorrupt`` (train) drops and ``MaskCorrupt`` (eval) turns into a masked-out example, both counting it in a
``SkipMonitor`` that fails the pipeline when the skipped fraction exceeds ``max_skip_fraction``.
"""
from __future__ import annotations

import io
import threading
from typing import Any, Optional

from absl import logging
import grain
import numpy as np
from PIL import Image

from var_jax import fileio
from var_jax.images import to_rgb

CORRUPT_KEY = '_corrupt'

# Counting rule of ``SkipMonitor``: judge the fraction only after this many images (per process) ...
MIN_SEEN = 100
# ... except when every image so far was bad and at least this many were seen.
MIN_SEEN_ALL_BAD = 20


class CorruptImageError(Exception):
  """An image that cannot be read or decoded. ``source`` is its path (or its index in the source)."""

  def __init__(self, source: Any, reason: str):
    super().__init__(f'cannot decode image {source!r}: {reason}')
    self.source = source
    self.reason = reason

  def __reduce__(self):
    return (CorruptImageError, (self.source, self.reason))


class TooManyCorruptImagesError(RuntimeError):
  """The fraction of unreadable images skipped by the pipeline exceeded ``max_skip_fraction``."""


def _record_source(record: dict[str, Any]) -> Any:
  if 'path' in record:
    return record['path']
  return record.get('index', '<in-memory image>')


def decode_image(record: dict[str, Any]) -> Image.Image:
  """A record's image as an RGB PIL image (any mode, its true range: ``var_jax.images.to_rgb``; 16-bit images are
  scaled, not clipped): ``record['path']`` is opened (as torchvision's ``pil_loader``),
  ``record['image']`` is either encoded bytes or a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).
  Raises ``CorruptImageError(path_or_index, reason)`` on any failure."""
  source = _record_source(record)
  try:
    if 'path' in record:
      with fileio.path(record['path']).open('rb') as f:   # local or remote (gs://)
        with Image.open(f) as img:
          return to_rgb(img)
    data = record['image']
    if isinstance(data, (bytes, bytearray, memoryview)):
      with Image.open(io.BytesIO(bytes(data))) as img:
        return to_rgb(img)
    arr = np.asarray(data)
    if arr.dtype != np.uint8:
      raise ValueError(f'expected a uint8 image array, got dtype {arr.dtype}')
    if arr.ndim == 3 and arr.shape[-1] == 1:
      arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
      raise ValueError(f'expected an image array (H, W[, 1|3|4]), got shape {arr.shape}')
    return Image.fromarray(np.ascontiguousarray(arr)).convert('RGB')
  except CorruptImageError:
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise CorruptImageError(source, f'{type(e).__name__}: {e}') from e


def mid_size(final_reso: int, mid_reso: float) -> int:
  """The reference's resize target for the shorter side: ``round(mid_reso * final_reso)`` (must be >= final)."""
  mid = round(mid_reso * final_reso)
  if mid < final_reso:
    raise ValueError(f'mid_reso={mid_reso} gives a resize target {mid} smaller than the crop {final_reso}')
  return mid


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
  """torchvision ``Resize(size, InterpolationMode.LANCZOS)`` on a PIL image: the shorter side becomes ``size``, the
  longer ``int(size * long / short)``; an image already of that size is returned as is."""
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_w, new_h) == (w, h):
    return img
  return img.resize((new_w, new_h), Image.Resampling.LANCZOS)


def center_crop_offsets(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
  """torchvision ``CenterCrop`` offsets (top, left) for an (h, w) image and a (th, tw) crop."""
  if th > h or tw > w:
    raise ValueError(f'crop {(th, tw)} is larger than the image {(h, w)}')
  return int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))


def random_crop_offsets(h: int, w: int, th: int, tw: int, rng: np.random.Generator) -> tuple[int, int]:
  """``RandomCrop`` offsets: top uniform in [0, h - th], left uniform in [0, w - tw] (drawn in that order)."""
  if th > h or tw > w:
    raise ValueError(f'crop {(th, tw)} is larger than the image {(h, w)}')
  top = int(rng.integers(0, h - th + 1))
  left = int(rng.integers(0, w - tw + 1))
  return top, left


def to_pm1(arr: np.ndarray) -> np.ndarray:
  """uint8 HWC -> float32 in [-1, 1] exactly as the reference: ``x = float32(u) / 255; x + x - 1``."""
  x = arr.astype(np.float32) / np.float32(255.0)
  return x + x - np.float32(1.0)


TRAIN_CROPS = ('random', 'center')


def draw_flip(hflip: bool, rng: np.random.Generator) -> bool:
  """The train augmentation's flip choice: the element rng's first draw, ``rng.random() < 0.5`` (when ``hflip``)."""
  return bool(hflip and rng.random() < 0.5)


def train_view(img: Image.Image, final_reso: int, mid_reso: float, flip: bool) -> np.ndarray:
  """The deterministic train view (``crop='center'``): [flip], resize the shorter side, center crop, to [-1, 1]."""
  if flip:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return preprocess_eval(img, final_reso, mid_reso)


def augment_train(img: Image.Image, final_reso: int, mid_reso: float, hflip: bool,
                  rng: np.random.Generator, crop: str = 'random') -> np.ndarray:
  """[flip with p=0.5], resize shorter side to ``round(mid_reso * final_reso)``, random crop (``crop='random'``, the
  reference) or center crop (``'center'``: no further draw), to [-1, 1]."""
  flip = draw_flip(hflip, rng)
  if crop == 'center':
    return train_view(img, final_reso, mid_reso, flip)
  if flip:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  img = resize_shorter(img, mid_size(final_reso, mid_reso))
  arr = np.asarray(img)
  top, left = random_crop_offsets(arr.shape[0], arr.shape[1], final_reso, final_reso, rng)
  return to_pm1(arr[top:top + final_reso, left:left + final_reso])


def preprocess_eval(img: Image.Image, final_reso: int, mid_reso: float) -> np.ndarray:
  """Resize shorter side to ``round(mid_reso * final_reso)``, center crop, to [-1, 1]."""
  img = resize_shorter(img, mid_size(final_reso, mid_reso))
  arr = np.asarray(img)
  top, left = center_crop_offsets(arr.shape[0], arr.shape[1], final_reso, final_reso)
  return to_pm1(arr[top:top + final_reso, left:left + final_reso])


def corrupt_marker(err: CorruptImageError) -> dict[str, Any]:
  return {CORRUPT_KEY: (err.source, err.reason)}


def is_corrupt(element: dict[str, Any]) -> bool:
  return CORRUPT_KEY in element


class TrainTransform(grain.transforms.RandomMap):
  """Record -> ``{'image': float32 (S, S, 3) in [-1, 1], 'label': int32}``, or a corrupt marker."""

  def __init__(self, final_reso: int, mid_reso: float = 1.125, hflip: bool = False, crop: str = 'random'):
    self.final_reso, self.mid_reso, self.hflip = int(final_reso), float(mid_reso), bool(hflip)
    if crop not in TRAIN_CROPS:
      raise ValueError(f'data.train_crop={crop!r}: expected one of {TRAIN_CROPS}')
    self.crop = crop
    mid_size(self.final_reso, self.mid_reso)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    img = decode_or_marker(element)
    if isinstance(img, dict):
      return img
    return {'image': augment_train(img, self.final_reso, self.mid_reso, self.hflip, rng, self.crop),
            'label': np.int32(element['label'])}


def decode_or_marker(element: dict[str, Any]):
  """The element's decoded image, or the corrupt marker (a dict) when it cannot be read."""
  try:
    return decode_image(element)
  except CorruptImageError as e:
    return corrupt_marker(e)


class EvalTransform(grain.transforms.Map):
  """Record -> ``{'image': float32 (S, S, 3), 'label': int32, 'mask': bool}``, or a corrupt marker.

  A record with ``mask`` False (padding added by the eval pipeline) becomes a zero image with label 0."""

  def __init__(self, final_reso: int, mid_reso: float = 1.125):
    self.final_reso, self.mid_reso = int(final_reso), float(mid_reso)
    mid_size(self.final_reso, self.mid_reso)

  def pad_element(self) -> dict[str, Any]:
    return {'image': np.zeros((self.final_reso, self.final_reso, 3), np.float32), 'label': np.int32(0),
            'mask': np.bool_(False)}

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    if not element.get('mask', True):
      return self.pad_element()
    img = decode_or_marker(element)
    if isinstance(img, dict):
      return img
    return {'image': preprocess_eval(img, self.final_reso, self.mid_reso), 'label': np.int32(element['label']),
            'mask': np.bool_(True)}


class SkipMonitor:
  """Counts images seen and skipped as unreadable; raises ``TooManyCorruptImagesError`` when too many are bad.

  The check fails when ``skipped / seen > max_skip_fraction`` once at least ``min_seen`` images were seen, or as soon
  as ``min_seen_all_bad`` images were seen and all were bad. Every skip is logged (absl warning, with the path).
  Counting is per process: grain's multiprocess workers each get a pickled copy (counts start at 0 there), and
  counts are not part of the iterator checkpoint. Thread-safe (grain maps elements in a thread pool).
  """

  def __init__(self, max_skip_fraction: float = 0.01, min_seen: int = MIN_SEEN,
               min_seen_all_bad: int = MIN_SEEN_ALL_BAD):
    if max_skip_fraction < 0:
      raise ValueError(f'max_skip_fraction must be >= 0, got {max_skip_fraction}')
    self.max_skip_fraction = float(max_skip_fraction)
    self.min_seen, self.min_seen_all_bad = int(min_seen), int(min_seen_all_bad)
    self.seen = 0
    self.skipped = 0
    self.last_bad: Optional[tuple[Any, str]] = None
    self._lock = threading.Lock()

  def __getstate__(self):
    state = self.__dict__.copy()
    del state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def observe(self, element: dict[str, Any]) -> bool:
    """Counts ``element``; returns False for a corrupt marker (and logs it), True otherwise."""
    bad = is_corrupt(element)
    with self._lock:
      self.seen += 1
      if bad:
        self.skipped += 1
        self.last_bad = element[CORRUPT_KEY]
      seen, skipped, last_bad = self.seen, self.skipped, self.last_bad
    if bad:
      logging.warning('Skipping unreadable image %r (%s); %d of %d images skipped so far in this process',
                      last_bad[0], last_bad[1], skipped, seen)
    elif not skipped:
      return True
    too_many = ((seen >= self.min_seen and skipped / seen > self.max_skip_fraction)
                or (skipped == seen and seen >= self.min_seen_all_bad))
    if too_many:
      raise TooManyCorruptImagesError(
          f'{skipped} of {seen} images seen by this process were unreadable and skipped ({skipped / seen:.2%}), '
          f'more than max_skip_fraction={self.max_skip_fraction:g} (checked after {self.min_seen} images, or after '
          f'{self.min_seen_all_bad} if all are bad); last bad image: {last_bad[0]!r} ({last_bad[1]})')
    return not bad

  def summary(self) -> dict[str, int]:
    with self._lock:
      return {'seen': self.seen, 'skipped': self.skipped}


class FilterCorrupt(grain.transforms.Filter):
  """Drops corrupt markers (train), counting every element in ``monitor``."""

  def __init__(self, monitor: SkipMonitor):
    self.monitor = monitor

  def filter(self, element: dict[str, Any]) -> bool:
    return self.monitor.observe(element)


class MaskCorrupt(grain.transforms.Map):
  """Replaces corrupt markers with a masked-out zero image (eval: keeps the batch count fixed), counting real
  (unpadded) elements in ``monitor``."""

  def __init__(self, monitor: SkipMonitor, final_reso: int):
    self.monitor = monitor
    self.final_reso = int(final_reso)

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    if is_corrupt(element):
      self.monitor.observe(element)
      return {'image': np.zeros((self.final_reso, self.final_reso, 3), np.float32), 'label': np.int32(0),
              'mask': np.bool_(False)}
    if element['mask']:
      self.monitor.observe(element)
    return element
