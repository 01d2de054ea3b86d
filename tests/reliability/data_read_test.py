"""Issue 24, data read wrong without a word: a folder tree's directory symlinks are followed out of the tree but
never back into it or round a loop (warned once), and every PIL mode (16-bit, 32-bit int, float, alpha, palette
with transparency, CMYK, 1-bit) is converted with its true range, by the one conversion (``images.to_rgb``) that
the training pipeline and every reader of sample / reference folders share."""
import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

from var_jax import fileio, images
from var_jax.data import sources, transforms


def _png(path, value=0):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


def test_folder_listing_never_follows_a_link_back_into_the_tree(tmp_path, caplog):
  root = tmp_path / 'root'
  _png(root / 'train' / 'c0' / 'a.png')
  _png(root / 'train' / 'c0' / 'sub' / 'b.png')
  _png(root / 'train' / 'c1' / 'x.png')
  _png(tmp_path / 'elsewhere' / 'y.png')
  os.symlink(root / 'train' / 'c0', root / 'train' / 'c0' / 'sub' / 'loop')        # a loop
  os.symlink(root / 'train', root / 'train' / 'c1' / 'up')                          # back into the tree
  os.symlink(root / 'train' / 'c0' / 'sub', root / 'train' / 'c1' / 'sibling')      # another class's images
  os.symlink(tmp_path / 'elsewhere', root / 'train' / 'c1' / 'ext')                 # out of the tree: followed
  fileio._loop_warned.clear()
  with caplog.at_level(logging.WARNING):
    src = sources.ImageFolderSource(str(root), 'train')
  paths = sorted(os.path.relpath(src[i]['path'], root / 'train') for i in range(len(src)))
  assert paths == ['c0/a.png', 'c0/sub/b.png', 'c1/ext/y.png', 'c1/x.png'], paths
  assert [src[i]['label'] for i in range(len(src))] == [0, 0, 1, 1]
  warnings = [r for r in caplog.records if 'not following' in r.getMessage()]
  assert len(warnings) == 2, caplog.text            # once per class walk that met one (c0: 1 link, c1: 2)
  assert 'lead back into the tree or to a directory already listed (a loop)' in caplog.text
  # the readers of sample / reference folders (evaluate, the sample-folder protocol) list the same way
  found = fileio.find_files(str(root), ('.png',))
  assert sorted(os.path.relpath(f, root) for f in found) == ['train/c0/a.png', 'train/c0/sub/b.png',
                                                             'train/c1/ext/y.png', 'train/c1/x.png']


def _encoded(im, fmt='PNG', **kw):
  buf = io.BytesIO()
  im.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _decode(data):
  return np.asarray(transforms.decode_image({'image': data}))


def test_sixteen_bit_and_other_modes_keep_their_range(tmp_path):
  ramp16 = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)           # 0..65535 in steps of 257
  expect = (np.arange(16 * 16).reshape(16, 16)).astype(np.uint8)                  # exactly v / 257
  for data in (_encoded(Image.fromarray(ramp16)),                                   # PNG I;16
               _encoded(Image.fromarray(ramp16.astype(np.int32)), 'TIFF')):         # mode I
    out = _decode(data)
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out[..., 0], expect)
    np.testing.assert_array_equal(out[..., 2], expect)
  (tmp_path / 'g16.png').write_bytes(_encoded(Image.fromarray(ramp16)))
  np.testing.assert_array_equal(images.read_rgb(str(tmp_path / 'g16.png'))[..., 1], expect)   # evaluate's reader
  # float: [0, 1] scaled by 255
  f = Image.fromarray((expect.astype(np.float32) / 255.0), 'F')
  np.testing.assert_array_equal(np.asarray(images.to_rgb(f))[..., 0], expect)
  # alpha and palette transparency: the colour, alpha dropped; CMYK, 1-bit: full range
  la = Image.fromarray(np.stack([expect, np.zeros_like(expect)], -1), 'LA')
  np.testing.assert_array_equal(_decode(_encoded(la))[..., 0], expect)
  p = Image.fromarray(expect, 'L').convert('P')
  p.info['transparency'] = 0
  np.testing.assert_array_equal(_decode(_encoded(p, transparency=0))[..., 0], expect)
  cmyk = Image.new('CMYK', (2, 2), (0, 0, 0, 0))
  np.testing.assert_array_equal(_decode(_encoded(cmyk, 'JPEG', quality=100)), np.full((2, 2, 3), 255))
  one = Image.fromarray(np.array([[0, 1], [1, 0]], bool)).convert('1')
  np.testing.assert_array_equal(_decode(_encoded(one))[..., 0], [[0, 255], [255, 0]])


def test_a_range_that_cannot_be_told_is_an_error():
  bad = Image.fromarray(np.array([[-5.0, 1e6]], np.float32), 'F')
  with pytest.raises(ValueError, match=r'a F image with values -5..1e\+06: outside 0..65535'):
    images.to_rgb(bad)
  with pytest.raises(transforms.CorruptImageError, match='outside 0..65535'):
    transforms.decode_image({'image': _encoded(bad, 'TIFF')})
