"""``python -m var_jax.sample``, ``.evaluate`` and ``.probe`` on two processes (jax.distributed on CPU, 2 devices
each) write every output once and the same outputs as one process: sampling keys are per image (fold_in(seed, i))
and each process samples its share on its own devices; metrics and probes are computed the same way."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests_helpers import free_port, process_env
from conftest import REPO, fixture_dir

TIMEOUT = 900


def _launch(module, args, processes):
  """Run ``python -m module args`` on ``processes`` processes (2 devices each); the outputs (stdout + stderr)."""
  cmd = [sys.executable, '-m', module, *map(str, args)]
  if processes == 1:
    r = subprocess.run(cmd, cwd=REPO, env=process_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-5000:]
    return [r.stdout]
  port = free_port()
  procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=process_env(2, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(processes),
                                     JAX_PROCESS_ID=str(i))) for i in range(processes)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p in procs:
    assert p.returncode == 0, '\n\n'.join(o[-5000:] for o in outs)
  return outs


def _count(outs, pattern):
  return sum(len(re.findall(pattern, o, re.M)) for o in outs)


def _pixels(path):
  return np.asarray(Image.open(path).convert('RGB'))


def _no_leftovers(folder):
  left = [f for f in os.listdir(folder) if '.tmp' in f]
  assert not left, left


@pytest.mark.slow
def test_sample_two_processes_match_one(tmp_path):
  d = fixture_dir('tiny')
  # 5 images: 3 on process 0, 2 on process 1; the batch of 4 is 2 per device in both runs
  common = [f'--vae_ckpt={d / "vae.pth"}', f'--var_ckpt={d / "var.pth"}', '--classes=0,5,7,9,3', '--top_k=5',
            '--seed=3', '--batch_size=4']
  runs = {}
  for n in (1, 2):
    out = tmp_path / f'p{n}'
    runs[n] = _launch('var_jax.sample', common + [f'--out={out / "grid.png"}', f'--out_dir={out / "s"}'], n)
  grid_only = _launch('var_jax.sample', common + [f'--out={tmp_path / "p2" / "grid_only.png"}'], 2)
  outs = runs[2]
  assert _count(outs, r'^wrote .*grid\.png \(5 images\)$') == 1
  assert _count(outs, r'^wrote 5 PNGs and samples\.npz') == 1
  assert _count(grid_only, r'^wrote .*grid_only\.png \(5 images\)$') == 1
  per_process = [int(m) for o in outs for m in re.findall(r'^generated (\d+) images', o, re.M)]
  assert sorted(per_process) == [2, 3], outs                 # every image sampled (and its PNG written) once
  one, two = tmp_path / 'p1', tmp_path / 'p2'
  names = sorted(f for f in os.listdir(one / 's') if f.endswith('.png'))
  assert len(names) == 5 and sorted(f for f in os.listdir(two / 's') if f.endswith('.png')) == names
  _no_leftovers(two / 's')
  diffs = [int(np.abs(_pixels(one / 's' / f).astype(int) - _pixels(two / 's' / f)).max()) for f in names]
  print(f'max pixel diff 2 vs 1 process: {max(diffs)}')
  assert max(diffs) == 0, dict(zip(names, diffs))
  np.testing.assert_array_equal(np.load(two / 's' / 'samples.npz')['arr_0'], np.load(one / 's' / 'samples.npz')['arr_0'])
  np.testing.assert_array_equal(_pixels(two / 'grid.png'), _pixels(one / 'grid.png'))
  np.testing.assert_array_equal(_pixels(two / 'grid_only.png'), _pixels(one / 'grid.png'))   # all-gathered


@pytest.mark.slow
def test_evaluate_two_processes_match_one(tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location('_evaluate_cli_test', REPO / 'tests' / 'eval' / 'evaluate_cli_test.py')
  helpers = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(helpers)
  inc = tmp_path / 'inception.safetensors'
  helpers._random_inception_file(inc)
  rng = np.random.default_rng(1)
  ref = tmp_path / 'ref'
  ref.mkdir()
  base = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
  for i in range(10):
    im = np.kron(base + rng.normal(0, 40, (8, 8, 3)), np.ones((8, 8, 1)))
    Image.fromarray(np.clip(im, 0, 255).astype(np.uint8)).save(ref / f'{i}.png')
  d = fixture_dir('tiny')
  res, outs = {}, {}
  for n in (1, 2):
    out = tmp_path / f'ev{n}'
    outs[n] = _launch('var_jax.evaluate', [
        f'--vae_ckpt={d / "vae.pth"}', f'--var_ckpt={d / "var.pth"}', '--classes=2,5', '--num_per_class=4',
        f'--out_dir={out}', f'--ref={ref}', f'--inception={inc}', f'--ref_cache={tmp_path / f"rc{n}.npz"}',
        '--inception_batch=8', '--batch_size=4', '--is_split=equal10', '--pr_distance_dtype=float32'], n)
    res[n] = json.loads((out / 'metrics.json').read_text())
    _no_leftovers(out)
    _no_leftovers(out / 'samples')
  assert _count(outs[2], r'^wrote .*metrics\.json$') == 1 and _count(outs[2], r'^wrote 8 PNGs and samples') == 1
  assert sorted(int(m) for o in outs[2] for m in re.findall(r'^generated (\d+) images', o, re.M)) == [4, 4]
  a1 = np.load(tmp_path / 'ev1' / 'samples' / 'samples.npz')['arr_0']
  np.testing.assert_array_equal(np.load(tmp_path / 'ev2' / 'samples' / 'samples.npz')['arr_0'], a1)
  assert sorted(res[2]) == sorted(res[1])
  print('metric diffs 2 vs 1 process:', {k: abs(res[2][k] - v) for k, v in res[1].items() if isinstance(v, float)})
  for k, v in res[1].items():
    if isinstance(v, float):
      assert res[2][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    elif k != 'protocol':
      assert res[2][k] == v, k
  assert {k: v for k, v in res[2]['protocol'].items() if k != 'samples'} == \
      {k: v for k, v in res[1]['protocol'].items() if k != 'samples'}


@pytest.mark.slow
def test_probe_two_processes_match_one(tmp_path):
  res, outs = {}, {}
  for n in (1, 2):
    out = tmp_path / f'probe{n}.json'
    outs[n] = _launch('var_jax.probe', ['--random_init_config=quickstart', '--layers=0,3', '--max_train_examples=400',
                                        '--max_val_examples=150', '--probe_steps=100', f'--json_out={out}'], n)
    res[n] = json.loads(out.read_text())
  assert _count(outs[2], r'^wrote .*probe2\.json$') == 1 and _count(outs[2], r'^best layer:') == 1
  assert 'process 0 of 2' in outs[2][0]
  for k in ('num_train', 'num_val', 'num_classes', 'best_layer'):
    assert res[2][k] == res[1][k], k
  assert res[2]['best_val_acc'] == pytest.approx(res[1]['best_val_acc'], abs=1e-6)
  print('probe diffs 2 vs 1 process:', [{k: abs(b[k] - a[k]) for k in ('train_acc', 'val_acc', 'train_loss')}
                                         for a, b in zip(res[1]['layers'], res[2]['layers'])])
  for a, b in zip(res[1]['layers'], res[2]['layers']):
    assert a['layer'] == b['layer']
    for k in ('train_acc', 'val_acc', 'train_loss'):
      assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a['layer'], k)
