"""The evaluation protocol as a library: image sets, Inception activations, FID / IS / precision-recall against a
reference batch, tokenizer rFID, and the test-set loss of a VAR checkpoint.

The CLI over this is ``python -m var_jax.evaluate``. The protocol (what makes numbers comparable with the paper's):

* Generated images go through a **uint8 PNG round trip** before any feature is computed (``var_jax.eval.protocol``
  writes PNGs and builds ``samples.npz`` from the files on disk), as the reference's ``create_npz_from_sample_folder``
  does.
* Features are those of the FID Inception-v3 (pytorch-fid's port of the 2015 TF graph, ``var_jax.eval.inception``):
  uint8 -> [0, 1] -> bilinear resize to 299 (torch's ``align_corners=False``, no antialias) -> [-1, 1].
  ``pool3`` (2048-d) for FID and precision/recall, the 1008-way logits for the Inception Score.
  ``InceptionFeatures(preprocessing='tf1_legacy')`` uses the TF graph's own input path instead (TF1 legacy bilinear
  of [0, 255], ``(x - 128) / 128``), as OpenAI's evaluator does.
* FID: Frechet distance of the Gaussians of the two ``pool3`` sets (float64 statistics, pytorch-fid's numerics);
  IS: OpenAI's evaluator's split rule, consecutive chunks of 5000 samples (``is_split='chunks5000'``; ``'equal10'``:
  10 equal splits, the improved-GAN rule; equal at N = 50000); precision/recall: k = 3 nearest-neighbour manifolds
  (Kynkaanniemi et al.) with the evaluator's float16 distances (``pr_distance_dtype='float16'``; ``'float32'``
  moves P/R by ~0.1-0.2 points). The rules used are recorded in the returned metrics / ``metrics.json``.
* The paper's tables come from OpenAI's guided-diffusion evaluator (TF Inception, its own resize) on
  ``samples.npz`` vs ``VIRTUAL_imagenet256_labeled.npz``. Our numbers use the same network weights, its IS split
  and P/R distance rules by default, and pytorch-fid's input path (torch resize) unless ``preprocessing='tf1_legacy'``;
  they are close but not bit-identical to that evaluator (TF's convolutions round differently): report which one you
  used. The ``samples.npz`` written here is exactly what that evaluator reads.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from var_jax import fileio
from var_jax.eval import metrics
from var_jax.images import read_rgb, to_uint8

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')


# ----------------------------------------------------------------------------- image sets
@dataclasses.dataclass
class ImageSet:
  """A finite set of uint8 RGB images (N, H, W, 3), read lazily in batches.

  Built from a folder of image files (sorted by name, PNG preferred: JPEG artefacts change FID), an ``.npz`` with
  an ``'arr_0'`` array (the OpenAI evaluator's layout), or an in-memory array.
  """
  name: str
  length: int
  _batches: Callable[[int], Iterator[np.ndarray]]

  def __len__(self) -> int:
    return self.length

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    return self._batches(batch_size)

  @classmethod
  def from_array(cls, images, name: str = 'array') -> 'ImageSet':
    images = _check_uint8_images(np.asarray(images), name)

    def gen(bs):
      for s in range(0, len(images), bs):
        yield images[s:s + bs]
    return cls(name, len(images), gen)

  @classmethod
  def from_folder(cls, path: str) -> 'ImageSet':
    files = fileio.find_files(path, IMAGE_EXTENSIONS)     # local or remote (gs://)
    if not files:
      raise FileNotFoundError(f'{path}: no image files ({", ".join(IMAGE_EXTENSIONS)}) found')

    def gen(bs):
      shape = None
      for s in range(0, len(files), bs):
        out = []
        for f in files[s:s + bs]:
          try:
            a = read_rgb(f)
          except Exception as e:  # PIL raises many types for a corrupt file
            raise ValueError(f'{f}: cannot be read as an image ({e})') from e
          if shape is None:
            shape = a.shape
          elif a.shape != shape:
            raise ValueError(f'{f}: image size {a.shape[:2]} differs from the first image\'s {shape[:2]} in {path}; '
                             f'resize the set to one size first')
          out.append(a)
        yield np.stack(out)
    return cls(path, len(files), gen)

  @classmethod
  def from_npz(cls, path: str, key: str = 'arr_0') -> 'ImageSet':
    with fileio.path(path).open('rb') as fh, np.load(fh) as data:
      if key not in data.files:
        raise KeyError(f'{path} has no {key!r} images (keys present: {data.files})')
      images = data[key]
    return cls.from_array(images, path)

  @classmethod
  def open(cls, path: str) -> 'ImageSet':
    """A folder or an ``.npz`` with ``'arr_0'`` images."""
    if fileio.isdir(path):
      return cls.from_folder(path)
    if not fileio.exists(path):
      raise FileNotFoundError(f'{path}: no such file or folder')
    if path.endswith('.npz'):
      return cls.from_npz(path)
    raise ValueError(f'{path}: expected a folder of images or an .npz with an \'arr_0\' uint8 NHWC array')


def _check_uint8_images(a: np.ndarray, name: str) -> np.ndarray:
  if a.ndim != 4 or a.shape[-1] != 3:
    raise ValueError(f'{name}: expected uint8 images of shape (N, H, W, 3), got shape {a.shape}')
  if a.dtype != np.uint8:
    raise ValueError(f'{name}: expected uint8 images (the PNG round trip is part of the protocol), got {a.dtype}')
  if len(a) == 0:
    raise ValueError(f'{name}: the image set is empty')
  return a


# ----------------------------------------------------------------------------- Inception activations
def _inception_outputs(out):
  # IS uses softmax(pool3 @ W) without the fc bias, as OpenAI's evaluator, the improved-GAN code and torch-fidelity
  # (pytorch-fid has no IS); see var_jax/eval/inception.py
  return {'pool3': out['pool3'], 'logits': out['logits_unbiased']}


class InceptionFeatures:
  """Batched, device-sharded Inception-v3 activations: ``pool3`` (N, 2048) and the Inception-Score ``logits``
  (N, 1008; the fc output without its bias, as the published IS implementations use)."""

  def __init__(self, variables, batch_size: int = 200, devices: Optional[Sequence[jax.Device]] = None,
               preprocessing: str = 'pytorch_fid'):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from var_jax.eval import inception
    devices = list(devices or jax.local_devices())
    self.batch_size = int(math.ceil(batch_size / len(devices)) * len(devices))
    mesh = Mesh(np.array(devices), ('batch',))
    self._in = NamedSharding(mesh, P('batch'))
    rep = NamedSharding(mesh, P())
    self._params = jax.device_put(variables, rep)
    # 'pytorch_fid' (torch bilinear of x / 255, 2x - 1) or 'tf1_legacy' (OpenAI's evaluator: TF1 legacy bilinear of
    # [0, 255], (x - 128) / 128); see var_jax/eval/inception.py
    self.preprocessing = preprocessing
    self._fn = jax.jit(lambda p, x: _inception_outputs(inception.apply(p, x, preprocessing=preprocessing)),
                       in_shardings=(rep, self._in))

  def __call__(self, images_u8: np.ndarray) -> Dict[str, np.ndarray]:
    n = images_u8.shape[0]
    pad = (-n) % self.batch_size if n > self.batch_size else (-n) % len(self._in.mesh.devices.flat)
    x = np.concatenate([images_u8, np.zeros((pad,) + images_u8.shape[1:], images_u8.dtype)]) if pad else images_u8
    out = jax.device_get(self._fn(self._params, jax.device_put(x, self._in)))
    return {'pool3': np.asarray(out['pool3'][:n], np.float32), 'logits': np.asarray(out['logits'][:n], np.float32)}

  def of_set(self, images: ImageSet, progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, np.ndarray]:
    """The features of every image of the set (a progress bar / log lines: ``var_jax.progress``; ``progress``
    is also called with (done, total) after each batch)."""
    from var_jax import progress as progress_lib
    pools, logits, done = [], [], 0
    with progress_lib.Progress(len(images), f'Inception features of {images.name}', unit='images') as bar:
      for batch in images.batches(self.batch_size):
        out = self(_check_uint8_images(np.asarray(batch), images.name))
        pools.append(out['pool3'])
        logits.append(out['logits'])
        done += len(batch)
        bar.update(len(batch))
        if progress:
          progress(done, len(images))
    return {'pool3': np.concatenate(pools), 'logits': np.concatenate(logits)}


# ----------------------------------------------------------------------------- reference batches
@dataclasses.dataclass
class Reference:
  """What a reference batch gives: FID statistics always, ``pool3`` features when images were available (needed
  for precision/recall)."""
  mu: np.ndarray
  sigma: np.ndarray
  pool3: Optional[np.ndarray] = None
  source: str = ''


def load_reference(path: str, features: Optional[InceptionFeatures] = None,
                   cache: Optional[str] = None) -> Reference:
  """A reference batch from an ``.npz`` (OpenAI reference batch: ``arr_0`` images + ``mu``/``sigma``; pytorch-fid or
  ``save_reference`` statistics: ``mu``/``sigma`` [+ ``pool3``]) or a folder of images.

  Images are preferred over stored statistics when both exist: the stored ones come from a different Inception
  port (the OpenAI evaluator's TF graph) and mixing ports biases FID. ``cache``: where to store / reuse the computed
  ``mu``/``sigma``/``pool3`` (computing them for 50k images takes a while).
  """
  if cache and fileio.exists(cache):
    return _reference_from_npz(cache, None)
  if fileio.isdir(path):
    ref = _reference_from_images(ImageSet.from_folder(path), features)
  elif not fileio.exists(path):
    raise FileNotFoundError(f'reference batch {path}: no such file or folder')
  else:
    ref = _reference_from_npz(path, features)
  if cache:
    save_reference(cache, ref)
  return ref


def _reference_from_images(images: ImageSet, features: Optional[InceptionFeatures]) -> Reference:
  if features is None:
    raise ValueError(f'{images.name}: computing reference statistics from images needs the Inception weights')
  pool3 = features.of_set(images)['pool3']
  mu, sigma = metrics.feature_statistics(pool3)
  return Reference(mu, sigma, pool3, images.name)


def _reference_from_npz(path: str, features: Optional[InceptionFeatures]) -> Reference:
  with fileio.path(path).open('rb') as fh, np.load(fh) as data:
    files = set(data.files)
    if 'arr_0' in files and features is not None:
      return _reference_from_images(ImageSet.from_array(data['arr_0'], path), features)
    if {'mu', 'sigma'} <= files:
      mu, sigma = metrics.load_statistics(path)
      pool3 = np.asarray(data['pool3'], np.float32) if 'pool3' in files else None
      return Reference(mu, sigma, pool3, path)
  raise KeyError(f'{path}: expected \'arr_0\' images (needs --inception) or \'mu\'/\'sigma\' statistics; '
                 f'found keys {sorted(files)}')


def save_reference(path: str, ref: Reference):
  """``mu``/``sigma`` (pytorch-fid layout) plus ``pool3`` when known. Written atomically."""
  fileio.makedirs(os.path.dirname(fileio.abspath(path)) or '.')
  arrays = {'mu': ref.mu, 'sigma': ref.sigma}
  if ref.pool3 is not None:
    arrays['pool3'] = ref.pool3
  fileio.atomic_save(path, lambda f: np.savez(f, **arrays))


# ----------------------------------------------------------------------------- the metrics
def sample_metrics(fake: Dict[str, np.ndarray], ref: Reference, k: int = 3, is_split: str = metrics.DEFAULT_IS_SPLIT,
                   pr_batch: int = 1000, pr_distance_dtype: str = 'float16') -> Dict[str, Any]:
  """FID, IS and (when the reference has features) precision/recall of generated activations ``fake``.

  The defaults are OpenAI's evaluator's rules (the paper's numbers): ``is_split='chunks5000'`` (IS over consecutive
  chunks of 5000 samples; ``'equal10'``: 10 equal splits) and ``pr_distance_dtype='float16'`` (its float16 distance
  blocks; ``'float32'``: plain float32). The rules used are returned as ``'is_split'`` / ``'pr_distance_dtype'``."""
  if not (np.all(np.isfinite(ref.mu)) and np.all(np.isfinite(ref.sigma))):
    raise ValueError(f'reference statistics of {ref.source}: mu/sigma hold NaN or inf values')
  mu, sigma = metrics.feature_statistics(fake['pool3'])
  out = {'fid': metrics.frechet_distance(mu, sigma, ref.mu, ref.sigma), 'num_samples': int(len(fake['pool3']))}
  out['inception_score'], out['inception_score_std'] = metrics.inception_score(
      fake['logits'], **metrics.is_split_kwargs(is_split, len(fake['logits'])))
  out['is_split'] = is_split
  if ref.pool3 is not None:
    if len(ref.pool3) <= k or len(fake['pool3']) <= k:
      raise ValueError(f'precision/recall with k={k} needs more than {k} images in each set '
                       f'({len(ref.pool3)} reference, {len(fake["pool3"])} generated)')
    out['precision'], out['recall'] = metrics.precision_recall(ref.pool3, fake['pool3'], k=k, batch_size=pr_batch,
                                                               distance_dtype=pr_distance_dtype)
    out['pr_distance_dtype'] = pr_distance_dtype
    out['num_reference'] = int(len(ref.pool3))
  return out


# ----------------------------------------------------------------------------- rFID of a tokenizer
def reconstruction_sets(pipe, data_cfg, split: str, batch_size: int, max_images: int = -1
                        ) -> Tuple[np.ndarray, np.ndarray, Dict[str, float]]:
  """Originals and VQVAE reconstructions (both uint8, after the same round trip) of ``split``, plus pixel metrics
  (PSNR of the uint8 images, L1 in [0, 1] units). Center-cropped as the eval pipeline does."""
  from var_jax.data import pipeline as data_lib
  ds = data_lib.make_eval_dataset(data_cfg, batch_size, source=data_lib.make_source(data_cfg, split))
  origs, recs = [], []
  n = 0
  for batch in ds:
    m = np.asarray(batch['mask']).astype(bool)
    img = np.asarray(batch['image'])[m]          # [-1, 1] NHWC
    if max_images > 0:
      img = img[:max_images - n]
    if len(img) == 0:
      break
    rec = np.asarray(pipe.reconstruct(img))
    origs.append(to_uint8((img + 1) / 2))
    recs.append(to_uint8((rec + 1) / 2))
    n += len(img)
    if 0 < max_images <= n:
      break
  if not origs:
    raise ValueError(f'split {split!r} of {data_cfg.name!r} gave no images')
  o, r = np.concatenate(origs), np.concatenate(recs)
  mse = np.mean((o.astype(np.float64) - r.astype(np.float64)) ** 2, axis=(1, 2, 3))
  psnr = float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))
  l1 = float(np.mean(np.abs(o.astype(np.float64) - r.astype(np.float64))) / 255.0)
  return o, r, {'psnr': psnr, 'l1': l1, 'num_images': int(len(o))}


# ----------------------------------------------------------------------------- test-set loss of VAR
def test_loss(pipe, data_cfg, split: str, batch_size: int, max_batches: int = -1) -> Dict[str, float]:
  """Teacher-forced cross-entropy and token accuracy of ``pipe``'s VAR over ``split`` (the quantities of the paper's
  scaling laws): overall, on the last scale, and per scale. Tokens come from ``pipe``'s VQVAE, images are
  center-cropped like the training eval. Batches are split over the local devices; padding is masked out."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from var_jax.data import pipeline as data_lib
  from var_jax.losses.tokens import label_smoothed_cross_entropy
  cfg = pipe.var_config
  devices = jax.local_devices()
  if batch_size % len(devices):
    raise ValueError(f'batch_size {batch_size} must be a multiple of the {len(devices)} local devices')
  mesh = Mesh(np.array(devices), ('batch',))
  bsh, rep = NamedSharding(mesh, P('batch')), NamedSharding(mesh, P())
  vae, var = pipe.vae, pipe.var

  def fn(vae_vars, var_vars, images, labels, mask):
    from var_jax.models.vqvae import VQVAE
    idx = vae.apply(vae_vars, images, method=VQVAE.img_to_idx)
    x_in = vae.apply(vae_vars, idx, method=VQVAE.idx_to_var_input)
    gt = jnp.concatenate(idx, axis=1)
    logits = var.apply(var_vars, labels, x_in)
    ce = label_smoothed_cross_entropy(logits, gt, 0.0)
    correct = (jnp.argmax(logits, -1) == gt).astype(jnp.float32)
    w = mask.astype(jnp.float32)[:, None]
    per_scale_l = jnp.stack([jnp.sum(ce[:, b:e].mean(1, keepdims=True) * w) for b, e in cfg.begin_ends])
    per_scale_a = jnp.stack([jnp.sum(correct[:, b:e].mean(1, keepdims=True) * w) for b, e in cfg.begin_ends])
    return {'loss': jnp.sum(ce.mean(1, keepdims=True) * w), 'acc': jnp.sum(correct.mean(1, keepdims=True) * w),
            'scale_loss': per_scale_l, 'scale_acc': per_scale_a, 'count': jnp.sum(w)}

  jfn = jax.jit(fn, in_shardings=(rep, rep, bsh, bsh, bsh), out_shardings=rep)
  vae_vars, var_vars = jax.device_put(pipe.vae_variables, rep), jax.device_put(pipe.var_variables, rep)
  ds = data_lib.make_eval_dataset(data_cfg, batch_size, source=data_lib.make_source(data_cfg, split))
  tot = None
  for i, batch in enumerate(ds):
    if 0 <= max_batches <= i:
      break
    out = jax.device_get(jfn(vae_vars, var_vars, *(jax.device_put(np.asarray(batch[k]), bsh)
                                                   for k in ('image', 'label', 'mask'))))
    tot = out if tot is None else jax.tree.map(np.add, tot, out)
  if tot is None or tot['count'] == 0:
    raise ValueError(f'split {split!r} of {data_cfg.name!r} gave no examples')
  n = float(tot['count'])
  res = {'test_loss': float(tot['loss']) / n, 'test_acc': 100 * float(tot['acc']) / n,
         'test_error': 1 - float(tot['acc']) / n, 'examples': int(n)}
  res['test_loss_last'] = float(tot['scale_loss'][-1]) / n
  res['test_acc_last'] = 100 * float(tot['scale_acc'][-1]) / n
  for s, (l, a) in enumerate(zip(tot['scale_loss'], tot['scale_acc'])):
    res[f'test_loss_scale{s}'], res[f'test_acc_scale{s}'] = float(l) / n, 100 * float(a) / n
  return res


# ----------------------------------------------------------------------------- the whole evaluation
def inception_features(path: Optional[str], batch: int) -> InceptionFeatures:
  from var_jax.eval import inception
  if not path:
    raise ValueError('--inception is required for FID/IS/precision/recall: pass pytorch-fid\'s '
                     'pt_inception-2015-12-05-6726825d.pth (or its converted .safetensors); it is never downloaded')
  return InceptionFeatures(inception.load_inception_params(path), batch_size=batch)


def write_metrics(out_dir: str, results: Dict[str, Any], log: Callable[[str], None] = print) -> str:
  """``metrics.json`` (atomically) and a table of the scalar results."""
  path = os.path.join(out_dir, 'metrics.json')
  fileio.atomic_write_text(path, json.dumps(results, indent=1, default=lambda o: o.item() if isinstance(
      o, np.generic) else str(o)))
  width = max((len(k) for k in results), default=0)
  for k, v in results.items():
    if not isinstance(v, dict):
      log(f'{k:<{width}}  {v:.4f}' if isinstance(v, float) else f'{k:<{width}}  {v}')
  log(f'wrote {path}')
  return path


_CLASS_IN_NAME = re.compile(r'_class(\d+)\.[a-zA-Z]+$')


def _labels_from_names(folder: str) -> List[int]:
  files = fileio.find_files(folder, IMAGE_EXTENSIONS)
  out = []
  for f in files:
    m = _CLASS_IN_NAME.search(f)
    if not m:
      raise ValueError(f'{f}: --digits needs each sample\'s class in its file name (<index>_class<c>.png, as '
                       f'`python -m var_jax.sample --out_dir` writes them)')
    out.append(int(m.group(1)))
  return out


def _evaluate_digits(pipe, view, *, out_dir, samples, classes, num_per_class, cfg, top_k, top_p, seed, batch_size,
                     dtype, log, overwrite=False) -> Dict[str, Any]:
  """The digits quality score of ``samples`` (a folder) or of the protocol's samples of ``pipe``."""
  from var_jax.eval import digits
  from var_jax.eval import protocol
  out_dir = out_dir or fileio.abspath(samples)       # the inputs were checked by ``check_request``
  fileio.makedirs(out_dir)
  scorer = digits.scorer(*view)                     # fit before sampling: a bad view fails before any work
  opts, labels, npz = {}, None, None
  if not samples:
    labels = protocol.sample_plan(pipe.num_classes, classes, num_per_class)
    npz = protocol.generate_samples(pipe, os.path.join(out_dir, 'samples'), labels, seed=seed, cfg=cfg, top_k=top_k,
                                    top_p=top_p, batch_size=batch_size, dtype=dtype, log=log, overwrite=overwrite)
    opts = protocol.sampling_options(pipe.family, cfg=cfg, top_k=top_k, top_p=top_p)
    samples = os.path.join(out_dir, 'samples')
  if jax.process_index() != 0:
    return {}
  if npz:        # the plan's images (samples.npz), not whatever else lies in the folder
    images = np.concatenate(list(ImageSet.from_npz(npz).batches(256))).astype(np.float32) / 255.0
  else:
    labels = _labels_from_names(samples)
    images = np.concatenate(list(ImageSet.from_folder(samples).batches(256))).astype(np.float32) / 255.0
  score = scorer.score(images, labels)
  log(digits.format_score(score))
  results = {f'digits_{k}': v for k, v in score.items()}
  results['protocol'] = {**opts, 'seed': seed, 'num_per_class': num_per_class, 'samples': samples,
                         'features': f'digits: grayscale 8x8 pooled view of {view[0]}px, mid_reso {view[1]}'}
  write_metrics(out_dir, results, log)
  return results


def planned_count(classes, num_per_class: int) -> Optional[int]:
  """The number of images the sampling plan has when ``classes`` are given (None: every class, the model's count)."""
  if classes is None:
    return None
  from var_jax.sampling.common import parse_class_labels
  return len(parse_class_labels(classes, None, '--classes')) * int(num_per_class)


def check_request(*, out_dir: Optional[str], samples: Optional[str], ref: Optional[str], ref_cache: Optional[str],
                  inception: Optional[str], inception_batch: int, pr_k: int, is_split: str, pr_distance_dtype: str,
                  rfid: bool, test_set_loss: bool, has_data_config: bool, max_images: int, max_batches: int,
                  digits: bool, num_generated: Optional[int]):
  """Everything ``evaluate`` can check before any model is loaded or network run: every flag (``inputs.
  check_evaluate_flags``), every path (``inputs.check_evaluate_inputs``), and whether the samples and reference
  images are enough for the statistics they feed (``inputs.check_counts``; ``num_generated``: the images to be
  sampled, None while unknown). Each failure is one error naming the flag or file."""
  from var_jax.eval import digits as digits_lib
  from var_jax.eval import inputs
  inputs.check_evaluate_flags(is_split=is_split, pr_k=pr_k, pr_distance_dtype=pr_distance_dtype,
                              inception_batch=inception_batch, max_images=max_images, max_batches=max_batches,
                              rfid=rfid, test_set_loss=test_set_loss, has_data_config=has_data_config,
                              digits=digits, ref=ref)
  if not out_dir and not samples:
    raise ValueError('give --out_dir (where samples and metrics.json go) or --samples')
  what = '--samples' if samples else 'the sampling plan (--classes x --num_per_class)'
  if digits:
    if samples and not fileio.isdir(samples):
      raise ValueError(f'--samples={samples}: --digits reads a folder of <index>_class<c>.png samples (the labels '
                       f'are in the names)')
    if samples:
      inputs.check_images(samples, 'samples')
    n = inputs.count_images(samples) if samples else num_generated
    inputs.check_counts(n, None, samples_what=what, fid=True, dims=digits_lib.PCA_DIMS,
                        features='digits PCA')
    return
  sample_quality = bool(samples or ref or not (rfid or test_set_loss))
  inputs.check_evaluate_inputs(samples=samples, ref=ref, ref_cache=ref_cache, inception=inception,
                               out_dir=out_dir or os.path.dirname(fileio.abspath(samples)),
                               sample_quality=sample_quality, rfid=rfid)
  if sample_quality:
    n = inputs.count_images(samples) if samples else num_generated
    inputs.check_counts(n, inputs.reference_count(ref, ref_cache, bool(inception)), samples_what=what,
                        fid=bool(ref), pr_k=pr_k)


def evaluate(pipe=None, *, out_dir: Optional[str] = None, samples: Optional[str] = None, ref: Optional[str] = None,
             ref_cache: Optional[str] = None, inception: Optional[str] = None, inception_batch: int = 200,
             pr_k: int = 3, rfid: bool = False, test_set_loss: bool = False, data_config=None,
             split: Optional[str] = None, max_images: int = -1, max_batches: int = -1, classes=None,
             num_per_class: int = 50, cfg: Optional[float] = None, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: int = 0, batch_size: int = 64, dtype: str = 'float32',
             is_split: str = metrics.DEFAULT_IS_SPLIT, pr_distance_dtype: str = 'float16',
             digits_view: Optional[Tuple[int, float]] = None, overwrite: bool = False,
             log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Sample quality (FID / IS / precision-recall of ``samples``, or of the protocol's samples of ``pipe`` generated
  into ``out_dir/samples``; against the reference batch ``ref``, IS only without one), tokenizer rFID + PSNR
  (``rfid``) and VAR's test loss (``test_set_loss``) over ``split`` of ``data_config``; returns the metrics and
  writes them to ``out_dir/metrics.json`` (on process 0).

  ``digits_view`` ((image_size, mid_reso) of a model trained on the built-in digits): the digits quality score
  (``var_jax.eval.digits``: class accuracy, Frechet distance; ``digits_*`` keys) instead of the Inception metrics;
  the labels are the sampling plan's, or the ``_class<c>`` of each file name in a ``samples`` folder.

  ``out_dir/samples`` records its plan (``protocol.generate_samples``): rerunning resumes it, another plan is an
  error naming the difference, ``overwrite`` starts it over."""
  from var_jax.eval import protocol
  results: Dict[str, Any] = {}
  request = dict(out_dir=out_dir, samples=samples, ref=ref, ref_cache=ref_cache, inception=inception,
                 inception_batch=inception_batch, pr_k=pr_k, is_split=is_split, pr_distance_dtype=pr_distance_dtype,
                 rfid=rfid, test_set_loss=test_set_loss, has_data_config=data_config is not None,
                 max_images=max_images, max_batches=max_batches, digits=digits_view is not None)
  check_request(**request, num_generated=planned_count(classes, num_per_class))
  if (rfid or test_set_loss) and pipe is not None and pipe.family != 'var':
    raise ValueError('--rfid and --test_loss are implemented for VAR checkpoints (VQVAE tokenizer) only')
  if classes is None and not samples and pipe is not None and (digits_view is not None or ref or not (
      rfid or test_set_loss)):          # "every class": the count needs the model
    check_request(**request, num_generated=len(protocol.sample_plan(pipe.num_classes, classes, num_per_class)))
  if digits_view is not None:
    return _evaluate_digits(pipe, digits_view, out_dir=out_dir, samples=samples, classes=classes,
                            num_per_class=num_per_class, cfg=cfg, top_k=top_k, top_p=top_p, seed=seed,
                            batch_size=batch_size, dtype=dtype, log=log, overwrite=overwrite)
  out_dir = out_dir or os.path.dirname(fileio.abspath(samples))
  fileio.makedirs(out_dir)
  split = split or (data_config.eval_split if data_config is not None else None)
  feats = None
  main = jax.process_index() == 0

  # ---- sample quality ----
  if samples or ref or not (rfid or test_set_loss):
    if not samples:
      labels = protocol.sample_plan(pipe.num_classes, classes, num_per_class)
      samples = protocol.generate_samples(pipe, os.path.join(out_dir, 'samples'), labels, seed=seed, cfg=cfg,
                                          top_k=top_k, top_p=top_p, batch_size=batch_size, dtype=dtype, log=log,
                                          overwrite=overwrite)
      opts = protocol.sampling_options(pipe.family, cfg=cfg, top_k=top_k, top_p=top_p)
    else:
      opts = {}
    if main:
      feats = inception_features(inception, inception_batch)
      fake_set = ImageSet.open(samples)
      t0 = time.time()
      fake = feats.of_set(fake_set)
      log(f'Inception features of {len(fake_set)} samples in {time.time() - t0:.1f}s')
      if ref:
        results.update(sample_metrics(fake, load_reference(ref, feats, ref_cache), k=pr_k, is_split=is_split,
                                      pr_distance_dtype=pr_distance_dtype))
      else:
        logging.warning('no --ref: only the Inception Score is computed')
        results['inception_score'], results['inception_score_std'] = metrics.inception_score(
            fake['logits'], **metrics.is_split_kwargs(is_split, len(fake['logits'])))
        results['is_split'] = is_split
        results['num_samples'] = int(len(fake['logits']))
      results['protocol'] = {**opts, 'seed': seed, 'num_per_class': num_per_class, 'samples': samples,
                             'reference': ref, 'features': f'FID Inception-v3 (pytorch-fid port), '
                             f'{getattr(feats, "preprocessing", "pytorch_fid")} preprocessing'}

  # ---- tokenizer rFID ----
  if rfid and main:
    orig, rec, pix = reconstruction_sets(pipe, data_config, split, batch_size, max_images)
    if len(orig) < 2:
      raise ValueError(f'rFID needs at least 2 images for a covariance: split {split!r} gave {len(orig)}')
    feats = feats or inception_features(inception, inception_batch)
    fo = feats.of_set(ImageSet.from_array(orig, f'{split} originals'))['pool3']
    fr = feats.of_set(ImageSet.from_array(rec, f'{split} reconstructions'))['pool3']
    results['rfid'] = metrics.frechet_distance(*metrics.feature_statistics(fr), *metrics.feature_statistics(fo))
    results.update({f'recon_{k}': v for k, v in pix.items()})
    results['rfid_split'] = split

  # ---- test loss ----
  if test_set_loss and main:
    bs = batch_size - batch_size % jax.local_device_count() or jax.local_device_count()
    results.update(test_loss(pipe, data_config, split, bs, max_batches))
    results['test_split'] = split

  if main:
    write_metrics(out_dir, results, log)
  return results
