r"""Tokenize a VAR training set once: the frozen VQVAE's token ids of every image and of its horizontal flip.

  python -m var_jax.data.token_cache --config=configs/x.py --out=/data/imagenet_tokens
  python -m var_jax.train --config=configs/x.py --config.data.train_crop=center \
      --config.data.token_cache=/data/imagenet_tokens --workdir=...

The reference re-encodes every image every step; with ``config.data.token_cache`` the train stream yields the cached
token ids instead (``var_jax.data.pipeline``: same shuffle, same per-element flip draw ``transforms.draw_flip``, so
the same examples and flips give the same tokens) and the VAR step runs only the cheap teacher-forcing input
(``idx_to_var_input``) and the transformer. A random crop cannot be tokenized ahead, so the cache is defined for the
deterministic train view ``data.train_crop='center'`` (``transforms.train_view``: [flip], resize, center crop — the
reference's eval crop) and training refuses a cache with ``train_crop='random'``.

Layout of ``--out``: shards ``tokens-SSSSS-of-NNNNN.array_record`` (one record per example: int32 label, int32 ok,
then the (2, L) token ids, unflipped then flipped, as ``token_dtype``) — or ``.npz`` shards (``tokens`` (n, 2, L),
``label``, ``ok``) when the array_record package is missing — and ``manifest.json`` (what the cache was built from:
the VQVAE config, checkpoint path and parameter digest, patch_nums, image size, crop recipe, data source, count,
shards), written last: a directory without it is no cache. Shard ``s`` holds examples ``[s k, (s + 1) k)`` (``k`` =
``shard_size``) of the train split in source order and is encoded and written (atomically, ``var_jax.fileio``) by
process ``s % P`` alone; process 0 writes the manifest once all shards are there. Encoding is batched, jitted and
sharded over the process's local devices. An image that cannot be decoded is stored with ``ok`` 0 and dropped by the
train stream as the image path drops it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging as std_logging
import os
import time
from typing import Any, Dict, Optional

import grain
import numpy as np

from var_jax import fileio, progress
from var_jax.data import transforms
from var_jax.train import errors

logging = std_logging.getLogger('var_jax.train')

MANIFEST = 'manifest.json'
VERSION = 1
CROP = 'center'                # the one crop recipe a cache holds (transforms.train_view)
SOURCE_KEYS = ('name', 'path', 'tfds_name', 'train_split')   # data.* naming the source the cache was built from
VIEW_KEYS = ('image_size', 'mid_reso')                        # data.* shaping the images that were encoded


def array_record_available() -> bool:
  try:
    from array_record.python import array_record_module  # noqa: F401  pylint: disable=import-outside-toplevel
    return True
  except ImportError:
    return False


def params_digest(tree) -> str:
  """sha256 over a (host or device, replicated) pytree's leaves in path order: paths, dtypes, shapes and bytes."""
  import jax
  h = hashlib.sha256()
  for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(x, jax.Array):
      x = x.addressable_data(0)          # replicated: every process holds the whole leaf
    a = np.ascontiguousarray(np.asarray(x))
    h.update(f'{jax.tree_util.keystr(p)}|{a.dtype.str}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


# ----------------------------------------------------------------------------- manifest and checks
def _cli_hint(path) -> str:
  return f'rebuild it (python -m var_jax.data.token_cache --config=<this config> --out={path})'


def read_manifest(path: str) -> Dict[str, Any]:
  """The manifest of the cache at ``path`` (``config.data.token_cache``); ConfigError when there is none."""
  f = fileio.path(path) / MANIFEST
  if not f.exists():
    raise errors.ConfigError(f'config.data.token_cache={path}: no token cache there ({MANIFEST} missing); build one '
                             f'with python -m var_jax.data.token_cache --config=<config> --out={path}')
  try:
    m = json.loads(f.read_text())
  except Exception as e:  # noqa: BLE001
    raise errors.ConfigError(f'config.data.token_cache={path}: unreadable {MANIFEST}: {type(e).__name__}: {e}') from e
  if m.get('version') != VERSION:
    raise errors.ConfigError(f'config.data.token_cache={path}: manifest version {m.get("version")!r}, this var_jax '
                             f'reads version {VERSION}: {_cli_hint(path)}')
  return m


def check_data_config(data_cfg):
  """A token cache holds the center-crop views only: refuse it with the random crop."""
  if str(data_cfg.train_crop) != CROP:
    raise errors.ConfigError(
        f"config.data.token_cache={data_cfg.token_cache} needs config.data.train_crop='{CROP}' (a cache holds the "
        f"tokens of the center crop and its flip; a random crop cannot be tokenized ahead), got "
        f"config.data.train_crop={data_cfg.train_crop!r}: set --config.data.train_crop={CROP} or drop the cache")


def _mismatch(path, what, cached, wanted):
  return errors.DataMismatchError(f'config.data.token_cache={path}: the cache was built with {what} {cached!r} but '
                                  f'this config has {wanted!r}: {_cli_hint(path)}')


def _same(a, b) -> bool:
  return json.loads(json.dumps(a)) == json.loads(json.dumps(b))   # tuples vs lists, as stored


def check_manifest(manifest, path, *, data_cfg=None, vae_cfg=None, vae_dtype=None, vae_digest=None):
  """Refuse a cache built for another source / view (``data_cfg``), VQVAE config or patch_nums (``vae_cfg``,
  ``vae_dtype``) or other VQVAE weights (``vae_digest``), naming the first mismatch."""
  if data_cfg is not None:
    check_data_config(data_cfg)
    for k in SOURCE_KEYS + VIEW_KEYS:
      if not _same(manifest['data'][k], data_cfg[k]):
        raise _mismatch(path, f'data.{k}', manifest['data'][k], data_cfg[k])
  if vae_cfg is not None:
    want = dataclasses.asdict(vae_cfg)
    if not _same(manifest['patch_nums'], want['patch_nums']):
      raise _mismatch(path, 'patch_nums', tuple(manifest['patch_nums']), tuple(want['patch_nums']))
    for k in sorted(want):
      if not _same(manifest['vae'].get(k), want[k]):
        raise _mismatch(path, f'vae.{k}', manifest['vae'].get(k), want[k])
  if vae_dtype is not None and manifest['vae_dtype'] != str(vae_dtype):
    raise _mismatch(path, 'vae_dtype', manifest['vae_dtype'], str(vae_dtype))
  if vae_digest is not None and manifest['vae_params_sha256'] != vae_digest:
    raise errors.DataMismatchError(
        f'config.data.token_cache={path}: the cache was built with another VQVAE (vae_ckpt='
        f'{manifest["vae_ckpt"]!r}, parameter sha256 {manifest["vae_params_sha256"][:16]}...) than this config\'s '
        f'(sha256 {vae_digest[:16]}...): {_cli_hint(path)}')


def check_config(config):
  """The training side, before any work: the crop recipe and everything the manifest can tell without the VQVAE's
  weights (``check_vae`` compares those once they are loaded). -> the manifest."""
  from var_jax.models.var_config import VQVAEConfig
  path = str(config.data.token_cache)
  check_data_config(config.data)
  m = read_manifest(path)
  check_manifest(m, path, data_cfg=config.data, vae_cfg=VQVAEConfig(**config.vae.to_dict()),
                 vae_dtype=config.vae_dtype)
  return m


def check_vae(path: str, vae_vars):
  """The loaded frozen VQVAE must be the one the cache at ``path`` was built with."""
  check_manifest(read_manifest(path), path, vae_digest=params_digest(vae_vars))


# ----------------------------------------------------------------------------- reading
def _token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def _encode_record(label: int, ok: bool, tokens: np.ndarray, dtype) -> bytes:
  return np.asarray([label, int(ok)], np.int32).tobytes() + np.ascontiguousarray(tokens, dtype).tobytes()


class CacheSource:
  """The cache at ``path`` as a random-access grain source, element ``i`` (the train split's ``i``-th example):
  ``{'tokens': int32 (2, L) (unflipped, flipped), 'label': int, 'ok': bool, 'index': i}``. ``data_cfg``: checked
  against the manifest first (``check_manifest``)."""

  def __init__(self, path: str, data_cfg=None):
    self.path = os.fspath(path)
    self.manifest = m = read_manifest(self.path)
    if data_cfg is not None:
      check_manifest(m, self.path, data_cfg=data_cfg)
    self.seq_len, self.num_classes, self._count = int(m['seq_len']), int(m['num_classes']), int(m['count'])
    self._dtype = np.dtype(m['token_dtype'])
    files = [os.fspath(fileio.path(self.path) / s['file']) for s in m['shards']]
    missing = [f for f in files if not fileio.exists(f)]
    if missing:
      raise errors.ConfigError(f'config.data.token_cache={self.path}: shard {missing[0]} is missing '
                               f'({len(missing)} of {len(files)}): {_cli_hint(self.path)}')
    if m['format'] == 'array_record':
      self._ds = grain.sources.ArrayRecordDataSource(files)
      self._arrays = None
    else:
      parts = [np.load(f) for f in files]
      self._arrays = {k: np.concatenate([p[k] for p in parts]) for k in ('tokens', 'label', 'ok')}
      self._ds = None
    n = len(self._ds) if self._ds is not None else len(self._arrays['label'])
    if n != self._count:
      raise errors.ConfigError(f'config.data.token_cache={self.path}: the shards hold {n} examples, the manifest '
                               f'{self._count}: {_cli_hint(self.path)}')

  def __len__(self) -> int:
    return self._count

  def __getitem__(self, index: int) -> Dict[str, Any]:
    index = int(index)
    if self._ds is None:
      a = self._arrays
      return {'tokens': a['tokens'][index].astype(np.int32), 'label': int(a['label'][index]),
              'ok': bool(a['ok'][index]), 'index': index}
    rec = self._ds[index]
    head = np.frombuffer(rec, np.int32, 2)
    toks = np.frombuffer(rec, self._dtype, offset=8).reshape(2, self.seq_len).astype(np.int32)
    return {'tokens': toks, 'label': int(head[0]), 'ok': bool(head[1]), 'index': index}

  def __repr__(self) -> str:
    return f'CacheSource({self.path!r}, n={len(self)}, L={self.seq_len})'


class TokenTransform(grain.transforms.RandomMap):
  """Cache element -> ``{'tokens': int32 (L,), 'label': int32}``: the flipped tokens when ``transforms.draw_flip``
  says so (the image path's draw on the same element rng), or a corrupt marker for an image unreadable at build."""

  def __init__(self, hflip: bool):
    self.hflip = bool(hflip)

  def random_map(self, element: Dict[str, Any], rng: np.random.Generator) -> Dict[str, Any]:
    if not element['ok']:
      return transforms.corrupt_marker(transforms.CorruptImageError(element['index'], 'unreadable when the token '
                                                                                      'cache was built'))
    flip = transforms.draw_flip(self.hflip, rng)
    return {'tokens': element['tokens'][int(flip)], 'label': np.int32(element['label'])}


# ----------------------------------------------------------------------------- building
class _Views(grain.transforms.Map):
  """Example index -> both train views of its image (unflipped, flipped) as float32 (2, S, S, 3), label, ok."""

  def __init__(self, source, image_size: int, mid_reso: float):
    self.source, self.size, self.mid = source, int(image_size), float(mid_reso)

  def map(self, index):
    rec = self.source[int(index)]
    img = transforms.decode_or_marker(rec)
    if isinstance(img, dict):
      logging.warning('token cache: example %d is unreadable (%s); stored as not ok', int(index),
                      img[transforms.CORRUPT_KEY][1])
      return {'views': np.zeros((2, self.size, self.size, 3), np.float32), 'label': np.int32(0), 'ok': np.bool_(False)}
    views = np.stack([transforms.train_view(img, self.size, self.mid, f) for f in (False, True)])
    return {'views': views, 'label': np.int32(rec['label']), 'ok': np.bool_(True)}


def shard_name(s: int, num_shards: int, fmt: str) -> str:
  return f'tokens-{s:05d}-of-{num_shards:05d}.{"array_record" if fmt == "array_record" else "npz"}'


def _write_shard(target: str, fmt: str, tokens, labels, ok, dtype):
  if fmt == 'array_record':
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
    with fileio.atomic_path(target) as tmp:
      w = ArrayRecordWriter(tmp, 'group_size:1')
      for t, lab, k in zip(tokens, labels, ok):
        w.write(_encode_record(int(lab), bool(k), t, dtype))
      w.close()
  else:
    fileio.atomic_save(target, lambda f: np.savez(f, tokens=tokens.astype(dtype), label=labels.astype(np.int32),
                                                  ok=ok.astype(np.bool_)))


def make_encoder(config, vae_cfg):
  """(jitted ``fn(vae_vars, images (n, S, S, 3)) -> token ids (n, L)``, the VQVAE's variables, the input
  sharding): the batch split over this process's local devices, the VQVAE replicated on them."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from var_jax.dtypes import parse_dtype
  from var_jax.models.vqvae import VQVAE
  from var_jax.train.tasks import var as var_task
  devs = jax.local_devices()
  mesh = Mesh(np.asarray(devs), ('data',))
  vae_vars = var_task.load_tokenizer(config, vae_cfg, mesh)
  vae = VQVAE(vae_cfg, dtype=parse_dtype(config.vae_dtype, 'config.vae_dtype'))
  data = NamedSharding(mesh, P('data'))

  def encode(v, x):
    return jnp.concatenate(vae.apply(v, x, method=VQVAE.img_to_idx), axis=1)

  return jax.jit(encode, in_shardings=(NamedSharding(mesh, P()), data), out_shardings=data), vae_vars, data


def build(config, out: str, *, source=None, batch_size: int = 64, shard_size: int = 50_000,
          fmt: str = 'auto', log_every_s: float = 30.0) -> Dict[str, Any]:
  """Build the token cache of ``config``'s train split (or ``source``) under ``out`` (see the module docstring),
  on every process of the run (each encodes and writes its shards). ``batch_size``: examples per encoder call
  per process (each encoded twice: unflipped and flipped), rounded up to a multiple of the local device count.
  ``fmt``: 'array_record', 'npz' or 'auto' (ArrayRecord when installed). -> the manifest."""
  import jax
  from var_jax import distributed
  from var_jax.data import pipeline as data_lib
  from var_jax.models.var_config import VQVAEConfig
  data_cfg = config.data
  vae_cfg = VQVAEConfig(**config.vae.to_dict())
  if vae_cfg.image_size != int(data_cfg.image_size):
    raise errors.ConfigError(f'config.data.image_size={data_cfg.image_size} but the tokenizer maps '
                             f'{vae_cfg.image_size}px images to patch_nums {vae_cfg.patch_nums}')
  if fmt == 'auto':
    fmt = 'array_record' if array_record_available() else 'npz'
  if fmt not in ('array_record', 'npz'):
    raise ValueError(f"token cache format {fmt!r}: 'array_record', 'npz' or 'auto'")
  if fmt == 'array_record' and not array_record_available():
    raise ValueError("token cache format 'array_record' needs the array_record package (pip install array-record)")
  if batch_size < 1 or shard_size < 1:
    raise ValueError(f'batch_size={batch_size} and shard_size={shard_size} must be >= 1')
  fileio.check_output_dir(out, '--out')
  if fileio.exists(fileio.path(out) / MANIFEST):
    raise fileio.OutputError(f'--out: {out} already holds a token cache ({MANIFEST}); remove it or choose another '
                             f'directory')
  if source is None:
    source = data_lib.make_source(data_cfg, data_cfg.train_split)
  n = len(source)
  if n == 0:
    raise ValueError(f'empty training source {source!r}')

  encode, vae_vars, in_sharding = make_encoder(config, vae_cfg)
  digest = params_digest(vae_vars)
  n_local = jax.local_device_count()
  b = -(-int(batch_size) // n_local) * n_local
  L = sum(p * p for p in vae_cfg.patch_nums)
  dtype = _token_dtype(vae_cfg.vocab_size)
  num_shards = -(-n // int(shard_size))
  mine = list(range(jax.process_index(), num_shards, jax.process_count()))
  todo = sum(min(n, (s + 1) * shard_size) - s * shard_size for s in mine)
  size = int(data_cfg.image_size)
  logging.info('token cache: %d examples of %r in %d shard(s) (%s); process %d/%d encodes %d examples in %d '
               'shard(s), batch %d on %d local device(s)', n, source, num_shards, fmt, jax.process_index(),
               jax.process_count(), todo, len(mine), b, n_local)
  t0 = time.time()
  bar = progress.Progress(todo, 'token cache', unit='images', log=logging.info, every_s=log_every_s)
  read = grain.ReadOptions(num_threads=int(data_cfg.read_threads), prefetch_buffer_size=int(data_cfg.read_buffer_size))
  for s in mine:
    lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
    ds = grain.MapDataset.range(lo, hi).map(_Views(source, size, float(data_cfg.mid_reso)))
    ds = ds.to_iter_dataset(read).batch(b, drop_remainder=False)
    toks, labels, oks = [], [], []
    for batch in ds:
      k = len(batch['label'])
      views = batch['views']
      if k < b:                               # pad the last batch: one compiled shape
        views = np.concatenate([views, np.zeros((b - k,) + views.shape[1:], views.dtype)])
      x = jax.device_put(views.reshape((2 * b,) + views.shape[2:]), in_sharding)
      ids = np.array(jax.device_get(encode(vae_vars, x))).reshape(b, 2, L)[:k]
      ids[~batch['ok']] = 0
      toks.append(ids)
      labels.append(batch['label'])
      oks.append(batch['ok'])
      bar.update(k)
    target = os.fspath(fileio.path(out) / shard_name(s, num_shards, fmt))
    _write_shard(target, fmt, np.concatenate(toks), np.concatenate(labels), np.concatenate(oks), dtype)
    logging.info('token cache: wrote %s (%d examples)', target, hi - lo)
  bar.close()
  logging.info('token cache: process %d encoded %d examples in %.1f s', jax.process_index(), bar.n, time.time() - t0)

  manifest = make_manifest(config, source, fmt, shard_size, digest)
  distributed.barrier('token cache: shards written')
  if jax.process_index() == 0:
    write_manifest(out, manifest)
  distributed.barrier('token cache: manifest written')
  return manifest


def make_manifest(config, source, fmt: str, shard_size: int, vae_digest: str) -> Dict[str, Any]:
  """The manifest of a cache of ``source`` (the train split of ``config.data``) under ``config``'s VQVAE."""
  from var_jax.models.var_config import VQVAEConfig
  vae_cfg = VQVAEConfig(**config.vae.to_dict())
  n, num_shards = len(source), -(-len(source) // int(shard_size))
  return {
      'version': VERSION, 'format': fmt, 'count': n, 'seq_len': sum(p * p for p in vae_cfg.patch_nums),
      'token_dtype': _token_dtype(vae_cfg.vocab_size).name, 'num_classes': int(source.num_classes), 'crop': CROP,
      'views': ['unflipped', 'flipped'], 'patch_nums': list(vae_cfg.patch_nums),
      'vae': json.loads(json.dumps(dataclasses.asdict(vae_cfg))), 'vae_ckpt': str(config.vae_ckpt),
      'vae_dtype': str(config.vae_dtype), 'vae_params_sha256': vae_digest,
      'seed': int(config.seed),   # the random tokenizer's seed when vae_ckpt is ''
      'data': {k: config.data[k] for k in SOURCE_KEYS + VIEW_KEYS}, 'source': repr(source),
      'shards': [{'file': shard_name(s, num_shards, fmt), 'begin': s * shard_size,
                  'count': min(n, (s + 1) * shard_size) - s * shard_size} for s in range(num_shards)],
  }


def write_manifest(out: str, manifest: Dict[str, Any]):
  """Publish the cache: the manifest, written (atomically) once every shard it lists is there."""
  missing = [sh['file'] for sh in manifest['shards'] if not fileio.exists(fileio.path(out) / sh['file'])]
  if missing:
    raise RuntimeError(f'token cache: shards {missing[:3]} are missing under {out} after every process finished')
  fileio.atomic_write_text(os.fspath(fileio.path(out) / MANIFEST), json.dumps(manifest, indent=1))
  logging.info('token cache: wrote %s (%d examples, %d shards)', fileio.path(out) / MANIFEST, manifest['count'],
               len(manifest['shards']))


# ----------------------------------------------------------------------------- CLI
def main():
  from absl import flags
  FLAGS = flags.FLAGS
  lg = std_logging.getLogger('var_jax')
  if not lg.handlers:
    import sys
    h = std_logging.StreamHandler(sys.stdout)
    h.setFormatter(std_logging.Formatter('%(asctime)s %(levelname).1s %(message)s', '%H:%M:%S'))
    lg.addHandler(h)
    lg.setLevel(std_logging.INFO)
    lg.propagate = False
  build(FLAGS.config, FLAGS.out, batch_size=FLAGS.batch_size, shard_size=FLAGS.shard_size, fmt=FLAGS.format)


if __name__ == '__main__':
  from absl import flags as _flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'path to a configs/*.py file (its data, vae and vae_ckpt)',
                                  lock_config=True)
  _flags.DEFINE_string('out', None, 'output directory of the cache (local or gs://)')
  _flags.DEFINE_integer('batch_size', 64, 'examples per encoder call per process (each encoded unflipped + flipped)')
  _flags.DEFINE_integer('shard_size', 50_000, 'examples per shard file')
  _flags.DEFINE_enum('format', 'auto', ['auto', 'array_record', 'npz'], 'shard format (auto: ArrayRecord if installed)')
  _flags.mark_flags_as_required(['config', 'out'])
  from var_jax import cli
  cli.run(main, errors=(errors.TrainingError, fileio.OutputError, ValueError, FileNotFoundError), multihost=True)
