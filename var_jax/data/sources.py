"""Random-access image sources for the grain input pipeline.

Every source has ``__len__``, ``__getitem__(i) -> dict`` and ``num_classes``. Records are cheap to produce: the image
is decoded later, in the transform (so that decoding runs in grain's prefetch threads / worker processes):

* ``DigitsSource``: ``{'image': uint8 (8, 8, 3) RGB array, 'label': int, 'index': int}`` (no download).
* ``ImageFolderSource``: ``{'path': str, 'label': int}`` (a local or remote tree, e.g. ``gs://``).
* ``TfdsSource``: ``{'image': encoded bytes (tfds ``Image`` feature) or uint8 (H, W, 3) array (tfds ``Tensor`` feature),
  'label': int, 'index': int}``.

Sources are plain picklable objects: grain's multiprocess workers receive a (cloud)pickled copy.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from var_jax import fileio

# torchvision's ``IMG_EXTENSIONS`` (ImageFolder), compared case-insensitively.
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')

DIGITS_NUM_EVAL = 297


class _LabelledSource:
  """A random-access source over ``self._labels`` (one int label per element); ``_record(i)`` builds element i."""

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._record(int(index))


class DigitsSource(_LabelledSource):
  """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), as RGB uint8.

  Deterministic split by position in ``sklearn.datasets.load_digits()``: ``'train'`` is the first 1500 images,
  ``'val'`` and ``'test'`` (the same images) the last 297. Pixel values 0..16 are scaled to 0..255 with
  ``round(x * 255 / 16)`` and the gray channel is repeated to 3 channels. Ships with scikit-learn: no download.
  """

  def __init__(self, split: str = 'train'):
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    n_train = len(images) - DIGITS_NUM_EVAL
    if split == 'train':
      sl = slice(0, n_train)
    elif split in ('val', 'validation', 'test'):
      sl = slice(n_train, len(images))
    else:
      raise ValueError(f"DigitsSource: unknown split {split!r} (expected 'train', 'val' or 'test')")
    self.split = split
    self._images = np.ascontiguousarray(np.repeat(images[sl, :, :, None], 3, axis=-1))
    self._labels = labels[sl]
    self._offset = sl.start
    self.num_classes = 10

  def _record(self, index: int) -> dict[str, Any]:
    return {'image': self._images[index], 'label': int(self._labels[index]), 'index': self._offset + index}

  def __repr__(self) -> str:
    return f'DigitsSource(split={self.split!r}, n={len(self)})'


def _is_image_file(name: str) -> bool:
  return name.lower().endswith(IMG_EXTENSIONS)


def _subdirs(d: str) -> list[str]:
  """The sorted names of ``d``'s subdirectories (local or remote, through ``var_jax.fileio``)."""
  if not fileio.is_remote(d):
    return sorted(e.name for e in os.scandir(d) if e.is_dir())
  return sorted(p.name for p in fileio.path(d).iterdir() if p.is_dir())


def _image_files(split_dir: str, c: str) -> list[str]:
  """The image files below ``split_dir/c`` (recursive), relative to ``split_dir``, in ``sorted(os.walk)`` order
  (directory by directory, then file names); local or remote (one listing per directory). Local directory links
  are followed except back into ``split_dir`` or round a loop (``fileio.walk_local``: warned once), so no image is
  listed twice."""
  cdir = os.path.join(split_dir, c)
  out = []
  if not fileio.is_remote(cdir):
    walk = sorted((dirpath, filenames) for dirpath, _, filenames in fileio.walk_local(cdir, tree=split_dir))
    for dirpath, filenames in walk:
      out += [os.path.relpath(os.path.join(dirpath, f), split_dir) for f in sorted(filenames) if _is_image_file(f)]
    return out
  base = cdir.split('://', 1)[1].rstrip('/')    # epath's walk gives remote dirpaths without the scheme
  for dirpath, _, filenames in sorted(fileio.path(cdir).walk(), key=lambda t: os.fspath(t[0])):
    sub = os.path.relpath(os.fspath(dirpath).split('://', 1)[-1], base)
    out += [os.path.normpath(os.path.join(c, sub, f)) for f in sorted(filenames) if _is_image_file(f)]
  return out


