"""Token cache (var_jax.data.token_cache): the cached tokens are the frozen VQVAE's tokens of the train views, and
training on them gives the losses of tokenizing in the step (same examples, same flips)."""
import json
import logging
import os
import re
from unittest import mock

import jax
import numpy as np
import pytest
from PIL import Image

from tests_helpers import load_config, quickstart_config
from var_jax import sharding as shd
from var_jax.data import pipeline as data_lib
from var_jax.data import token_cache
from var_jax.data import transforms
from var_jax.models.vqvae import VQVAE
from var_jax.train import errors
from var_jax.train import tasks

N_IMAGES = 20


def _folder(root):
  """A tiny image folder: the first digits as 8x11 (non-square) PNGs, plus one unreadable file."""
  from sklearn.datasets import load_digits
  d = load_digits()
  for split in ('train', 'val'):
    for i in range(N_IMAGES):
      img = np.round(d.images[i] * 255 / 16).astype(np.uint8)
      img = np.concatenate([img, img[:, :3]], axis=1)            # 8 x 11: the flip and the center crop matter
      cdir = root / split / str(d.target[i] % 3)
      cdir.mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.repeat(img[..., None], 3, -1)).save(cdir / f'{i:03d}.png')
  (root / 'train' / '0' / 'zz_bad.png').write_bytes(b'not a png')


def _config(root, **data):
  c = quickstart_config()
  c.model.update(depth=1, embed_dim=32, num_heads=1, num_classes=3)
  c.vae.update(ch_mult=(1, 2, 2))
  c.data.update(name='folder', path=str(root), image_size=16, hflip=True, train_crop='center', read_threads=2,
                max_skip_fraction=0.2)
  c.data.update(**data)
  c.global_batch_size = 8
  c.total_steps = 3
  return c


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('imgs')
  _folder(root)
  return root


def _fake_cache(config, out, fmt):
  """A cache whose token ids name the example and the view: every id of example i, view f is 2 i + f."""
  src = data_lib.make_source(config.data, 'train')
  m = token_cache.make_manifest(config, src, fmt, 8, 'f' * 64)
  os.makedirs(out)
  L = m['seq_len']
  for sh in m['shards']:
    idx = np.arange(sh['begin'], sh['begin'] + sh['count'])
    toks = np.broadcast_to((2 * idx[:, None] + np.arange(2))[..., None], (len(idx), 2, L))
    ok = np.array([not isinstance(transforms.decode_or_marker(src[i]), dict) for i in idx])
    labels = np.array([src[i]['label'] for i in idx])
    token_cache._write_shard(os.path.join(out, sh['file']), fmt, toks, labels, ok, np.dtype(m['token_dtype']))
  token_cache.write_manifest(out, m)
  return src


@pytest.mark.parametrize('fmt', ['array_record', 'npz'])
def test_the_cached_stream_has_the_examples_and_flips_of_the_image_stream(folder, tmp_path, fmt):
  config = _config(folder)
  src = _fake_cache(config, str(tmp_path / 'cache'), fmt)
  s, mid = config.data.image_size, config.data.mid_reso
  views = {}
  for i in range(len(src)):
    img = transforms.decode_or_marker(src[i])
    if not isinstance(img, dict):
      views.update({(i, f): transforms.train_view(img, s, mid, f) for f in (False, True)})
  images = iter(data_lib.make_train_dataset(config.data, 8, seed=5))
  config.data.token_cache = str(tmp_path / 'cache')
  cached = iter(data_lib.make_train_dataset(config.data, 8, seed=5))
  flips = set()
  for _ in range(6):                                               # > 2 epochs, the unreadable image dropped in both
    a, b = next(images), next(cached)
    assert sorted(b) == ['label', 'tokens'] and b['tokens'].dtype == np.int32
    np.testing.assert_array_equal(a['label'], b['label'])
    for img, toks in zip(a['image'], b['tokens']):
      i, f = divmod(int(toks[0]), 2)
      assert (toks == toks[0]).all()
      np.testing.assert_array_equal(img, views[i, bool(f)])
      flips.add(f)
  assert flips == {0, 1}


