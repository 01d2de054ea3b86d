"""Issue 24, evaluate / probe: every flag and input is checked before any model is loaded or network run (the
Inception network, the model and the probe's set-up are replaced by stubs that fail the test if called), and too
few samples or reference images for the statistics they feed is an error naming both counts (a covariance needs 2
images; at most 2048 give a singular one: a warning naming the counts)."""
import logging
import os

import numpy as np
import pytest
from PIL import Image

from cli_cases import error_line, run_cli_cases
from var_jax.eval import evaluator, inputs


class _NoModel:
  family = 'var'

  @property
  def num_classes(self):
    raise AssertionError('the model was used before the inputs were checked')


@pytest.fixture
def no_network(monkeypatch):
  def ran(*a, **k):
    raise AssertionError('a network ran before the inputs were checked')
  monkeypatch.setattr(evaluator, 'InceptionFeatures', ran)
  monkeypatch.setattr(evaluator, 'inception_features', ran)


def _files(tmp_path, n_samples=6, n_ref=6):
  from safetensors.numpy import save_file
  save_file({'conv/kernel': np.zeros((1,), np.float32)}, str(tmp_path / 'inc.safetensors'))
  np.savez(tmp_path / f's{n_samples}.npz', arr_0=np.zeros((n_samples, 8, 8, 3), np.uint8))
  ref = tmp_path / f'ref{n_ref}'
  ref.mkdir(exist_ok=True)
  for i in range(n_ref):
    Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(ref / f'{i}.png')
  return str(tmp_path / 'inc.safetensors'), str(tmp_path / f's{n_samples}.npz'), str(ref)


@pytest.mark.parametrize('kw,msg', [
    ({'is_split': 'thirds'}, "--is_split: unknown Inception Score split rule 'thirds'"),
    ({'is_split': 'equal0'}, "--is_split: unknown Inception Score split rule 'equal0'"),
    ({'pr_k': 0}, '--pr_k=0: must be an integer >= 1'),
    ({'inception_batch': 0}, '--inception_batch=0: must be an integer >= 1'),
    ({'pr_distance_dtype': 'int8'}, "--pr_distance_dtype='int8': expected one of float32, float16"),
    ({'rfid': True}, '--rfid and --test_loss read a data split: give --config'),
    ({'max_batches': 0, 'test_set_loss': True}, '--max_batches=0: must be -1 (all) or an integer >= 1'),
    ({'samples': 's1'}, 'FID needs at least 2 images of each set for a covariance of the 2048 Inception pool3 '
                        'features: --samples has 1 (samples: 1, reference: 6)'),
    ({'ref': 'ref1'}, 'FID needs at least 2 images of each set for a covariance of the 2048 Inception pool3 '
                      'features: --ref has 1 (samples: 6, reference: 1)'),
    ({'pr_k': 6}, 'precision/recall with --pr_k=6 needs more than 6 images in each set: --samples has 6 (samples: '
                  '6, reference: 6)'),
    ({'samples': None, 'classes': ['3'], 'num_per_class': 1}, 'FID needs at least 2 images of each set for a '
     'covariance of the 2048 Inception pool3 features: the sampling plan (--classes x --num_per_class) has 1'),
])
def test_evaluate_refuses_before_any_network(tmp_path, no_network, kw, msg):
  inc, samples, ref = _files(tmp_path)
  _files(tmp_path, 1, 1)
  kw = dict(kw)
  if kw.get('samples') == 's1':
    kw['samples'] = str(tmp_path / 's1.npz')
  if kw.get('ref') == 'ref1':
    kw['ref'] = str(tmp_path / 'ref1')
  args = {'samples': samples, 'ref': ref, 'inception': inc, 'out_dir': str(tmp_path / 'ev'), **kw}
  with pytest.raises(ValueError) as e:
    evaluator.evaluate(_NoModel(), **args)
  assert msg in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
  assert not os.path.exists(tmp_path / 'ev') or not os.listdir(tmp_path / 'ev')     # nothing written


