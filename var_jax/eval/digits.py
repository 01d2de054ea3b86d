"""The digits quality score: how good a class-conditional model trained on the built-in digits is.

Two numbers for a set of class-conditional samples (images in [0, 1], the labels they were asked for):

* **class accuracy** (%): the fraction of samples that a classifier fit on the *real training split* (never on
  samples) labels as the class they were drawn for. An RBF support-vector machine on standardised features; it labels
  the real held-out split correctly ~95% of the time, which is the ceiling printed beside a model's number.
* **Frechet distance** (``fd``): between the Gaussians of the samples' features and of the real held-out split's, in a
  fixed feature space: the first ``pca_dims`` principal components of the real training split. The reference point
  ``real_fd`` is the distance of as many real *training* images (the same number per class) to the same held-out
  split: a model whose samples were real digits would score about that.

The feature of an image is the digit as scikit-learn stores it: grayscale, area-pooled to 8 x 8 (the images are 8 x 8
digits upsampled by the data pipeline), taken from the same view the model trained on (``data.image_size``,
``data.mid_reso``: the eval transform's resize and center crop). Both the classifier and the PCA basis are
deterministic functions of the training split, so scores are comparable across runs, families and machines.

What it is not: not FID (no Inception network; a 32-dimensional linear feature space of 8 x 8 pixels, fit on 1500
images; the distance is biased by the sample count, so compare numbers at the same count: 50 per class, 500 in all,
as the quickstarts and ``python -m var_jax.evaluate --digits`` use). It answers "do the samples look like the digits
they were asked for, with the variety of the real ones", which is what a model of this data must get right.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from var_jax.data import sources as sources_lib
from var_jax.data import transforms as transforms_lib
from var_jax.eval import metrics as metrics_lib

FEATURE_SIZE = 8          # scikit-learn's digits are 8 x 8: pool back to that
PCA_DIMS = 32
NUM_CLASSES = 10


def _views(split: str, image_size: int, mid_reso: float):
  """The real ``split`` as the model sees it at eval: (float32 (N, S, S, 3) in [0, 1], int labels (N,))."""
  src = sources_lib.DigitsSource(split)
  view = transforms_lib.EvalTransform(image_size, mid_reso)
  imgs, labels = [], []
  for i in range(len(src)):
    rec = view.map(src[i])
    imgs.append(rec['image'])
    labels.append(int(rec['label']))
  return (np.stack(imgs).astype(np.float32) + 1.0) / 2.0, np.asarray(labels, np.int64)


def features(images) -> np.ndarray:
  """(N, S, S, C) images in [0, 1] -> (N, 64) float64: grayscale, area-pooled to 8 x 8, scaled to 0..16 (the range of
  scikit-learn's digits). S must be a multiple of 8."""
  x = np.asarray(images, np.float64)
  if x.ndim != 4 or x.shape[1] != x.shape[2]:
    raise ValueError(f'digits features: images must be (N, S, S, C), got shape {x.shape}')
  n, s = x.shape[0], x.shape[1]
  if s % FEATURE_SIZE:
    raise ValueError(f'digits features: image size {s} is not a multiple of {FEATURE_SIZE}')
  if not np.all(np.isfinite(x)):
    raise ValueError('digits features: the images have non-finite values')
  g = x.mean(axis=-1)
  f = s // FEATURE_SIZE
  g = g.reshape(n, FEATURE_SIZE, f, FEATURE_SIZE, f).mean(axis=(2, 4))
  return np.clip(g, 0.0, 1.0).reshape(n, -1) * 16.0


def per_class_first(labels, per_class: int) -> np.ndarray:
  """Indices of the first ``per_class`` examples of each class (sorted)."""
  labels = np.asarray(labels)
  idx = [np.flatnonzero(labels == c)[:per_class] for c in range(NUM_CLASSES)]
  return np.sort(np.concatenate(idx))


@dataclasses.dataclass
class DigitsScorer:
  """Fit once per (image_size, mid_reso) view (``scorer(image_size, mid_reso)`` caches it); ``score`` any samples."""
  image_size: int
  mid_reso: float

  def __post_init__(self):
    from sklearn.decomposition import PCA  # pylint: disable=import-outside-toplevel
    from sklearn.pipeline import make_pipeline  # pylint: disable=import-outside-toplevel
    from sklearn.preprocessing import StandardScaler  # pylint: disable=import-outside-toplevel
    from sklearn.svm import SVC  # pylint: disable=import-outside-toplevel
    tr_x, self.train_labels = _views('train', self.image_size, self.mid_reso)
    ho_x, self.heldout_labels = _views('val', self.image_size, self.mid_reso)
    self.train_features, self.heldout_features = features(tr_x), features(ho_x)
    self.classifier = make_pipeline(StandardScaler(), SVC(C=10.0, gamma='scale'))
    self.classifier.fit(self.train_features, self.train_labels)
    self.pca = PCA(PCA_DIMS, svd_solver='full').fit(self.train_features)
    self._heldout_stats = metrics_lib.feature_statistics(self.pca.transform(self.heldout_features))

  def classify(self, images) -> np.ndarray:
    return self.classifier.predict(features(images))

  def frechet(self, images) -> float:
    mu, sigma = metrics_lib.feature_statistics(self.pca.transform(features(images)))
    return float(metrics_lib.frechet_distance(mu, sigma, *self._heldout_stats))

  @functools.cached_property
  def reference(self) -> Dict[str, float]:
    """The real data's own score: the classifier on the held-out split, and the Frechet distance of 50 real training
    images per class to the held-out split (the count of a 50-per-class sample set)."""
    acc = 100.0 * float(np.mean(self.classifier.predict(self.heldout_features) == self.heldout_labels))
    idx = per_class_first(self.train_labels, 50)
    mu, sigma = metrics_lib.feature_statistics(self.pca.transform(self.train_features[idx]))
    return {'real_class_acc': acc, 'real_fd': float(metrics_lib.frechet_distance(mu, sigma, *self._heldout_stats))}

  def score(self, images, labels) -> Dict[str, float]:
    """``images`` (N, S, S, C) in [0, 1] drawn for ``labels`` (N,) -> class_acc (%), fd, per-class accuracy
    (``class_acc/<c>``), and the real reference points (``real_class_acc``, ``real_fd``)."""
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1)
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
      raise ValueError(f'digits score: {images.shape[0] if images.ndim else 0} images for {labels.shape[0]} labels '
                       f'(images must be (N, S, S, C))')
    if images.shape[0] < 2:
      raise ValueError(f'digits score: need at least 2 samples for a Frechet distance, got {images.shape[0]}')
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
      raise ValueError(f'digits score: labels must be in [0, {NUM_CLASSES}), got {labels.min()}..{labels.max()}')
    pred = self.classify(images)
    out = {'class_acc': 100.0 * float(np.mean(pred == labels)), 'fd': self.frechet(images)}
    for c in range(NUM_CLASSES):
      sel = labels == c
      if sel.any():
        out[f'class_acc/{c}'] = 100.0 * float(np.mean(pred[sel] == c))
    out.update(self.reference)
    return out