class ImageFolderSource(_LabelledSource):
  """An ImageNet-style tree ``root/<split>/<class_name>/**/*.{jpg,jpeg,png,...}`` (torchvision ``ImageFolder``).

  Class indices come from the sorted subdirectory names of ``root/train``, whatever ``split`` is, so train and
  validation share the label space (a class directory of another split that ``root/train`` lacks is an error; one
  without images is allowed there). Files are listed recursively below each class directory, sorted, with the
  extensions in ``IMG_EXTENSIONS`` (any case). Records are ``{'path': str, 'label': int}``; the file is opened by the
  transform. Paths are kept as one numpy bytes array (compact to pickle into worker processes).
  """

  def __init__(self, root: str | os.PathLike, split: str = 'train'):
    self.root = os.fspath(root)
    self.split = split
    class_root = os.path.join(self.root, 'train')
    split_dir = os.path.join(self.root, split)
    for d in (class_root, split_dir):
      if not fileio.isdir(d):
        raise FileNotFoundError(f'ImageFolderSource: directory {d!r} does not exist (expected an ImageNet-style '
                                f'tree root/<split>/<class_name>/<image files>, root={self.root!r})')
    self.classes = _subdirs(class_root)
    if not self.classes:
      raise FileNotFoundError(f'ImageFolderSource: no class subdirectories in {class_root!r}')
    self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
    split_classes = _subdirs(split_dir)
    unknown = [c for c in split_classes if c not in self.class_to_idx]
    if unknown:
      raise ValueError(f'ImageFolderSource: class directories {unknown[:5]} of {split_dir!r} are not in '
                       f'{class_root!r} (the class list comes from the train split)')
    paths, labels = [], []
    for c in split_classes:
      for p in _image_files(split_dir, c):
        paths.append(p)
        labels.append(self.class_to_idx[c])
    if not paths:
      raise FileNotFoundError(f'ImageFolderSource: no image files ({", ".join(IMG_EXTENSIONS)}) found under '
                              f'{split_dir!r}')
    self._split_dir = split_dir
    self._paths = np.array([p.encode('utf-8') for p in paths], dtype=np.bytes_)
    self._labels = np.asarray(labels, np.int32)
    self.num_classes = len(self.classes)

  def _record(self, index: int) -> dict[str, Any]:
    path = os.path.join(self._split_dir, self._paths[index].decode('utf-8'))
    return {'path': path, 'label': int(self._labels[index])}

  def __repr__(self) -> str:
    return f'ImageFolderSource(root={self.root!r}, split={self.split!r}, n={len(self)}, classes={self.num_classes})'


class TfdsSource:
  """A prepared TFDS dataset in ArrayRecord format, read with ``tfds.data_source`` and no TensorFlow.

  ``tfds.features.Image`` images are read with ``decoders={image_key: tfds.decode.SkipDecoding()}``: records carry the
  encoded bytes, decoded with PIL by the transform. ``tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8,
  encoding='bytes')`` images (raw pixels) come back as uint8 arrays. Neither needs TensorFlow. The dataset must
  already be prepared on disk with ``file_format='array_record'`` (``tfds build --file_format=array_record``, or a
  ``GeneratorBasedBuilder`` that yields images as encoded bytes / PIL images; note that tfds encodes *numpy* images
  for an ``Image`` feature with TensorFlow). Nothing is downloaded (``download=False``). ``num_classes`` is the label
  feature's ``ClassLabel.num_classes``.
  """

  def __init__(self, name: str, split: str, data_dir: Optional[str | os.PathLike] = None, *,
               image_key: str = 'image', label_key: str = 'label'):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    self.name, self.split = name, split
    self.data_dir = None if data_dir is None else os.fspath(data_dir)
    self.image_key, self.label_key = image_key, label_key
    try:
      builder = tfds.builder(name, data_dir=self.data_dir)
      info = builder.info
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise FileNotFoundError(f'TfdsSource: cannot load the TFDS dataset {name!r} from data_dir={self.data_dir!r}: '
                              f'{type(e).__name__}: {e}') from e
    features = info.features
    for key in (image_key, label_key):
      if key not in features:
        raise KeyError(f'TfdsSource: dataset {name!r} has no feature {key!r} (features: {list(features.keys())})')
    decoders = {image_key: tfds.decode.SkipDecoding()} if isinstance(features[image_key], tfds.features.Image) else None
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=self.data_dir, download=False, decoders=decoders)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise FileNotFoundError(f'TfdsSource: cannot open split {split!r} of {name!r} (data_dir={self.data_dir!r}) as '
                              f'an ArrayRecord data source (prepare it with file_format="array_record"): '
                              f'{type(e).__name__}: {e}') from e
    self.num_classes = int(features[label_key].num_classes)

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    rec = self._ds[index]
    return {'image': rec[self.image_key], 'label': int(rec[self.label_key]), 'index': index}

  def __repr__(self) -> str:
    return f'TfdsSource(name={self.name!r}, split={self.split!r}, n={len(self)}, classes={self.num_classes})'