def test_rank_deficient_covariance_is_named_before_the_network(tmp_path, no_network, caplog):
  inc, samples, ref = _files(tmp_path, 6, 5)
  with caplog.at_level(logging.WARNING), pytest.raises(AssertionError, match='a network ran'):
    evaluator.evaluate(None, samples=samples, ref=ref, inception=inc, out_dir=str(tmp_path / 'ev'))
  assert 'FID: --samples has 6, --ref has 5 images, at most 2048: the covariance of the 2048 Inception pool3 ' \
         'features is singular' in caplog.text, caplog.text


def test_reference_counts_from_headers(tmp_path):
  _, samples, ref = _files(tmp_path, 7, 4)
  assert inputs.count_images(samples) == 7 and inputs.count_images(ref) == 4
  assert inputs.reference_count(samples, None, with_inception=True) == 7
  assert inputs.reference_count(samples, None, with_inception=False) is None     # images need the Inception
  np.savez(tmp_path / 'stats.npz', mu=np.zeros(4), sigma=np.eye(4), pool3=np.zeros((9, 4), np.float32))
  assert inputs.reference_count(ref, str(tmp_path / 'stats.npz'), with_inception=True) == 9
  np.savez(tmp_path / 'bare.npz', mu=np.zeros(4), sigma=np.eye(4))
  assert inputs.reference_count(str(tmp_path / 'bare.npz'), None, with_inception=True) is None


def test_cli_evaluate_and_probe_fail_before_loading(tmp_path):
  """One line, exit 1, before any model is loaded (the weights named do not exist and the error is not about them)
  or any data is read; nothing written."""
  inc, samples, ref = _files(tmp_path)
  _files(tmp_path, 1, 1)
  model = ['--vae_ckpt=/nonexistent/vae.pth', '--var_ckpt=/nonexistent/var.pth']
  ev = ['var_jax.evaluate', *model, f'--inception={inc}', f'--out_dir={tmp_path / "ev"}']
  cases = [
      ([*ev, f'--samples={samples}', '--is_split=bad'], "--is_split: unknown Inception Score split rule 'bad'"),
      ([*ev, f'--samples={samples}', f'--ref={ref}', '--pr_k=0'], '--pr_k=0: must be an integer >= 1'),
      ([*ev, f'--samples={tmp_path / "s1.npz"}', f'--ref={ref}'], '--samples has 1 (samples: 1, reference: 6)'),
      ([*ev, f'--ref={tmp_path / "ref1"}', '--classes=1,2'], '--ref has 1 (samples: 100, reference: 1)'),
      ([*ev, '--classes=1', '--num_per_class=1', f'--ref={ref}'], 'the sampling plan (--classes x --num_per_class) '
       'has 1'),
      ([*ev, '--rfid', '--config=configs/quickstart.py', '--max_images=1'], '--max_images=1: rFID needs at least 2'),
      (['var_jax.probe', '--random_init_config=quickstart', '--data=folder', f'--data_path={tmp_path / "nope"}'],
       f"--train_split=train: ImageFolderSource: directory '{tmp_path / 'nope' / 'train'}' does not exist"),
      (['var_jax.probe', '--random_init_config=quickstart', '--probe_lr=-1'], '--probe_lr=-1.0: must be a finite'),
      (['var_jax.probe', '--random_init_config=quickstart', '--layers=a'], "--layers: 'a' is not a layer index"),
      (['var_jax.probe', '--random_init_config=quickstart', '--batch_size=0'], '--batch_size=0: must be an integer'),
      (['var_jax.probe', '--bae_ckpt=/nonexistent/b.th', '--bigr_ckpt=/nonexistent/g.pt', '--eval_split=nosuch',
        '--data=tfds'], "--train_split=train: data.name='tfds' needs data.tfds_name"),
  ]
  results = run_cli_cases([c for c, _ in cases], tmp_path)
  for (c, msg), r in zip(cases, results):
    line = error_line(r)
    assert msg in line and 'nonexistent' not in line, (c, line)
  assert not os.path.exists(tmp_path / 'ev') or not os.listdir(tmp_path / 'ev')