@functools.lru_cache(maxsize=4)
def scorer(image_size: int, mid_reso: float) -> DigitsScorer:
  return DigitsScorer(int(image_size), float(mid_reso))


def balanced_labels(per_class: int, classes: Optional[Sequence[int]] = None) -> np.ndarray:
  """``per_class`` of each class in ``classes`` (default 0..9), class-major: [0]*n + [1]*n + ..."""
  classes = range(NUM_CLASSES) if classes is None else classes
  return np.repeat(np.asarray(list(classes), np.int32), int(per_class))


def view_of(config=None, run_path: Optional[str] = None) -> Tuple[int, float]:
  """(image_size, mid_reso) of a digits model: ``config.data`` when given, else the ``config.json`` of the training
  run ``run_path`` is in (the run directory itself, or its parent for VAR's ``<run>/model``). An error names what
  it looked for."""
  import json  # pylint: disable=import-outside-toplevel
  from var_jax import fileio  # pylint: disable=import-outside-toplevel
  if config is not None:
    data = config.data
  else:
    tried = []
    data = None
    for d in ([run_path, f'{run_path}/..'] if run_path else []):
      path = f'{fileio.abspath(d)}/config.json'
      tried.append(path)
      if fileio.exists(path):            # a training run's config (VAR's model/ has a config.json without data)
        data = json.loads(fileio.path(path).read_text()).get('data')
        if data is not None:
          break
    if data is None:
      raise ValueError(f'--digits needs the data view the model trained on: give --config=<its config> (no '
                       f'training config.json with a data section at {" or ".join(tried) if tried else "--checkpoint"})')
  if data['name'] != 'digits':
    raise ValueError(f'--digits scores models of the built-in digits, but the config\'s data.name is '
                     f'{data["name"]!r}')
  return int(data['image_size']), float(data['mid_reso'])


def format_score(s: Dict[str, float]) -> str:
  """One line: the model's numbers with the real data's beside them."""
  worst = min((v, k.split('/')[1]) for k, v in s.items() if k.startswith('class_acc/'))
  return (f'digits quality: class accuracy {s["class_acc"]:.1f}% (real held-out {s["real_class_acc"]:.1f}%, worst '
          f'class {worst[1]}: {worst[0]:.0f}%), Frechet distance {s["fd"]:.2f} (real train vs held-out '
          f'{s["real_fd"]:.2f}; {s["fd"] / max(s["real_fd"], 1e-12):.2f}x)')
