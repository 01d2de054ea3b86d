"""Checks of ``evaluate``'s input and output paths, run before anything is sampled or computed: each path exists and
has the expected format, read from headers (an ``.npz``'s member list and array headers, a ``.safetensors``
header, a torch file's archive listing), so a 50k-image ``arr_0`` is not loaded to find out."""
from __future__ import annotations

import json
import os
import struct
import zipfile
from typing import Optional, Tuple

import numpy as np

from var_jax import fileio

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')


def npz_header(path: str, key: str) -> Tuple[Tuple[int, ...], np.dtype]:
  """(shape, dtype) of member ``key`` of the ``.npz`` at ``path``, from the array header only."""
  with fileio.path(path).open('rb') as fh, zipfile.ZipFile(fh) as z, z.open(key + '.npy') as f:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
  return tuple(shape), dtype


def npz_keys(path: str, what: str):
  """The member names of an ``.npz`` (an error naming ``what`` when it is not one)."""
  with fileio.path(path).open('rb') as fh:     # local or remote (gs://)
    if not zipfile.is_zipfile(fh):
      raise ValueError(f'{what} {path}: not an .npz archive')
    with zipfile.ZipFile(fh) as z:
      return sorted(n[:-4] for n in z.namelist() if n.endswith('.npy'))


def _exists(path: str, what: str):
  if not fileio.exists(path):
    raise FileNotFoundError(f'{what} {path}: no such file or folder')
  if not fileio.is_remote(path) and not os.access(path, os.R_OK):
    raise ValueError(f'{what} {path}: not readable')


def check_image_folder(path: str, what: str):
  if fileio.find_files(path, IMAGE_EXTENSIONS):
    return
  raise FileNotFoundError(f'{what} {path}: no image files ({", ".join(IMAGE_EXTENSIONS)}) found')


def check_images_npz(path: str, what: str):
  """An ``.npz`` whose ``arr_0`` is uint8 (N, H, W, 3)."""
  keys = npz_keys(path, what)
  if 'arr_0' not in keys:
    raise KeyError(f'{what} {path} has no \'arr_0\' images (keys present: {keys})')
  _check_arr0(path, what)


def _check_arr0(path: str, what: str):
  shape, dtype = npz_header(path, 'arr_0')
  if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
    raise ValueError(f'{what} {path}: arr_0 must be uint8 images (N, H, W, 3), got {dtype} {shape}')


def check_statistics_npz(path: str, what: str):
  """``mu`` (d,) and ``sigma`` (d, d), finite."""
  from var_jax.eval import metrics
  mu, sigma = metrics.load_statistics(path)
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f'{what} {path}: the statistics mu/sigma hold NaN or inf values')


def check_images(path: str, what: str):
  """A folder of images or an ``.npz`` with ``arr_0`` images."""
  _exists(path, what)
  if fileio.isdir(path):
    check_image_folder(path, what)
  elif path.endswith('.npz'):
    check_images_npz(path, what)
  else:
    raise ValueError(f'{what} {path}: expected a folder of images or an .npz with an \'arr_0\' uint8 NHWC array')


def check_reference(path: str, with_inception: bool):
  """What ``evaluator.load_reference`` reads: a folder of images, or an ``.npz`` with ``arr_0`` images (used when
  the Inception weights are given) or ``mu``/``sigma`` statistics (finite)."""
  what = 'reference batch'
  _exists(path, what)
  if fileio.isdir(path):
    check_image_folder(path, what)
    return
  keys = npz_keys(path, what)
  if 'arr_0' in keys and with_inception:
    _check_arr0(path, what)
  elif {'mu', 'sigma'} <= set(keys):
    check_statistics_npz(path, what)
  else:
    raise KeyError(f'{what} {path}: expected \'arr_0\' images (needs --inception) or \'mu\'/\'sigma\' statistics; '
                   f'found keys {keys}')


