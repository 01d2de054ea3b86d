"""The reference augmentation (torchvision Resize(int, LANCZOS) + RandomCrop/CenterCrop + flip) vs direct PIL code."""
import io

import numpy as np
from PIL import Image
import pytest

from var_jax.data import transforms


def _image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _pm1(u8):
  x = u8.astype(np.float32) / np.float32(255)
  return x * np.float32(2) - np.float32(1)


@pytest.mark.parametrize('h, w, resized_wh, top_left', [
    # portrait 37x23 -> shorter side 18, longer int(18 * 37 / 23) = int(28.96) = 28 (truncated, as torchvision)
    (37, 23, (18, 28), (6, 1)),
    # landscape 30x40 -> (int(18 * 40 / 30), 18) = (24, 18); CenterCrop: top round(1.0)=1, left round(4.0)=4
    (30, 40, (24, 18), (1, 4)),
    # already 18x18: returned as is (no resampling); CenterCrop offsets round(2 / 2.0) = 1
    (18, 18, (18, 18), (1, 1)),
    # 21x18: shorter side already 18 (longer int(18 * 21 / 18) = 21), no resampling; top = int(round(1.5)) = 2
    (21, 18, (18, 21), (2, 1)),
])
def test_eval_matches_direct_pil(h, w, resized_wh, top_left):
  arr = _image(h, w)
  final, mid_reso = 16, 1.125  # round(1.125 * 16) = 18
  out = transforms.EvalTransform(final, mid_reso).map({'image': arr, 'label': 3})
  assert out['image'].shape == (16, 16, 3) and out['image'].dtype == np.float32
  assert out['label'] == 3 and out['label'].dtype == np.int32 and bool(out['mask'])
  img = Image.fromarray(arr)
  assert transforms.resize_shorter(img, 18).size == resized_wh
  if resized_wh != (w, h):
    img = img.resize(resized_wh, Image.LANCZOS)
  ref = np.asarray(img)
  rh, rw = ref.shape[:2]
  top, left = int(round((rh - 16) / 2.0)), int(round((rw - 16) / 2.0))
  assert (top, left) == top_left
  np.testing.assert_array_equal(out['image'], _pm1(ref[top:top + 16, left:left + 16]))
  assert out['image'].min() >= -1 and out['image'].max() <= 1


def test_center_crop_rounding():
  # torchvision CenterCrop: int(round((h - th) / 2.0)); Python rounds halves to even.
  assert transforms.center_crop_offsets(19, 18, 16, 16) == (2, 1)
  assert transforms.center_crop_offsets(21, 16, 16, 16) == (2, 0)
  assert transforms.center_crop_offsets(16, 16, 16, 16) == (0, 0)
  assert transforms.mid_size(256, 1.125) == 288 and transforms.mid_size(8, 1.125) == 9
  with pytest.raises(ValueError, match='smaller than the crop'):
    transforms.mid_size(16, 0.9)


@pytest.mark.parametrize('hflip', [False, True])
def test_train_matches_direct_pil(hflip):
  arr = _image(37, 23, seed=1)
  t = transforms.TrainTransform(16, 1.125, hflip=hflip)
  flips = 0
  for seed in range(40):
    out = t.random_map({'image': arr, 'label': 1}, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    img = Image.fromarray(arr)
    if hflip and rng.random() < 0.5:  # flip first, on the original image
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
      flips += 1
    ref = np.asarray(img.resize((18, 28), Image.LANCZOS))
    top, left = rng.integers(0, 28 - 16 + 1), rng.integers(0, 18 - 16 + 1)
    np.testing.assert_array_equal(out['image'], _pm1(ref[top:top + 16, left:left + 16]))
  assert (0 < flips < 40) if hflip else flips == 0


def test_decode_image_variants_and_corrupt(tmp_path):
  arr = _image(5, 6)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format='PNG')
  np.testing.assert_array_equal(np.asarray(transforms.decode_image({'image': buf.getvalue()})), arr)
  gray = arr[..., 0]
  np.testing.assert_array_equal(np.asarray(transforms.decode_image({'image': gray[..., None]})),
                                np.repeat(gray[..., None], 3, -1))
  p = tmp_path / 'x.png'
  p.write_bytes(buf.getvalue())
  np.testing.assert_array_equal(np.asarray(transforms.decode_image({'path': str(p)})), arr)
  bad = tmp_path / 'bad.png'
  bad.write_bytes(b'\x00garbage' * 10)
  with pytest.raises(transforms.CorruptImageError) as e:
    transforms.decode_image({'path': str(bad)})
  assert e.value.source == str(bad) and 'UnidentifiedImageError' in e.value.reason
  with pytest.raises(transforms.CorruptImageError, match='17'):
    transforms.decode_image({'image': b'\x89PNG truncated', 'index': 17})
  with pytest.raises(transforms.CorruptImageError, match='missing.png'):
    transforms.decode_image({'path': str(tmp_path / 'missing.png')})
  # The transforms turn a corrupt image into a marker instead of raising.
  assert transforms.is_corrupt(transforms.TrainTransform(4).random_map({'path': str(bad), 'label': 0},
                                                                       np.random.default_rng(0)))
  assert transforms.is_corrupt(transforms.EvalTransform(4).map({'path': str(bad), 'label': 0, 'mask': True}))


def test_skip_monitor_rule():
  good, bad = {'image': 0}, transforms.corrupt_marker(transforms.CorruptImageError('/x/bad.png', 'broken'))
  m = transforms.SkipMonitor(0.05)
  for i in range(99):
    assert m.observe(bad if i % 10 == 0 else good) == (i % 10 != 0)  # 10 bad in the first 99: not judged yet
  with pytest.raises(transforms.TooManyCorruptImagesError, match=r'10 of 100 .*max_skip_fraction=0.05.*/x/bad.png'):
    m.observe(good)
  m = transforms.SkipMonitor(0.05)
  for _ in range(19):
    m.observe(bad)
  with pytest.raises(transforms.TooManyCorruptImagesError, match='20 of 20'):
    m.observe(bad)
  m = transforms.SkipMonitor(0.05)
  for i in range(1000):
    m.observe(bad if i % 50 == 0 else good)
  assert m.summary() == {'seen': 1000, 'skipped': 20}