def test_refusals(folder, tmp_path):
  config = _config(folder)
  out = str(tmp_path / 'cache')
  _fake_cache(config, out, 'npz')
  config.data.token_cache = out
  m = token_cache.check_config(config)
  assert m['crop'] == 'center' and m['patch_nums'] == [1, 2, 3, 4] and m['count'] == N_IMAGES + 1
  with pytest.raises(errors.ConfigError, match=r"config.data.token_cache=.* needs config.data.train_crop='center'.*"
                                               r"got config.data.train_crop='random'"):
    token_cache.check_config(_with(config, data=dict(train_crop='random')))
  with pytest.raises(errors.ConfigError, match="train_crop='center'"):          # the data pipeline too
    data_lib.make_train_dataset(_with(config, data=dict(train_crop='random')).data, 8, seed=0)
  with pytest.raises(errors.DataMismatchError, match=r'patch_nums \(1, 2, 3, 4\) but this config has \(1, 2, 4\)'):
    token_cache.check_config(_with(config, vae=dict(patch_nums=(1, 2, 4))))
  with pytest.raises(errors.DataMismatchError, match=r'vae.vocab_size 256 but this config has 512'):
    token_cache.check_config(_with(config, vae=dict(vocab_size=512)))
  with pytest.raises(errors.DataMismatchError, match=r'data.mid_reso 1.125 but this config has 1.25'):
    token_cache.check_config(_with(config, data=dict(mid_reso=1.25)))
  with pytest.raises(errors.DataMismatchError, match=r'another VQVAE \(vae_ckpt=.*sha256 ffff'):
    token_cache.check_vae(out, {'params': {'w': np.zeros(3, np.float32)}})
  with pytest.raises(errors.ConfigError, match='manifest.json missing'):
    token_cache.check_config(_with(config, data=dict(token_cache=str(tmp_path))))
  with pytest.raises(OSError, match='already holds a token cache'):
    token_cache.build(config, out)
  tok = load_config('vqvae_quickstart')
  tok.data.token_cache = out
  with pytest.raises(errors.ConfigError, match="config.data.token_cache is for task='var'"):
    tasks.build(tok)


@pytest.fixture(scope='module')
def built(folder, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('cache') / 'tokens')
  config = _config(folder)
  lines = []                                     # the progress lines ('log' mode: no terminal under pytest)
  handler = logging.Handler()
  handler.emit = lambda r: lines.append(r.getMessage())
  logger = logging.getLogger('var_jax.train')
  logger.addHandler(handler)
  old_level = logger.level
  logger.setLevel(logging.INFO)
  try:
    with mock.patch.dict(os.environ, {'VAR_JAX_PROGRESS': 'log'}):
      manifest = token_cache.build(config, out, batch_size=6, shard_size=8)   # 3 shards, padded last batches
  finally:
    logger.removeHandler(handler)
    logger.setLevel(old_level)
  assert any(re.fullmatch(rf'token cache: {N_IMAGES + 1} images in \S+, [0-9.]+ images/s', l) for l in lines), lines
  return config, out, manifest


@pytest.mark.slow
def test_cached_tokens_are_the_encodings_of_both_views(built):
  config, out, manifest = built
  src = token_cache.CacheSource(out, config.data)
  images = data_lib.make_source(config.data, 'train')
  assert len(src) == len(images) == N_IMAGES + 1 and manifest['format'] == 'array_record'
  assert len(manifest['shards']) == 3
  task = tasks.build(config, shd.make_mesh({'data': 1}, jax.devices()[:1]), len(images))
  vae = VQVAE(task.vae_cfg)
  enc = jax.jit(lambda v, x: jax.numpy.concatenate(vae.apply(v, x, method=VQVAE.img_to_idx), axis=1))
  s, mid = config.data.image_size, config.data.mid_reso
  n_bad = 0
  for i in range(len(images)):
    rec, img = src[i], transforms.decode_or_marker(images[i])
    assert rec['label'] == images[i]['label']
    if isinstance(img, dict):                                      # the unreadable file
      assert not rec['ok']
      n_bad += 1
      continue
    flipped = np.asarray(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    views = np.stack([transforms.preprocess_eval(img, s, mid),                       # the unflipped center crop
                      transforms.preprocess_eval(Image.fromarray(flipped), s, mid)])  # of the flipped image
    assert not np.array_equal(views[0], views[1])
    np.testing.assert_array_equal(rec['tokens'], np.asarray(enc(task.frozen, views)))
  assert n_bad == 1


def _losses(config, n):
  task = tasks.build(config, None, len(data_lib.make_source(config.data, 'train')))
  it = iter(data_lib.make_train_dataset(config.data, config.global_batch_size, config.seed))
  state, out = task.init_state(), []
  with shd.mesh_context(task.mesh, task.rules):
    for _ in range(n):
      host = next(it)
      state, m = task.jit_step(-1)(state, shd.host_local_to_global(host, task.mesh), task.frozen, np.float32(1))
      out.append((host['label'], float(m['train_loss']), float(m['grad_norm'])))
  return out, sorted(host)


@pytest.mark.slow
def test_training_on_the_cache_matches_tokenizing_in_the_step(built):
  config, out, _ = built
  images, keys_i = _losses(config, 3)
  config.data.token_cache = out
  cached, keys_c = _losses(config, 3)
  assert keys_i == ['image', 'label'] and keys_c == ['label', 'tokens']
  for (li, a, ga), (lc, b, gb) in zip(images, cached):
    np.testing.assert_array_equal(li, lc)
    np.testing.assert_allclose([b, gb], [a, ga], rtol=1e-6, atol=1e-7)


def _with(config, **updates):
  c = config.copy_and_resolve_references()
  for k, v in updates.items():
    c[k].update(v)
  return c