def check_inception(path: Optional[str]):
  """The FID Inception weights file: present, and its header readable (``.safetensors`` JSON header, ``.npz``
  members, a torch ``.pth`` zip archive or legacy pickle)."""
  from var_jax.eval import inception
  if not path:
    raise ValueError('--inception is required for FID/IS/precision/recall: pass pytorch-fid\'s '
                     'pt_inception-2015-12-05-6726825d.pth (or its converted .safetensors); it is never downloaded')
  if not fileio.isfile(path):
    raise inception._missing_weights_error(path)  # pylint: disable=protected-access
  what = 'FID Inception weights'
  if path.endswith('.safetensors'):
    with fileio.path(path).open('rb') as f:
      raw = f.read(8)
      n = struct.unpack('<Q', raw)[0] if len(raw) == 8 else -1
      try:
        header = json.loads(f.read(n)) if 0 < n < 2 ** 27 else None
      except ValueError:
        header = None
    if not isinstance(header, dict) or not header:
      raise ValueError(f'{what} {path}: not a readable .safetensors file (bad header)')
  elif path.endswith('.npz'):
    if not npz_keys(path, what):
      raise ValueError(f'{what} {path}: the .npz holds no arrays')
  else:
    with fileio.path(path).open('rb') as f:
      if zipfile.is_zipfile(f):
        with zipfile.ZipFile(f) as z:
          if not any(n.endswith('data.pkl') for n in z.namelist()):
            raise ValueError(f'{what} {path}: a zip archive but not a torch checkpoint (no data.pkl)')
      else:
        f.seek(0)
        if f.read(1) != b'\x80':     # a legacy (pre-1.6) torch.save pickle
          raise ValueError(f'{what} {path}: neither a torch checkpoint, a .safetensors nor an .npz file')


def check_out_dir(path: str, what: str = '--out_dir'):
  """``path`` exists or can be made, and a file can be written into it (``fileio.check_output_dir``)."""
  fileio.check_output_dir(path, what)


def check_evaluate_inputs(*, samples: Optional[str], ref: Optional[str], ref_cache: Optional[str],
                          inception: Optional[str], out_dir: str, sample_quality: bool, rfid: bool):
  """Every path ``evaluator.evaluate`` will read or write, in the order it would need them."""
  check_out_dir(out_dir)
  if sample_quality or rfid:
    check_inception(inception)
  if samples:
    check_images(samples, 'samples')
  if ref:
    if ref_cache and fileio.exists(ref_cache):
      check_statistics_npz(ref_cache, 'reference cache')
    else:
      check_reference(ref, with_inception=bool(inception))
      if ref_cache:
        check_out_dir(os.path.dirname(fileio.abspath(ref_cache)), '--ref_cache')


# ----------------------------------------------------------------------------- flags and counts, before any network
POOL3_DIMS = 2048          # the FID Inception's pool3 features (var_jax.eval.inception.POOL3_DIM)
_warned = set()


def _warn_once(msg: str):
  from absl import logging
  if msg not in _warned:
    _warned.add(msg)
    logging.warning('%s', msg)


