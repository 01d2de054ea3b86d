"""Generative-model metrics on precomputed feature vectors: FID, Inception Score, improved precision/recall.

Everything here works on arrays the feature extractor (an Inception network, a separate piece) already produced:

* ``feature_statistics`` / ``save_statistics`` / ``load_statistics``: the Gaussian (mean, covariance) of a feature
  set, stored as an ``.npz`` with keys ``'mu'`` and ``'sigma'``: the layout of pytorch-fid's statistics files and of
  the reference batches of OpenAI's guided-diffusion evaluator (which also carry ``'arr_0'`` images and
  ``'mu_s'``/``'sigma_s'`` spatial statistics; only ``'mu'``/``'sigma'`` are read).
* ``frechet_distance``: the Frechet distance between two Gaussians, with pytorch-fid's numerics.
* ``inception_score``: ``exp(E_x KL(p(y|x) || p(y)))`` over contiguous splits, as the original improved-GAN code,
  OpenAI's evaluator and torch-fidelity (without its optional shuffling) compute it.
* ``precision_recall``: improved precision and recall (Kynkaanniemi et al., 2019), k-NN hyperspheres, computed in
  batches with JAX so that 50k x 50k comparisons never materialise a full distance matrix.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg


def feature_statistics(features):
  """Mean and covariance (float64) of ``features`` of shape (N, D): ``(mu (D,), sigma (D, D))``."""
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2:
    raise ValueError(f'features must be a 2-D array (num_samples, dim), got shape {features.shape}')
  if features.shape[0] < 2:
    raise ValueError(f'need at least 2 samples to estimate a covariance, got {features.shape[0]}')
  return features.mean(axis=0), np.cov(features, rowvar=False)


def save_statistics(path, mu, sigma):
  """Writes ``mu``/``sigma`` to an ``.npz`` at ``path`` (keys ``'mu'``, ``'sigma'``), the pytorch-fid layout."""
  mu, sigma = _check_stats(mu, sigma, 'statistics')
  np.savez(os.fspath(path), mu=mu, sigma=sigma)


def load_statistics(path):
  """Reads ``(mu, sigma)`` as float64 from an ``.npz`` with keys ``'mu'`` and ``'sigma'`` (pytorch-fid or OpenAI)."""
  with np.load(os.fspath(path)) as data:
    missing = [key for key in ('mu', 'sigma') if key not in data.files]
    if missing:
      raise KeyError(f'{path} has no {missing} (keys present: {data.files}); expected an .npz with \'mu\' and '
                     f'\'sigma\' as written by save_statistics, pytorch-fid or the OpenAI evaluator')
    return _check_stats(data['mu'], data['sigma'], str(path))


def _check_stats(mu, sigma, name):
  mu, sigma = np.atleast_1d(np.asarray(mu, dtype=np.float64)), np.atleast_2d(np.asarray(sigma, dtype=np.float64))
  if mu.ndim != 1:
    raise ValueError(f'{name}: mu must be 1-D, got shape {mu.shape}')
  if sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f'{name}: sigma must have shape {(mu.shape[0], mu.shape[0])} to match mu, got {sigma.shape}')
  return mu, sigma


def _sqrtm(a):
  # scipy >= 1.16 deprecates ``disp=False`` (removed in 1.18) and always returns the root alone; older versions print
  # a warning instead of returning the error estimate, which is all pytorch-fid's ``disp=False`` avoided.
  root = linalg.sqrtm(a)
  return root[0] if isinstance(root, tuple) else root


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """Frechet distance ``||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr(sqrt(s1 s2))`` between two Gaussians (FID).

  Numerics follow pytorch-fid: if the matrix square root of ``sigma1 @ sigma2`` is not finite (singular product),
  it is retried with ``eps * I`` added to both covariances; an imaginary part above 1e-3 on the diagonal of the root
  raises ``ValueError`` (the covariances are not PSD enough to trust), a smaller one is dropped.
  """
  mu1, sigma1 = _check_stats(mu1, sigma1, 'first statistics')
  mu2, sigma2 = _check_stats(mu2, sigma2, 'second statistics')
  if mu1.shape != mu2.shape:
    raise ValueError(f'the two mean vectors have different dimensions: {mu1.shape} vs {mu2.shape}')
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'sqrt(sigma1 @ sigma2) has an imaginary component of {np.max(np.abs(covmean.imag)):.3g} '
                       f'(> 1e-3): the covariances are not positive semi-definite')
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits_or_probs, splits=10, from_logits=True):
  """Inception Score of class predictions of shape (N, C): ``(mean, std)`` over ``splits`` contiguous chunks.

  Each chunk ``i`` is ``[i * N // splits, (i + 1) * N // splits)`` and scores ``exp(mean_x KL(p(y|x) || p(y)))``
  with ``p(y)`` the chunk's mean prediction; ``std`` is the population (ddof=0) standard deviation, as in the
  improved-GAN code, OpenAI's evaluator and torch-fidelity. ``from_logits=False`` takes probabilities (rows summing
  to 1, zeros allowed).
  """
  x = np.asarray(logits_or_probs, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f'predictions must be a 2-D array (num_samples, num_classes), got shape {x.shape}')
  if not 1 <= splits <= x.shape[0]:
    raise ValueError(f'splits must be in [1, num_samples={x.shape[0]}], got {splits}')
  if from_logits:
    log_p = x - np.max(x, axis=1, keepdims=True)
    log_p = log_p - np.log(np.sum(np.exp(log_p), axis=1, keepdims=True))
    p = np.exp(log_p)
  else:
    if np.any(x < 0) or not np.allclose(x.sum(axis=1), 1, atol=1e-3):
      raise ValueError('probabilities must be non-negative with rows summing to 1 (pass from_logits=True for logits)')
    p = x
    with np.errstate(divide='ignore'):
      log_p = np.log(p)
  n, scores = x.shape[0], []
  for i in range(splits):
    part, log_part = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
    # p * (log p - log p(y)), with 0 log 0 = 0 (p(y) > 0 wherever p > 0).
    with np.errstate(divide='ignore', invalid='ignore'):
      log_ratio = log_part - np.log(part.mean(axis=0, keepdims=True))
    kl = np.sum(part * np.where(part > 0, log_ratio, 0.0), axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a, b):
  """Pairwise squared Euclidean distances (len(a), len(b)), clipped at 0, with full-precision matmuls."""
  ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2 * ab, 0)


@functools.partial(jax.jit, static_argnames='k')
def _kth_sq_radius(queries, points, k):
  # The query is in ``points`` itself, at distance ~0: the (k + 1)-th smallest is the k-th neighbour excluding self.
  return -jax.lax.top_k(-_sq_dists(queries, points), k + 1)[0][:, k]


@jax.jit
def _inside_any(queries, points, sq_radii):
  return jnp.any(_sq_dists(queries, points) <= sq_radii[None, :], axis=1)


def _batched(fn, queries, batch_size, *args):
  """Applies ``fn(query_batch, *args)`` over ``queries`` in fixed-size batches (the last one padded: one compile)."""
  batch_size, out = min(batch_size, queries.shape[0]), []
  for start in range(0, queries.shape[0], batch_size):
    batch = queries[start:start + batch_size]
    valid = batch.shape[0]
    if valid < batch_size:
      batch = jnp.pad(batch, ((0, batch_size - valid), (0, 0)))
    out.append(np.asarray(fn(batch, *args))[:valid])
  return np.concatenate(out)


def precision_recall(real_features, fake_features, k=3, batch_size=1000):
  """Improved precision and recall (Kynkaanniemi et al., 2019) of ``fake_features`` against ``real_features``.

  Each sample gets a hypersphere of radius its distance to its ``k``-th nearest neighbour within its own set
  (excluding itself). Precision is the fraction of fake samples inside at least one real hypersphere (distance <=
  radius), recall the fraction of real samples inside at least one fake hypersphere. Distances are computed in rows
  of ``batch_size`` queries against a whole set (memory ``batch_size * N``), so 50k x 50k fits; pure function.
  Returns ``(precision, recall)`` as Python floats.
  """
  real, fake = np.asarray(real_features), np.asarray(fake_features)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f'features must be 2-D with the same dimension, got {real.shape} and {fake.shape}')
  if not 1 <= k < min(real.shape[0], fake.shape[0]):
    raise ValueError(f'k must be in [1, min(num_real, num_fake) - 1], got k={k} for {real.shape[0]} real and '
                     f'{fake.shape[0]} fake samples')
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  # Centre both sets on the real mean (distances are translation-invariant) to limit cancellation in the expansion.
  center = real.mean(axis=0, dtype=np.float64)
  real, fake = jnp.asarray(real - center), jnp.asarray(fake - center)
  real_sq_radii = jnp.asarray(_batched(functools.partial(_kth_sq_radius, k=k), real, batch_size, real))
  fake_sq_radii = jnp.asarray(_batched(functools.partial(_kth_sq_radius, k=k), fake, batch_size, fake))
  precision = _batched(_inside_any, fake, batch_size, real, real_sq_radii).mean()
  recall = _batched(_inside_any, real, batch_size, fake, fake_sq_radii).mean()
  return float(precision), float(recall)
