"""The digits quality score (var_jax.eval.digits): real digits score as real digits, wrong labels and noise do not."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests_helpers import REPO, process_env
from var_jax.eval import digits


@pytest.fixture(scope='module')
def scorer():
  return digits.scorer(32, 1.125)


@pytest.fixture(scope='module')
def train_views():
  return digits._views('train', 32, 1.125)   # pylint: disable=protected-access


def test_reference_points(scorer):
  ref = scorer.reference
  assert 90.0 < ref['real_class_acc'] <= 100.0       # an SVM on the training split, on the held-out split
  assert ref['real_fd'] > 0


def test_real_images_score_as_real(scorer, train_views):
  images, labels = train_views
  idx = np.sort(np.concatenate([np.flatnonzero(labels == c)[60:110] for c in range(10)]))   # not the reference's
  s = scorer.score(images[idx], labels[idx])
  assert s['class_acc'] > 95.0
  assert s['fd'] < 2.0 * s['real_fd']
  assert set(f'class_acc/{c}' for c in range(10)) <= set(s)
  line = digits.format_score(s)
  assert 'class accuracy' in line and 'Frechet distance' in line


def test_wrong_labels_and_noise_fail(scorer, train_views):
  images, labels = train_views
  idx = digits.per_class_first(labels, 50)
  shuffled = np.random.default_rng(0).permutation(labels[idx])
  assert scorer.score(images[idx], shuffled)['class_acc'] < 25.0
  noise = np.random.default_rng(1).uniform(size=images[idx].shape).astype(np.float32)
  s = scorer.score(noise, labels[idx])
  assert s['fd'] > 5.0 * s['real_fd']
  blank = np.zeros_like(images[idx])                 # one image repeated: no variety
  assert scorer.score(blank + images[idx][:1], labels[idx])['fd'] > 5.0 * s['real_fd']


def test_deterministic_and_view_specific():
  a = digits.DigitsScorer(32, 1.0)
  b = digits.scorer(32, 1.0)
  assert a.reference == b.reference
  assert digits.scorer(32, 1.0) is b


@pytest.mark.parametrize('bad, match', [
    ((np.zeros((4, 32, 32, 3)), np.zeros(3, int)), '4 images for 3 labels'),
    ((np.zeros((1, 32, 32, 3)), np.zeros(1, int)), 'at least 2'),
    ((np.zeros((2, 32, 32, 3)), np.array([0, 10])), 'labels must be in'),
    ((np.zeros((2, 30, 30, 3)), np.array([0, 1])), 'multiple of 8'),
    ((np.full((2, 32, 32, 3), np.nan), np.array([0, 1])), 'non-finite'),
])
def test_bad_input(scorer, bad, match):
  with pytest.raises(ValueError, match=match):
    scorer.score(*bad)


def test_balanced_labels():
  np.testing.assert_array_equal(digits.balanced_labels(2), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8,
                                                            9, 9])


def _write_samples(folder, images, labels):
  from var_jax import images as images_lib
  from var_jax.eval import protocol
  os.makedirs(folder)
  for i, (im, c) in enumerate(zip(images, labels)):
    images_lib.write_png(os.path.join(folder, protocol.image_name(i, int(c))), images_lib.to_uint8(im))


def test_evaluate_cli_scores_a_sample_folder(tmp_path, train_views):
  """``python -m var_jax.evaluate --digits --samples=<folder>``: labels from the file names, the view from
  --config; real digits score as real digits, the same digits under other labels do not."""
  images, labels = train_views
  idx = digits.per_class_first(labels, 20)
  _write_samples(tmp_path / 'good', images[idx], labels[idx])
  _write_samples(tmp_path / 'bad', images[idx], (labels[idx] + 1) % 10)
  for name, lo, hi in (('good', 95.0, 100.0), ('bad', 0.0, 10.0)):
    p = subprocess.run([sys.executable, '-m', 'var_jax.evaluate', '--digits', f'--samples={tmp_path / name}',
                        f'--config={REPO}/configs/quickstart.py', f'--out_dir={tmp_path / name}_eval'], cwd=REPO,
                       env=process_env(1), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'digits quality: class accuracy' in p.stdout
    m = json.load(open(tmp_path / f'{name}_eval' / 'metrics.json'))
    assert lo <= m['digits_class_acc'] <= hi, m


def test_evaluate_digits_needs_the_view(tmp_path):
  p = subprocess.run([sys.executable, '-m', 'var_jax.evaluate', '--digits', f'--samples={tmp_path}',
                      f'--out_dir={tmp_path}/eval'], cwd=REPO, env=process_env(1), capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 1
  assert p.stderr.strip().splitlines()[-1].startswith('error: --digits needs the data view'), p.stderr[-1000:]


def test_view_of_a_run(tmp_path):
  """The view a digits model trained on: --config's data, else the training config.json of the run (VAR's
  <run>/model holds a config.json of its own, without a data section: the run's one above it is read)."""
  (tmp_path / 'model').mkdir()
  (tmp_path / 'model' / 'config.json').write_text(json.dumps({'vae': {}, 'var': {}}))
  (tmp_path / 'config.json').write_text(json.dumps({'data': {'name': 'digits', 'image_size': 32, 'mid_reso': 1.125}}))
  assert digits.view_of(None, str(tmp_path / 'model')) == (32, 1.125)
  assert digits.view_of(None, str(tmp_path)) == (32, 1.125)
  (tmp_path / 'config.json').write_text(json.dumps({'data': {'name': 'folder', 'image_size': 32, 'mid_reso': 1.0}}))
  with pytest.raises(ValueError, match="data.name is 'folder'"):
    digits.view_of(None, str(tmp_path / 'model'))
  with pytest.raises(ValueError, match='no training config.json with a data section'):
    digits.view_of(None, str(tmp_path / 'model' / 'nowhere'))