def check_evaluate_flags(*, is_split: str, pr_k: int, pr_distance_dtype: str, inception_batch: int,
                         max_images: int = -1, max_batches: int = -1, rfid: bool = False,
                         test_set_loss: bool = False, has_data_config: bool = True, digits: bool = False,
                         ref: Optional[str] = None):
  """Every metric flag of ``evaluate`` on its own and together, before any model is loaded or network run; each
  failure is a ValueError naming the flag, its value and what is allowed."""
  from var_jax.eval import metrics
  try:
    metrics.is_split_kwargs(is_split)
  except ValueError as e:
    raise ValueError(f'--is_split: {e}') from None
  for flag, value, low in (('--pr_k', pr_k, 1), ('--inception_batch', inception_batch, 1)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f'{flag}={value!r}: must be an integer >= {low}')
  for flag, value in (('--max_images', max_images), ('--max_batches', max_batches)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (value == -1 or value >= 1):
      raise ValueError(f'{flag}={value!r}: must be -1 (all) or an integer >= 1')
  if pr_distance_dtype not in metrics.DISTANCE_DTYPES:
    raise ValueError(f'--pr_distance_dtype={pr_distance_dtype!r}: expected one of {", ".join(metrics.DISTANCE_DTYPES)}')
  if rfid and 0 < max_images < 2:
    raise ValueError(f'--max_images={max_images}: rFID needs at least 2 images for a covariance')
  if digits and (rfid or test_set_loss or ref):
    raise ValueError('--digits scores samples of a digits model: it does not combine with --rfid, --test_loss or '
                     '--ref (no Inception network)')
  if (rfid or test_set_loss) and not has_data_config:
    raise ValueError('--rfid and --test_loss read a data split: give --config=configs/<x>.py (its data section)')


def count_images(path: str) -> int:
  """The number of images of a folder (its image files) or of an ``.npz``'s ``arr_0`` (from the header)."""
  if fileio.isdir(path):
    return len(fileio.find_files(path, IMAGE_EXTENSIONS))
  return int(npz_header(path, 'arr_0')[0][0])


def reference_count(ref: Optional[str], ref_cache: Optional[str], with_inception: bool) -> Optional[int]:
  """How many images the reference's statistics come from (None: given as statistics, the count unknown): a folder's
  images, an ``.npz``'s ``arr_0`` (when the Inception weights are given) or the ``pool3`` features stored beside
  ``mu``/``sigma`` (a reference cache)."""
  if not ref:
    return None
  stats = ref_cache if ref_cache and fileio.exists(ref_cache) else None
  if stats is None:
    if fileio.isdir(ref):
      return count_images(ref)
    keys = npz_keys(ref, 'reference batch')
    if 'arr_0' in keys and with_inception:
      return count_images(ref)
    stats = ref
  keys = npz_keys(stats, 'reference statistics')
  return int(npz_header(stats, 'pool3')[0][0]) if 'pool3' in keys else None


def check_counts(num_samples: Optional[int], num_reference: Optional[int], *, samples_what: str,
                 fid: bool, pr_k: Optional[int] = None, dims: int = POOL3_DIMS, features: str = 'Inception pool3'):
  """Enough images for the statistics they feed, before any network runs. A covariance needs 2 images (an error
  below, naming both counts); with n <= ``dims`` it has rank <= n - 1 < dims: singular, so the Frechet distance is
  computed (pytorch-fid's eps regularisation) but biased and not comparable with full-rank numbers: a warning
  naming both counts. Precision/recall with k nearest neighbours needs more than k images in each set."""
  ref_text = 'unknown (statistics)' if num_reference is None else str(num_reference)
  if num_samples is not None and num_samples < 1:
    raise ValueError(f'{samples_what} has no images')
  if fid:
    for what, n in ((samples_what, num_samples), ('--ref', num_reference)):
      if n is not None and n < 2:
        raise ValueError(f'FID needs at least 2 images of each set for a covariance of the {dims} {features} '
                         f'features: {what} has {n} (samples: {num_samples}, reference: {ref_text})')
    small = [f'{what} has {n}' for what, n in ((samples_what, num_samples), ('--ref', num_reference))
             if n is not None and n <= dims]
    if small:
      _warn_once(f'FID: {", ".join(small)} images, at most {dims}: the covariance of the {dims} {features} '
                 f'features is singular (rank <= n - 1), so the FID is biased and not comparable with numbers from '
                 f'{dims + 1}+ images (the paper: 50000 samples)')
  if pr_k is not None and num_reference is not None:
    for what, n in ((samples_what, num_samples), ('--ref', num_reference)):
      if n is not None and n <= pr_k:
        raise ValueError(f'precision/recall with --pr_k={pr_k} needs more than {pr_k} images in each set: {what} '
                         f'has {n} (samples: {num_samples}, reference: {ref_text})')
