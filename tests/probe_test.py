"""Linear probe: the probe itself on closed-form data, feature extraction, and the CLI on digits (random BiGR).

What is shown (no trained BiGR is involved): on separable synthetic features the probe reaches ~100% validation
accuracy and on random labels it stays at chance; on scikit-learn's digits the features of a random-init
quickstart BAE + BiGR beat chance by a wide margin (the random-feature baseline); and conditioning on the true
label leaks it into the features (far above the null-class accuracy), which is why the probe uses the null class.
"""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from var_jax.eval import probe
from var_jax.pipelines.pretrained import parse_model_args
from var_jax.pipelines.bigr import BiGRPipeline
from var_jax.data import default_data_config


def _blobs(rng, n, num_classes=10, d=32, scale=3.0, noise=0.5):
  y = rng.integers(0, num_classes, n)
  x = noise * rng.standard_normal((n, d)) + 5.0        # an offset the standardisation removes
  x[np.arange(n), y] += scale
  return x.astype(np.float32), y


def test_probe_separable_features_reach_full_accuracy():
  rng = np.random.default_rng(0)
  tx, ty = _blobs(rng, 1000)
  vx, vy = _blobs(rng, 500)
  r = probe.train_linear_probe(tx, ty, vx, vy, steps=200, seed=0)
  assert r['train_acc'] > 0.98 and r['val_acc'] > 0.98, r
  assert r['num_classes'] == 10 and r['params']['w'].shape == (32, 10) and r['batch_size'] == 0
  # mini-batches reach the same, deterministically per seed
  m1 = probe.train_linear_probe(tx, ty, vx, vy, steps=200, batch_size=64, seed=1)
  m2 = probe.train_linear_probe(tx, ty, vx, vy, steps=200, batch_size=64, seed=1)
  m3 = probe.train_linear_probe(tx, ty, vx, vy, steps=200, batch_size=64, seed=2)
  assert m1['val_acc'] > 0.98
  np.testing.assert_array_equal(m1['params']['w'], m2['params']['w'])
  assert not np.array_equal(m1['params']['w'], m3['params']['w'])


def test_probe_random_labels_stay_at_chance():
  rng = np.random.default_rng(1)
  tx, _ = _blobs(rng, 1000)
  vx, _ = _blobs(rng, 1000)
  ty, vy = rng.integers(0, 10, 1000), rng.integers(0, 10, 1000)
  r = probe.train_linear_probe(tx, ty, vx, vy, steps=200, seed=0)
  assert r['val_acc'] < 0.16, r['val_acc']                # chance 10%, std ~1%
  assert r['train_acc'] > r['val_acc']                    # it can only memorise


def test_standardize():
  x = np.array([[1.0, 2.0, 7.0], [3.0, 2.0, 9.0]], np.float32)
  mean, std, tx, vx = probe.standardize(x, x[:1])
  np.testing.assert_allclose(mean, [2.0, 2.0, 8.0])
  np.testing.assert_allclose(std, [1.0, 1.0, 1.0])       # the constant column gets std 1
  np.testing.assert_allclose(tx, [[-1.0, 0.0, -1.0], [1.0, 0.0, 1.0]])
  np.testing.assert_allclose(vx, tx[:1])


def test_parse_model_args():
  want = {'n_head': 16, 'p_flip': True, 'focal': 0.0, 'n_kv_head': None}
  assert parse_model_args('{"n_head": 16, "p_flip": true, "focal": 0.0, "n_kv_head": null}') == want
  assert parse_model_args(['n_head=16', 'p_flip=true', 'focal=0.0', 'n_kv_head=null']) == want
  assert parse_model_args('n_head=16,p_flip=True,focal=0.0,n_kv_head=None') == want
  assert parse_model_args('{"n_head": 16, "p_flip": true, "focal": 0.0, "n_kv_head": null}'.split(',')) == want
  assert parse_model_args(None) == {}
  with pytest.raises(ValueError, match='key=value'):
    parse_model_args(['n_head'])


@pytest.fixture(scope='module')
def quick():
  return probe.build_pipeline(random_init_config='quickstart', seed=0)


def test_extract_features_batches_and_layers(quick):
  x = np.random.default_rng(0).random((3, 32, 32, 3)).astype(np.float32)
  full = np.asarray(quick.features(x))                   # (3, 4, 64), one call
  assert full.shape == (3, 4, 64)
  np.testing.assert_allclose(probe.extract_features(quick, x, batch_size=2), full, atol=1e-6)   # last batch padded
  np.testing.assert_allclose(probe.extract_features(quick, x, layer=2, batch_size=2), full[:, 2], atol=1e-6)
  np.testing.assert_allclose(probe.extract_features(quick, x, layer=[0, 3], batch_size=2), full[:, [0, 3]],
                             atol=1e-6)
  lab = np.array([0, 1, 2])
  np.testing.assert_allclose(probe.extract_features(quick, x, lab, condition='label', batch_size=2),
                             np.asarray(quick.features(x, label=lab)), atol=1e-6)
  with pytest.raises(ValueError, match='labels'):
    probe.extract_features(quick, x, condition='label')
  with pytest.raises(ValueError, match='layers'):
    probe.extract_features(quick, x, layer=4)


