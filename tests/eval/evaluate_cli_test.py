"""``python -m var_jax.evaluate`` end to end: generation -> PNG round trip -> Inception -> FID/IS/P-R against a
folder reference (checked against the library computed by hand on the written files), the reference cache, the
--samples path, rFID and test loss on the built-in data; and the errors for missing inputs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, fixture_dir
from var_jax.eval import evaluator, inception, metrics
from var_jax.interop.state_dict import save_state_dict


def _random_inception_file(path):
  """Random pytorch-fid-layout weights (non-trivial BN statistics) without compiling the network."""
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
      fan_in = int(np.prod(e.shape[1:]))
      v = rng.normal(0, 1.0 / np.sqrt(fan_in), e.shape)
    sd[e.key] = v.astype(np.float32)
  save_state_dict(sd, str(path))


def _run(*args):
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'var_jax.evaluate', *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)


@pytest.mark.slow
def test_evaluate_cli_end_to_end(tmp_path):
  inc_path = tmp_path / 'inception.safetensors'
  _random_inception_file(inc_path)
  d = fixture_dir('tiny')
  rng = np.random.default_rng(1)
  ref_dir = tmp_path / 'ref'
  os.makedirs(ref_dir)
  base = rng.integers(0, 256, (1, 8, 8, 3)).astype(np.float32)
  for i in range(10):   # smooth-ish images, 64x64 like the tiny model's samples
    im = np.kron(base[0] + rng.normal(0, 40, (8, 8, 3)), np.ones((8, 8, 1)))
    Image.fromarray(np.clip(im, 0, 255).astype(np.uint8)).save(ref_dir / f'{i}.png')
  out = tmp_path / 'ev'
  r = _run(f'--vae_ckpt={d / "vae.pth"}', f'--var_ckpt={d / "var.pth"}', '--classes=2,5', '--num_per_class=4',
           f'--out_dir={out}', f'--ref={ref_dir}', f'--inception={inc_path}', f'--ref_cache={tmp_path / "rc.npz"}',
           '--inception_batch=8', '--batch_size=8', '--is_split=equal10', '--pr_distance_dtype=float32')
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((out / 'metrics.json').read_text())
  for k in ('fid', 'inception_score', 'precision', 'recall'):
    assert k in res and np.isfinite(res[k]), (k, res)
  assert res['num_samples'] == 8 and res['num_reference'] == 10
  assert res['protocol']['cfg'] == 1.5 and res['protocol']['top_k'] == 900
  # by hand from the files the CLI wrote
  fake_u8 = np.load(out / 'samples' / 'samples.npz')['arr_0']
  assert fake_u8.shape == (8, 64, 64, 3) and len([f for f in os.listdir(out / 'samples') if f.endswith('.png')]) == 8
  params = inception.load_inception_params(str(inc_path))
  ref_u8 = np.stack([np.asarray(Image.open(ref_dir / f'{i}.png')) for i in range(10)])
  pf, lf = inception.extract_features(params, fake_u8, batch_size=8)
  pr, _ = inception.extract_features(params, ref_u8, batch_size=10)
  fid = metrics.frechet_distance(*metrics.feature_statistics(pf), *metrics.feature_statistics(pr))
  np.testing.assert_allclose(res['fid'], fid, rtol=1e-3)
  np.testing.assert_allclose(res['inception_score'], metrics.inception_score(lf, splits=8)[0], rtol=1e-4)
  p, rc = metrics.precision_recall(pr, pf, k=3)
  assert (res['precision'], res['recall']) == pytest.approx((p, rc), abs=1e-6)
  # the cache now holds the reference; evaluating the npz again (no model) gives the same numbers
  assert (tmp_path / 'rc.npz').exists()
  r = _run(f'--samples={out / "samples" / "samples.npz"}', f'--ref={ref_dir}', f'--inception={inc_path}',
           f'--ref_cache={tmp_path / "rc.npz"}', '--inception_batch=8', f'--out_dir={tmp_path / "ev2"}',
           '--is_split=equal10', '--pr_distance_dtype=float32')
  assert r.returncode == 0, r.stderr[-3000:]
  res2 = json.loads((tmp_path / 'ev2' / 'metrics.json').read_text())
  assert res2['fid'] == pytest.approx(res['fid'], rel=1e-6)
  assert res2['precision'] == res['precision'] and res2['recall'] == res['recall']


@pytest.mark.slow
def test_evaluate_cli_rfid_and_test_loss(tmp_path):
  import jax
  from tests_helpers import quickstart_config
  from var_jax import VARPipeline
  from var_jax.train.tasks import var as var_task
  inc_path = tmp_path / 'inception.safetensors'
  _random_inception_file(inc_path)
  vae_cfg, var_cfg = var_task.model_configs(quickstart_config())
  VARPipeline.init_random(vae_cfg, var_cfg, jax.random.key(0)).save_checkpoint(str(tmp_path / 'model'))
  r = _run('--config=configs/quickstart.py', f'--checkpoint={tmp_path / "model"}', '--rfid', '--test_loss',
           '--config.model.depth=2', '--config.model.embed_dim=64', '--config.model.num_heads=1',
           '--max_images=12', '--max_batches=2', '--batch_size=8', '--inception_batch=12', f'--inception={inc_path}',
           f'--out_dir={tmp_path / "ev"}')
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((tmp_path / 'ev' / 'metrics.json').read_text())
  assert res['recon_num_images'] == 12 and res['rfid'] > 0 and 0 < res['recon_psnr'] < 60
  assert res['examples'] == 16 and 0 <= res['test_acc'] <= 100 and res['test_split'] == 'val'
  assert 'fid' not in res   # no sample metrics unless asked (--ref / --samples)


def test_evaluate_cli_errors(tmp_path):
  d = fixture_dir('tiny')
  r = _run(f'--vae_ckpt={d / "vae.pth"}', f'--var_ckpt={d / "var.pth"}', '--test_loss', f'--out_dir={tmp_path}')
  assert r.returncode != 0 and '--rfid and --test_loss read a data split: give --config' in r.stderr
  r = _run(f'--samples={tmp_path / "nope.npz"}', f'--out_dir={tmp_path}', '--inception=x.pth')
  assert r.returncode != 0 and 'inception' in r.stderr.lower()
  np.savez(tmp_path / 's.npz', arr_0=np.zeros((4, 8, 8, 3), np.uint8))
  r = _run(f'--samples={tmp_path / "s.npz"}', f'--out_dir={tmp_path}')
  assert r.returncode != 0 and '--inception is required' in r.stderr and 'never downloaded' in r.stderr
