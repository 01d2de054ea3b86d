"""FID, Inception Score and improved precision/recall: closed forms, edge cases and a brute-force reference."""
import numpy as np
import pytest
from scipy import linalg

from var_jax.eval import metrics


def _gaussian(rng, n, mean, std):
  return rng.normal(size=(n, len(std))) * np.asarray(std) + np.asarray(mean)


def test_statistics_roundtrip_and_errors(tmp_path):
  feats = _gaussian(np.random.default_rng(0), 500, [1.0, -2.0, 0.5], [1.0, 2.0, 0.5]).astype(np.float32)
  mu, sigma = metrics.feature_statistics(feats)
  assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (3, 3)
  np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False))
  metrics.save_statistics(tmp_path / 'ref.npz', mu, sigma)
  with np.load(tmp_path / 'ref.npz') as data:
    assert sorted(data.files) == ['mu', 'sigma']
  mu2, sigma2 = metrics.load_statistics(tmp_path / 'ref.npz')
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  # OpenAI evaluator reference batches carry images and spatial statistics beside mu/sigma.
  np.savez(tmp_path / 'openai.npz', arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
  np.testing.assert_array_equal(metrics.load_statistics(tmp_path / 'openai.npz')[1], sigma)
  np.savez(tmp_path / 'bad.npz', arr_0=np.zeros(3))
  with pytest.raises(KeyError, match='mu'):
    metrics.load_statistics(tmp_path / 'bad.npz')
  with pytest.raises(ValueError, match='2-D'):
    metrics.feature_statistics(np.zeros(5))


def test_fid_self_is_zero():
  mu, sigma = metrics.feature_statistics(np.random.default_rng(1).normal(size=(300, 32)))
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-4


def test_fid_diagonal_closed_form():
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  s1, s2 = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_fid_singular_covariance_is_finite():
  rng = np.random.default_rng(3)
  stats = [metrics.feature_statistics(rng.normal(size=(10, 64)) + shift) for shift in (0.0, 0.5)]
  fid = metrics.frechet_distance(*stats[0], *stats[1])
  assert np.isfinite(fid) and fid > 0


def test_fid_retries_with_eps_offset_when_sqrtm_not_finite(monkeypatch):
  calls, real_sqrtm = [], linalg.sqrtm

  def flaky_sqrtm(a, *args, **kwargs):
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(metrics.linalg, 'sqrtm', flaky_sqrtm)
  eye = np.eye(4)
  # As in pytorch-fid, the offset enters the square root only: 4 + 4 - 2 tr((1 + eps) I) = -8 eps.
  assert metrics.frechet_distance(np.zeros(4), eye, np.zeros(4), eye, eps=1e-3) == pytest.approx(-8e-3, abs=1e-12)
  np.testing.assert_allclose(calls[1], (eye + 1e-3 * eye) @ (eye + 1e-3 * eye))


def test_fid_large_imaginary_component_raises():
  # sqrt(I @ -I) = i * I: not a covariance product, the imaginary diagonal is 1.
  with pytest.raises(ValueError, match='imaginary'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3))


def test_fid_shape_errors():
  with pytest.raises(ValueError, match='different dimensions'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match='sigma must have shape'):
    metrics.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))


def test_inception_score_uniform_is_one():
  mean, std = metrics.inception_score(np.zeros((100, 10)), splits=10)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
  mean, _ = metrics.inception_score(np.full((100, 10), 0.1), splits=5, from_logits=False)
  assert mean == pytest.approx(1.0, abs=1e-12)


def test_inception_score_one_hot_equal_classes_is_num_classes():
  num_classes = 7
  probs = np.eye(num_classes)[np.arange(70) % num_classes]
  assert metrics.inception_score(probs, splits=1, from_logits=False) == pytest.approx((num_classes, 0.0), abs=1e-9)
  # Every split of 7 consecutive samples holds all classes too.
  assert metrics.inception_score(probs, splits=10, from_logits=False) == pytest.approx((num_classes, 0.0), abs=1e-9)
  # Very confident logits give the same score.
  assert metrics.inception_score(probs * 100.0, splits=1)[0] == pytest.approx(num_classes, rel=1e-6)


def test_inception_score_matches_direct_formula():
  logits = np.random.default_rng(4).normal(size=(60, 5)) * 2
  p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  scores = [np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(axis=0))), axis=1)))
            for part in (p[:20], p[20:40], p[40:])]
  assert metrics.inception_score(logits, splits=3) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)
  with pytest.raises(ValueError, match='summing to 1'):
    metrics.inception_score(logits, from_logits=False)


def _brute_force_precision_recall(real, fake, k):
  real, fake = real.astype(np.float64), fake.astype(np.float64)

  def dists(a, b):
    return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)

  real_radii = np.sort(dists(real, real), axis=1)[:, k]
  fake_radii = np.sort(dists(fake, fake), axis=1)[:, k]
  precision = np.mean(np.any(dists(fake, real) <= real_radii[None, :], axis=1))
  recall = np.mean(np.any(dists(real, fake) <= fake_radii[None, :], axis=1))
  return precision, recall


def test_precision_recall_identical_sets():
  feats = np.random.default_rng(5).normal(size=(120, 16))
  assert metrics.precision_recall(feats, feats.copy(), k=3, batch_size=32) == (1.0, 1.0)


def test_precision_recall_far_apart_clusters():
  rng = np.random.default_rng(6)
  real, fake = rng.normal(size=(80, 8)), rng.normal(size=(90, 8)) + 100.0
  assert metrics.precision_recall(real, fake, k=3) == (0.0, 0.0)


@pytest.mark.parametrize('k', [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
  rng = np.random.default_rng(7 + k)
  real = rng.normal(size=(200, 12))
  fake = rng.normal(size=(150, 12)) * 1.3 + 0.4
  expected = _brute_force_precision_recall(real, fake, k)
  assert 0 < expected[0] < 1 and 0 < expected[1] < 1
  assert metrics.precision_recall(real, fake, k=k, batch_size=64) == expected


def test_precision_recall_batched_equals_unbatched():
  rng = np.random.default_rng(8)
  real, fake = rng.normal(size=(157, 10)).astype(np.float32), rng.normal(size=(131, 10)).astype(np.float32) + 0.3
  unbatched = metrics.precision_recall(real, fake, k=4, batch_size=10_000)
  for batch_size in (1, 7, 50, 131):
    assert metrics.precision_recall(real, fake, k=4, batch_size=batch_size) == unbatched


def test_precision_recall_argument_errors():
  feats = np.zeros((5, 3))
  with pytest.raises(ValueError, match='same dimension'):
    metrics.precision_recall(feats, np.zeros((5, 4)))
  with pytest.raises(ValueError, match='k must be'):
    metrics.precision_recall(feats, feats, k=5)
