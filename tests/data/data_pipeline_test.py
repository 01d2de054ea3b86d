"""grain train/eval pipelines: batch format, determinism, exact resume, sharding, eval padding, corrupt images."""
import io
import logging

import numpy as np
from PIL import Image
import pytest

from var_jax.data import pipeline, transforms


class IndexSource:
  """n records whose label is their index (with a textured image: flips and crops change it), to track elements."""

  def __init__(self, n):
    self.n, self.num_classes = n, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    i = int(i)
    return {'image': ((np.arange(360).reshape(10, 12, 3) * 7 + i) % 256).astype(np.uint8), 'label': i, 'index': i}


def _cfg(**kw):
  cfg = pipeline.default_data_config()
  cfg.update({'name': 'digits', 'image_size': 8, 'read_threads': 2, 'read_buffer_size': 16, **kw})
  return cfg


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_train_batch_format_and_determinism():
  cfg = _cfg(hflip=True)
  ds = pipeline.make_train_dataset(cfg, 16, seed=3)
  a = _take(iter(ds), 4)
  b = a[0]
  assert set(b) == {'image', 'label'}
  assert b['image'].shape == (16, 8, 8, 3) and b['image'].dtype == np.float32
  assert b['label'].shape == (16,) and b['label'].dtype == np.int32
  assert -1 <= b['image'].min() < 0 < b['image'].max() <= 1
  _assert_same(a, _take(iter(pipeline.make_train_dataset(cfg, 16, seed=3)), 4))
  c = _take(iter(pipeline.make_train_dataset(cfg, 16, seed=4)), 4)
  assert not np.array_equal(a[0]['label'], c[0]['label'])
  assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_exact_resume_across_epochs():
  cfg = _cfg(hflip=True)
  src = IndexSource(30)  # 8-element batches: the 10 batches below span ~3 epochs
  it = iter(pipeline.make_train_dataset(cfg, 8, seed=0, source=src))
  _take(it, 4)
  state = it.get_state()
  expected = _take(it, 6)
  resumed = iter(pipeline.make_train_dataset(cfg, 8, seed=0, source=src))  # a fresh pipeline, as after a restart
  resumed.set_state(state)
  _assert_same(_take(resumed, 6), expected)
  # Each epoch is a permutation of the source (reshuffled every epoch).
  labels = np.concatenate([b['label'] for b in _take(iter(pipeline.make_train_dataset(cfg, 6, 0, source=src)), 10)])
  assert sorted(labels[:30]) == list(range(30)) and sorted(labels[30:]) == list(range(30))
  assert not np.array_equal(labels[:30], labels[30:])


def test_process_sharding_disjoint():
  src = IndexSource(40)
  per_proc = [np.concatenate([b['label'] for b in _take(iter(pipeline.make_train_dataset(
      _cfg(), 4, seed=1, process_index=p, process_count=2, source=src)), 5)]) for p in range(2)]
  assert len(set(per_proc[0]) & set(per_proc[1])) == 0
  assert sorted(np.concatenate(per_proc)) == list(range(40))  # the first epoch, split between the processes
  # Process p's batch b is rows [4p, 4p + 4) of the single-process batch b (same augmentation): the global batch
  # does not depend on the process count.
  single = _take(iter(pipeline.make_train_dataset(_cfg(hflip=True), 8, seed=1, source=src)), 2)
  for p in range(2):
    got = _take(iter(pipeline.make_train_dataset(_cfg(hflip=True), 4, seed=1, process_index=p, process_count=2,
                                                 source=src)), 2)
    for k in ('label', 'image'):
      for b_single, b_proc in zip(single, got):
        np.testing.assert_array_equal(b_single[k][4 * p:4 * p + 4], b_proc[k])
  with pytest.raises(ValueError, match='process_index'):
    pipeline.make_train_dataset(_cfg(), 4, seed=1, process_index=2, process_count=2, source=src)


