"""Sources: sklearn digits, ImageNet-style folders, and a tiny TFDS dataset built and read without TensorFlow."""
import io
import sys

import numpy as np
from PIL import Image
import pytest

from var_jax.data import pipeline, sources, transforms


def test_digits_split_sizes_shapes_and_labels():
  train, val, test = sources.DigitsSource('train'), sources.DigitsSource('val'), sources.DigitsSource('test')
  assert (len(train), len(val), len(test)) == (1500, 297, 297)
  assert train.num_classes == val.num_classes == 10
  rec = train[0]
  assert rec['image'].shape == (8, 8, 3) and rec['image'].dtype == np.uint8
  assert isinstance(rec['label'], int) and 0 <= rec['label'] < 10
  # Gray repeated over RGB, 0..16 scaled to 0..255.
  np.testing.assert_array_equal(rec['image'][..., 0], rec['image'][..., 2])
  from sklearn.datasets import load_digits
  d = load_digits()
  np.testing.assert_array_equal(train[0]['image'][..., 1], np.round(d.images[0] * 255 / 16).astype(np.uint8))
  assert val[0]['label'] == d.target[1500] and val[296]['label'] == d.target[1796]
  np.testing.assert_array_equal(val[5]['image'], test[5]['image'])
  assert max(train[i]['image'].max() for i in range(50)) == 255
  assert sorted({train[i]['label'] for i in range(len(train))}) == list(range(10))
  with pytest.raises(ValueError, match='unknown split'):
    sources.DigitsSource('bogus')


def _png_bytes(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format='PNG')
  return buf.getvalue()


def _write_tree(root, split, files_per_class, classes=('cat', 'dog')):
  for c_i, c in enumerate(classes):
    d = root / split / c
    d.mkdir(parents=True)
    for i in range(files_per_class):
      arr = np.full((6 + i, 7, 3), 10 * c_i + i, np.uint8)
      (d / f'img{i}.png').write_bytes(_png_bytes(arr))


def test_image_folder_source(tmp_path):
  _write_tree(tmp_path, 'train', 3, classes=('b_dog', 'a_cat', 'c_eel'))
  _write_tree(tmp_path, 'val', 1, classes=('c_eel',))
  (tmp_path / 'train' / 'a_cat' / 'notes.txt').write_text('not an image')
  (tmp_path / 'train' / 'a_cat' / 'UPPER.JPEG').write_bytes(b'garbage')  # listed (extension), decoded later
  train = sources.ImageFolderSource(tmp_path, 'train')
  val = sources.ImageFolderSource(tmp_path, 'val')
  assert train.classes == ['a_cat', 'b_dog', 'c_eel'] and train.num_classes == val.num_classes == 3
  assert len(train) == 10 and len(val) == 1
  assert val[0]['label'] == 2 and val[0]['path'].endswith('c_eel/img0.png')
  assert [train[i]['label'] for i in range(len(train))] == [0] * 4 + [1] * 3 + [2] * 3
  assert train[0]['path'].endswith('a_cat/UPPER.JPEG')
  img = transforms.decode_image(train[1])
  assert img.mode == 'RGB' and img.size == (7, 6)
  with pytest.raises(transforms.CorruptImageError, match='UPPER.JPEG'):
    transforms.decode_image(train[0])
  cfg = pipeline.default_data_config()
  cfg.update({'name': 'folder', 'path': str(tmp_path)})
  assert len(pipeline.make_source(cfg, 'val')) == 1
  cfg.name = 'imagenet'
  with pytest.raises(ValueError, match="unknown data.name 'imagenet'"):
    pipeline.make_source(cfg, 'train')


def test_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'train')):
    sources.ImageFolderSource(tmp_path, 'train')
  (tmp_path / 'train' / 'cls').mkdir(parents=True)
  (tmp_path / 'train' / 'cls' / 'readme.txt').write_text('x')
  with pytest.raises(FileNotFoundError, match='no image files'):
    sources.ImageFolderSource(tmp_path, 'train')
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'val')):
    sources.ImageFolderSource(tmp_path, 'val')


def _build_tfds(data_dir, name_suffix, raw):
  """Writes a tiny ArrayRecord TFDS dataset without TensorFlow: images given as PNG bytes (Image feature; tfds only
  needs TF to encode *numpy* images) or as raw uint8 tensors (Tensor feature with encoding='bytes')."""
  import tensorflow_datasets as tfds

  image_feature = (tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding='bytes') if raw
                   else tfds.features.Image(shape=(None, None, 3)))

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')
    name = f'tiny_var_{name_suffix}'

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': image_feature, 'label': tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(7), 'test': self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        arr = np.full((5 + i, 9, 3), 20 * i, np.uint8)
        yield i, {'image': arr if raw else _png_bytes(arr), 'label': i % 3}

  Builder(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  return Builder.name


@pytest.mark.parametrize('raw', [False, True], ids=['png_bytes', 'raw_uint8'])
def test_tfds_source_without_tensorflow(tmp_path, raw):
  name = _build_tfds(tmp_path, 'raw' if raw else 'png', raw)
  assert 'tensorflow' not in sys.modules
  train = sources.TfdsSource(name, 'train', data_dir=tmp_path)
  test = sources.TfdsSource(name, 'test', data_dir=tmp_path)
  assert (len(train), len(test), train.num_classes) == (7, 3, 3)
  seen = set()
  for i in range(len(train)):
    rec = train[i]
    assert isinstance(rec['image'], np.ndarray if raw else bytes)
    arr = np.asarray(transforms.decode_image(rec))
    k = int(arr[0, 0, 0]) // 20
    assert arr.shape == (5 + k, 9, 3) and rec['label'] == k % 3
    seen.add(k)
  assert seen == set(range(7))
  # Through the config and the eval pipeline too (one pass, every example once).
  cfg = pipeline.default_data_config()
  cfg.update({'name': 'tfds', 'tfds_name': name, 'tfds_data_dir': str(tmp_path), 'image_size': 4, 'eval_split': 'test'})
  batches = list(pipeline.make_eval_dataset(cfg, 2))
  assert len(batches) == 2 and sum(int(b['mask'].sum()) for b in batches) == 3
  assert 'tensorflow' not in sys.modules


def test_tfds_source_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match='no_such_dataset'):
    sources.TfdsSource('no_such_dataset', 'train', data_dir=tmp_path)
