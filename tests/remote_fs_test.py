"""A run that lives entirely in a bucket: training, a sample dump and an evaluation with every path on ``gs://`` — a
local GCS emulator (``tests/fake_gcs.py``), reached by the real remote code (epath -> gcsfs, orbax -> tensorstore's
gcs driver) — and nothing written to the local home directory, the working directory or left in the temp dir."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fake_gcs import FakeGCS
from tests_helpers import REPO, process_env

pytest.importorskip('gcp_storage_emulator')
pytest.importorskip('gcsfs')

pytestmark = pytest.mark.slow

TRAIN_FLAGS = ('--config.model.depth=2', '--config.model.embed_dim=64', '--config.model.num_heads=1',
               '--config.global_batch_size=8', '--config.total_steps=2', '--config.log_every=1',
               '--config.ckpt_every=1', '--config.eval_every=2', '--config.eval_batches=1', '--config.sample_every=2',
               '--config.sample_classes=(0,1)')


@pytest.fixture(scope='module')
def gcs():
  with FakeGCS('var-jax-test') as g:
    yield g


@pytest.fixture(scope='module')
def local(tmp_path_factory):
  """Empty HOME, working and temp directories for the subprocesses (checked to stay empty)."""
  root = tmp_path_factory.mktemp('local')
  dirs = {k: root / k for k in ('home', 'cwd', 'tmp')}
  for d in dirs.values():
    d.mkdir()
  return dirs


def _run(gcs, local, module, *args):
  env = process_env(1, HOME=str(local['home']), TMPDIR=str(local['tmp']), **gcs.env)
  r = subprocess.run([sys.executable, '-m', module, *args], cwd=local['cwd'], env=env, capture_output=True,
                     text=True, timeout=1800)
  assert r.returncode == 0, r.stderr[-4000:]
  return r


def _assert_nothing_local(local):
  for name, d in local.items():
    left = [os.path.relpath(os.path.join(a, f), d) for a, dirs, files in os.walk(d) for f in files + dirs]
    assert not left, f'written to the local {name} directory: {left[:10]}'
  assert not (REPO / 'gs:').exists()


@pytest.fixture(scope='module')
def remote(gcs, monkeypatch_module):
  """This process reads the bucket too (through the same fileio layer)."""
  gcs.activate(monkeypatch_module)
  from var_jax import fileio
  return fileio


@pytest.fixture(scope='module')
def monkeypatch_module():
  mp = pytest.MonkeyPatch()
  yield mp
  mp.undo()


@pytest.fixture(scope='module')
def trained(gcs, local, remote):
  workdir = gcs.root('run')
  _run(gcs, local, 'var_jax.train', f'--config={REPO / "configs" / "quickstart.py"}', f'--workdir={workdir}',
       *TRAIN_FLAGS)
  return workdir


def test_training_run_lives_in_the_bucket(trained, local, remote):
  p = remote.path(trained)
  names = {x.name for x in p.iterdir()}
  assert {'config.json', 'run_info.json', 'metrics.jsonl', 'tensorboard', 'checkpoints', 'model', 'samples'} <= names
  assert 'lock.json' not in names                                           # released at the end
  assert json.loads((p / 'config.json').read_text())['total_steps'] == 2
  assert json.loads((p / 'run_info.json').read_text())['depth'] == 2
  steps = [json.loads(line)['step'] for line in (p / 'metrics.jsonl').read_text().splitlines()]
  assert steps and steps[-1] == 2
  assert any('tfevents' in x.name for x in (p / 'tensorboard').iterdir())
  assert sorted(x.name for x in (p / 'checkpoints').iterdir() if x.name.isdigit())[-1] == '2'
  from PIL import Image
  grid = Image.open(io.BytesIO((p / 'samples' / 'step_00000002.png').read_bytes()))
  assert grid.size[0] > 0
  from var_jax import checkpoint
  vae_cfg, var_cfg, _, var_vars = checkpoint.load_model(trained)           # the export, read back from gs://
  assert var_cfg.depth == 2 and 'params' in var_vars
  _assert_nothing_local(local)


def test_sample_dump_in_the_bucket(gcs, trained, local, remote):
  out_dir, grid = gcs.root('samples'), gcs.root('grid.png')
  _run(gcs, local, 'var_jax.sample', f'--checkpoint={trained}', '--classes=3,7', '--num_per_class=2',
       '--batch_size=4', f'--out_dir={out_dir}', f'--out={grid}')
  pngs = sorted(x.name for x in remote.path(out_dir).iterdir() if x.name.endswith('.png'))
  assert len(pngs) == 4
  with (remote.path(out_dir) / 'samples.npz').open('rb') as f:
    arr = np.load(f)['arr_0']
  assert arr.shape == (4, 32, 32, 3) and arr.dtype == np.uint8
  assert remote.isfile(grid)
  _assert_nothing_local(local)


def _random_inception_file(remote, path):
  """Random pytorch-fid-layout Inception weights (a cheap stand-in), written to ``path`` (gs://)."""
  from safetensors.numpy import save
  from var_jax.eval import inception
  rng = np.random.default_rng(0)
  sd = {}
  for e in inception.param_table():
    if e.key.endswith('running_var'):
      v = rng.uniform(0.5, 2.0, e.shape)
    elif e.key.endswith('bn.weight'):
      v = rng.uniform(0.5, 1.5, e.shape)
    elif e.key.endswith(('bn.bias', 'running_mean')):
      v = rng.normal(0, 0.1, e.shape)
    else:
      v = rng.normal(0, 1.0 / np.sqrt(int(np.prod(e.shape[1:]))), e.shape)
    sd[e.key] = v.astype(np.float32)
  remote.atomic_write_bytes(path, save(sd))


def test_evaluation_in_the_bucket(gcs, trained, local, remote):
  from var_jax import images
  inc, ref, out_dir, cache = gcs.root('inception.safetensors'), gcs.root('ref'), gcs.root('eval'), gcs.root('rc.npz')
  _random_inception_file(remote, inc)
  rng = np.random.default_rng(1)
  for i in range(6):
    images.write_png(f'{ref}/{i // 3}/{i}.png', rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
  _run(gcs, local, 'var_jax.evaluate', f'--checkpoint={trained}', '--classes=0,1', '--num_per_class=3',
       '--batch_size=6', '--inception_batch=6', f'--out_dir={out_dir}', f'--ref={ref}', f'--inception={inc}',
       f'--ref_cache={cache}', '--is_split=equal10', '--pr_distance_dtype=float32')
  res = json.loads((remote.path(out_dir) / 'metrics.json').read_text())
  assert np.isfinite(res['fid']) and res['num_samples'] == 6 and res['num_reference'] == 6
  with (remote.path(out_dir) / 'samples' / 'samples.npz').open('rb') as f:
    assert np.load(f)['arr_0'].shape == (6, 32, 32, 3)
  with remote.path(cache).open('rb') as f:
    assert set(np.load(f).files) >= {'mu', 'sigma'}
  _assert_nothing_local(local)
