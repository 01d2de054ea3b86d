"""grain input pipelines for VAR training and evaluation.

Train (``make_train_dataset``), infinite and checkpointable::

  MapDataset.source(src) -> shuffle(seed) -> repeat(None, reshuffled every epoch)
    -> random_map(TrainTransform, rng from the seed and the element's position in the global stream)
    -> process blocks (below) -> filter(corrupt, counted) -> to_iter_dataset(read threads)
    -> batch(per_process_batch, drop_remainder=True) -> [mp_prefetch(num_workers)]

yields ``{'image': float32 (b, S, S, 3) in [-1, 1], 'label': int32 (b,)}`` (with ``data.token_cache``:
``{'tokens': int32 (b, L), 'label'}``, the cached tokens of the same elements and flips; ``var_jax.data.token_cache``).
Everything up to the batch is a function of the element index (all MapDataset stages are lazy: a process only
decodes its own elements), so ``it.get_state()`` / ``it.set_state(state)`` resume bit-exactly. Every global batch
of the shuffled stream is split between the processes in contiguous blocks: process ``p`` of ``P`` gets rows
``[p n, (p + 1) n)`` of the single-process batch (``n`` = the per-process batch), identically augmented, so the
global batch — and everything keyed by a row's position in it (label dropout, Bernoulli bits) — does not depend on
the process count.

Eval (``make_eval_dataset``), one pass in source order: process ``p`` reads elements ``p, p + P, p + 2P, ...``,
padded to ``eval_steps(n, b, P, num_workers)`` full batches (the same count on every process) and yields
``{'image', 'label', 'mask': bool (b,)}``; ``mask`` is False for padding (and for unreadable images), so every
readable example counts exactly once across processes.

Multiprocessing (``num_workers > 0``): grain's ``mp_prefetch`` spawns worker processes that each run the pipeline on
a slice of the elements (so batches differ from ``num_workers=0`` ones, and a checkpoint must be resumed with the
same ``num_workers``). grain reads absl flags there: in a program not started with ``absl.app.run`` the flags are
marked parsed with their defaults here (``flags.FLAGS.mark_as_parsed()``), as grain needs. Unreadable-image counting
(``SkipMonitor``) is per worker process. Workers are started with the 'spawn' method: the main module must be
import-safe (``if __name__ == '__main__':``), otherwise the workers die at start and the iterator waits forever.
"""
from __future__ import annotations

from typing import Any, Optional

from absl import flags
import grain
import ml_collections
import numpy as np

from var_jax.data.sources import DigitsSource, ImageFolderSource, TfdsSource
from var_jax.data.transforms import EvalTransform, FilterCorrupt, MaskCorrupt, SkipMonitor, TrainTransform


def default_data_config() -> ml_collections.ConfigDict:
  """The data config with its defaults. ``read_threads`` / ``read_buffer_size`` (optional) size grain's in-process
  thread pool and its prefetch buffer (in elements, per process / worker)."""
  return ml_collections.ConfigDict({
      'name': 'digits',           # 'digits' | 'folder' | 'tfds'
      'path': '',                 # folder: the root holding <train_split>/ and <eval_split>/
      'tfds_name': '',            # tfds: dataset name (prepared as ArrayRecord)
      'tfds_data_dir': None,      # tfds: data_dir (None: TFDS's default)
      'image_size': 256,          # final resolution (the crop)
      'mid_reso': 1.125,          # resize the shorter side to round(mid_reso * image_size) first
      'hflip': False,             # random horizontal flip (train)
      'train_crop': 'random',     # train crop: 'random' (the reference's RandomCrop) or 'center' (the eval crop)
      'token_cache': '',          # a token cache dir (var_jax.data.token_cache; needs train_crop='center'): the
                                  # train stream yields the frozen VQVAE's cached token ids instead of images
      'train_split': 'train',
      'eval_split': 'val',
      'num_workers': 0,           # grain worker processes (0: in-process)
      'worker_buffer_size': 2,    # batches buffered per worker
      'max_skip_fraction': 0.01,  # fail when more unreadable images than this are skipped
      'read_threads': 8,
      'read_buffer_size': 64,
  })


def make_source(data_cfg, split: str):
  """The random-access source named by ``data_cfg.name`` for ``split``."""
  name = data_cfg.name
  if name == 'digits':
    return DigitsSource(split)
  if name == 'folder':
    if not data_cfg.path:
      raise ValueError("data.name='folder' needs data.path (the root holding <split>/<class>/<images>)")
    return ImageFolderSource(data_cfg.path, split)
  if name == 'tfds':
    if not data_cfg.tfds_name:
      raise ValueError("data.name='tfds' needs data.tfds_name")
    return TfdsSource(data_cfg.tfds_name, split, data_cfg.tfds_data_dir)
  raise ValueError(f"unknown data.name {name!r} (expected 'digits', 'folder' or 'tfds')")


def epoch_steps(num_examples: int, global_batch: int) -> int:
  """Steps per epoch, ``ceil(num_examples / global_batch)``, as the reference's ``DistInfiniteBatchSampler``
  (``iters_per_ep``). The train stream is continuous across epochs, so this is the step count only."""
  if global_batch <= 0:
    raise ValueError(f'global_batch must be positive, got {global_batch}')
  return -(-int(num_examples) // int(global_batch))


def _check_sharding(per_process_batch: int, process_index: int, process_count: int):
  if per_process_batch <= 0:
    raise ValueError(f'per_process_batch must be positive, got {per_process_batch}')
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f'bad process_index={process_index} / process_count={process_count}')