def test_eval_padding_and_mask():
  src = IndexSource(45)
  cfg = _cfg()
  seen = []
  for p in range(2):
    batches = list(pipeline.make_eval_dataset(cfg, 4, process_index=p, process_count=2, source=src))
    assert len(batches) == pipeline.eval_steps(45, 4, 2) == 6  # ceil(ceil(45 / 2) / 4), the same on both processes
    for b in batches:
      assert b['image'].shape == (4, 8, 8, 3) and b['mask'].dtype == np.bool_ and b['label'].dtype == np.int32
      assert np.all(b['image'][~b['mask']] == 0)
      seen.extend(b['label'][b['mask']].tolist())
    assert sum(int(b['mask'].sum()) for b in batches) == (23, 22)[p]
    assert [int(x) for x in batches[0]['label']] == list(range(p, 8, 2))  # source order, no shuffle
  assert sorted(seen) == list(range(45))
  digits = list(pipeline.make_eval_dataset(cfg, 64))
  assert len(digits) == 5 and sum(int(b['mask'].sum()) for b in digits) == 297
  assert pipeline.epoch_steps(1500, 64) == 24 and pipeline.epoch_steps(1536, 64) == 24


def _png(path, value):
  buf = io.BytesIO()
  Image.fromarray(np.full((9, 11, 3), value, np.uint8)).save(buf, format='PNG')
  path.write_bytes(buf.getvalue())


def _tree(root, n_good, n_bad, split='train'):
  for c in ('a', 'b'):
    (root / split / c).mkdir(parents=True, exist_ok=True)
  for i in range(n_good):
    _png(root / split / ('a', 'b')[i % 2] / f'good{i}.png', 10 * i)
  for i in range(n_bad):
    (root / split / ('a', 'b')[i % 2] / f'bad{i}.png').write_bytes(b'not a png at all ' * 5)


def test_folder_corrupt_skipped_and_counted(tmp_path, caplog):
  _tree(tmp_path, 5, 1)
  _tree(tmp_path, 3, 1, split='val')
  cfg = _cfg(name='folder', path=str(tmp_path), max_skip_fraction=0.5, hflip=True)
  monitor = transforms.SkipMonitor(cfg.max_skip_fraction)
  with caplog.at_level(logging.WARNING):
    batches = _take(iter(pipeline.make_train_dataset(cfg, 4, seed=0, skip_monitor=monitor)), 6)
  assert all(b['image'].shape == (4, 8, 8, 3) for b in batches)
  counts = monitor.summary()
  assert counts['skipped'] >= 4 and counts['seen'] >= 24 + counts['skipped']
  assert 'bad0.png' in caplog.text
  eval_monitor = transforms.SkipMonitor(0.5)
  ev = list(pipeline.make_eval_dataset(cfg, 3, skip_monitor=eval_monitor))
  assert len(ev) == 2 and sum(int(b['mask'].sum()) for b in ev) == 3  # the bad one is masked out, still one pass
  assert eval_monitor.summary() == {'seen': 4, 'skipped': 1}


def test_folder_mostly_corrupt_raises(tmp_path):
  _tree(tmp_path, 2, 8)
  cfg = _cfg(name='folder', path=str(tmp_path))
  it = iter(pipeline.make_train_dataset(cfg, 2, seed=0))
  with pytest.raises(transforms.TooManyCorruptImagesError, match=r'max_skip_fraction=0.01.*bad\d\.png'):
    _take(it, 200)
  all_bad = tmp_path / 'all_bad'
  _tree(all_bad, 0, 3)
  it = iter(pipeline.make_train_dataset(_cfg(name='folder', path=str(all_bad)), 2, seed=0))
  # All bad: fails once 20 are seen (a few more may be counted by grain's read threads meanwhile).
  with pytest.raises(transforms.TooManyCorruptImagesError, match=r'(\d\d) of \1 images .*all are bad'):
    next(it)


def test_multiprocess_workers_resume():
  cfg = _cfg(num_workers=2, worker_buffer_size=1)
  ds = pipeline.make_train_dataset(cfg, 8, seed=0)
  it = iter(ds)
  first = _take(it, 2)
  state = it.get_state()
  expected = _take(it, 2)
  it.close()
  assert first[0]['image'].shape == (8, 8, 8, 3)
  it = iter(ds)
  it.set_state(state)
  _assert_same(_take(it, 2), expected)
  it.close()