def test_cli_run_on_digits_beats_chance(quick):
  lines = []
  data_cfg = default_data_config()                       # name='digits': 1500 train / 297 val, no download
  res = probe.run_probe(quick, data_cfg, seed=0, random_init=True, log=lines.append)
  text = '\n'.join(lines)
  assert res['num_train'] == 1500 and res['num_val'] == 297 and res['num_classes'] == 10
  assert [r['layer'] for r in res['layers']] == [0, 1, 2, 3]
  for r in res['layers']:
    assert f'layer {r["layer"]:3d}: train acc' in text
    assert r['val_acc'] > 0.2, res['layers']             # chance is 10%: random features of images carry signal
  assert f'best layer: {res["best_layer"]}' in text and 'random-feature baseline' in text
  assert res['best_val_acc'] == max(r['val_acc'] for r in res['layers'])
  # a random-feature probe (Gaussian features of the same size, independent of the images) stays at chance: the
  # BiGR features beat it on every layer
  rng = np.random.default_rng(0)
  d = quick.feature_dim
  rand = probe.train_linear_probe(rng.normal(size=(1500, d)).astype(np.float32), rng.integers(0, 10, 1500),
                                  rng.normal(size=(297, d)).astype(np.float32), rng.integers(0, 10, 297),
                                  num_classes=10, seed=0)
  assert rand['val_acc'] < 0.17, rand['val_acc']
  assert min(r['val_acc'] for r in res['layers']) > rand['val_acc'] + 0.05


def test_label_condition_leaks_the_class(quick):
  cfg = default_data_config()
  kw = dict(layer=[3], batch_size=64, seed=0)
  out = {}
  for cond in ('null', 'label'):
    tx, ty = probe.dataset_features(quick, cfg, 'train', condition=cond, max_examples=600, **kw)
    vx, vy = probe.dataset_features(quick, cfg, 'val', condition=cond, **kw)
    out[cond] = probe.train_linear_probe(tx[:, 0], ty, vx[:, 0], vy, seed=0)['val_acc']
  assert out['label'] > 0.6 and out['label'] > out['null'] + 0.3, out      # measured: 0.78 vs 0.27


def test_init_random_roundtrip(quick, tmp_path):
  bae_cfg, bigr_cfg = probe.random_init_configs('quickstart')
  assert quick.bae_config == bae_cfg and quick.bigr_config == bigr_cfg
  quick.save_torch(tmp_path / 'bae.th', tmp_path / 'bigr.pt')
  back = BiGRPipeline.from_torch(tmp_path / 'bae.th', tmp_path / 'bigr.pt', n_head=4, p_flip=True, focal=0.0,
                                 infer_steps=10, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
  assert back.bae_config == bae_cfg and back.bigr_config == bigr_cfg
  for a, b in ((back.bae_variables, quick.bae_variables), (back.bigr_variables, quick.bigr_variables)):
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), a, b)
  # and the checkpoint route of the CLI
  p2 = probe.build_pipeline(str(tmp_path / 'bae.th'), str(tmp_path / 'bigr.pt'),
                            ['n_head=4', 'p_flip=true', 'focal=0.0', 'infer_steps=10', 'token_dropout_p=0.0',
                             'resid_dropout_p=0.0', 'ffn_dropout_p=0.0'])
  assert p2.bigr_config == bigr_cfg
  with pytest.raises(ValueError, match='not both'):
    probe.build_pipeline(str(tmp_path / 'bae.th'), str(tmp_path / 'bigr.pt'), random_init_config='quickstart')


@pytest.mark.slow
def test_cli_subprocess(tmp_path):
  out = tmp_path / 'probe.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'var_jax.probe', '--random_init_config=quickstart', '--layers=0,3',
       '--max_train_examples=400', '--max_val_examples=150', '--probe_steps=100', f'--json_out={out}'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'layer   0: train acc' in proc.stdout and 'layer   3: train acc' in proc.stdout
  assert 'best layer:' in proc.stdout
  res = json.loads(out.read_text())
  assert res['num_train'] == 400 and res['num_val'] == 150 and [r['layer'] for r in res['layers']] == [0, 3]
  assert res['best_val_acc'] > 0.2