def _ensure_flags_parsed():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _finish(ds: grain.MapDataset, data_cfg, per_process_batch: int) -> grain.IterDataset:
  read = grain.ReadOptions(num_threads=int(data_cfg.read_threads),
                           prefetch_buffer_size=int(data_cfg.read_buffer_size))
  out = ds.to_iter_dataset(read).batch(per_process_batch, drop_remainder=True)
  num_workers = int(data_cfg.num_workers)
  if num_workers > 0:
    _ensure_flags_parsed()
    out = out.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=int(data_cfg.worker_buffer_size)))
  return out


def _aug_seed(seed: int) -> int:
  """The augmentation seed, derived from (but not equal to) the shuffle seed."""
  return int(np.random.SeedSequence([int(seed), 0x5A]).generate_state(1)[0])


def make_train_dataset(data_cfg, per_process_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
                       *, source=None, skip_monitor: Optional[SkipMonitor] = None) -> grain.IterDataset:
  """The infinite training stream of this process (see the module docstring). ``source`` overrides
  ``make_source(data_cfg, data_cfg.train_split)``; ``skip_monitor`` (default: a new one with
  ``data_cfg.max_skip_fraction``) counts unreadable images in this process."""
  _check_sharding(per_process_batch, process_index, process_count)
  cache = str(data_cfg.token_cache)
  if cache:     # the same stream, with each element's cached tokens in place of its image (same flip draw)
    from var_jax.data import token_cache
    source = token_cache.CacheSource(cache, data_cfg) if source is None else source
    transform = token_cache.TokenTransform(bool(data_cfg.hflip))
  else:
    source = make_source(data_cfg, data_cfg.train_split) if source is None else source
    transform = TrainTransform(int(data_cfg.image_size), float(data_cfg.mid_reso), bool(data_cfg.hflip),
                               str(data_cfg.train_crop))
  if len(source) == 0:
    raise ValueError(f'empty training source {source!r}')
  monitor = skip_monitor if skip_monitor is not None else SkipMonitor(float(data_cfg.max_skip_fraction))
  ds = grain.MapDataset.source(source).shuffle(seed=int(seed)).repeat(None)
  # The augmentation rng is keyed by the element's position in the global stream (random_map before the process
  # slice, both lazy), so an element's augmentation does not depend on process_count.
  ds = ds.random_map(transform, seed=_aug_seed(seed))
  ds = _ProcessBlocks(ds, per_process_batch, process_index, process_count).filter(FilterCorrupt(monitor))
  return _finish(ds, data_cfg, per_process_batch)


class _ProcessBlocks(grain.MapDataset):
  """Process ``p``'s part of every global batch: its ``b``-th batch holds elements ``[(b P + p) n, (b P + p + 1) n)``
  of the global stream (``n`` = per-process batch, ``P`` processes). The global batch (the processes' blocks in
  order, as ``host_local_to_global`` assembles it) is then the single-process batch, element for element."""

  def __init__(self, parent: grain.MapDataset, per_process_batch: int, process_index: int, process_count: int):
    super().__init__(parent)
    self._n, self._p, self._count = int(per_process_batch), int(process_index), int(process_count)

  def __len__(self) -> int:
    return len(self._parent) // self._count

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    b, o = divmod(int(index), self._n)
    return self._parent[(b * self._count + self._p) * self._n + o]

  def __str__(self) -> str:
    return f'ProcessBlocks(n={self._n}, process={self._p}/{self._count})'


class _EvalShard:
  """Elements ``process_index::process_count`` of ``source`` as records with ``mask`` True, then ``mask`` False
  padding up to ``length``."""

  def __init__(self, source, process_index: int, process_count: int, length: int):
    self.source, self.process_index, self.process_count = source, process_index, process_count
    self.count = len(range(process_index, len(source), process_count))
    self.length = length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if index >= self.count:
      return {'mask': False}
    rec = dict(self.source[self.process_index + index * self.process_count])
    rec['mask'] = True
    return rec


def eval_steps(num_examples: int, per_process_batch: int, process_count: int = 1, num_workers: int = 0) -> int:
  """Batches ``make_eval_dataset`` yields on every process: ``ceil(ceil(n / process_count) / per_process_batch)``,
  rounded up to a multiple of ``num_workers`` when > 0 (each worker process batches its own slice)."""
  per_process = -(-int(num_examples) // int(process_count))
  steps = -(-per_process // int(per_process_batch))
  if num_workers > 0:
    steps = -(-steps // int(num_workers)) * int(num_workers)
  return steps


def make_eval_dataset(data_cfg, per_process_batch: int, process_index: int = 0, process_count: int = 1,
                      *, source=None, skip_monitor: Optional[SkipMonitor] = None) -> grain.IterDataset:
  """One pass over ``data_cfg.eval_split`` (or ``source``) for this process, center-cropped, padded with ``mask``."""
  _check_sharding(per_process_batch, process_index, process_count)
  if source is None:
    source = make_source(data_cfg, data_cfg.eval_split)
  monitor = skip_monitor if skip_monitor is not None else SkipMonitor(float(data_cfg.max_skip_fraction))
  image_size = int(data_cfg.image_size)
  num_workers = int(data_cfg.num_workers)
  length = eval_steps(len(source), per_process_batch, process_count, num_workers) * per_process_batch
  ds = grain.MapDataset.source(_EvalShard(source, process_index, process_count, length))
  ds = ds.map(EvalTransform(image_size, float(data_cfg.mid_reso))).map(MaskCorrupt(monitor, image_size))
  return _finish(ds, data_cfg, per_process_batch)
