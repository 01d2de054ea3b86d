"""Generative-model metrics on precomputed feature vectors: FID, Inception Score, improved precision/recall.

Everything here works on arrays the feature extractor (an Inception network, a separate piece) already produced:

* ``feature_statistics`` / ``save_statistics`` / ``load_statistics``: the Gaussian (mean, covariance) of a feature
  set, stored as an ``.npz`` with keys ``'mu'`` and ``'sigma'``: the layout of pytorch-fid's statistics files and of
  the reference batches of OpenAI's guided-diffusion evaluator (which also carry ``'arr_0'`` images and
  ``'mu_s'``/``'sigma_s'`` spatial statistics; only ``'mu'``/``'sigma'`` are read).
* ``frechet_distance``: the Frechet distance between two Gaussians, with pytorch-fid's numerics.
* ``inception_score``: ``exp(E_x KL(p(y|x) || p(y)))`` averaged over contiguous splits. Two split rules:
  ``split_size=5000`` (the default): consecutive chunks of 5000 samples, the last one possibly shorter, as OpenAI's
  guided-diffusion evaluator (``Evaluator.compute_inception_score``, the numbers of the VAR paper) computes it; and
  ``splits=10``: 10 (near-)equal chunks, as the original improved-GAN code and torch-fidelity (without its optional
  shuffling) do. The two agree only when N is 5000 x splits (N = 50000 for 10 splits). ``IS_SPLIT_RULES`` /
  ``is_split_kwargs`` name them ``'chunks5000'`` / ``'equal10'`` for protocols that record the rule.
* ``precision_recall``: improved precision and recall (Kynkaanniemi et al., 2019), k-NN hyperspheres, computed in
  batches with JAX so that 50k x 50k comparisons never materialise a full distance matrix. ``distance_dtype=
  'float32'`` (default) computes distances in float32; ``'float16'`` replays the OpenAI evaluator's
  ``ManifoldEstimator``/``DistanceBlock`` (float16 distances, float32 only for a 10000 x 10000 block that is not
  finite in float16), which moves P/R by ~0.1-0.2 points on 50k Inception features.
"""
import functools
import os
import re
from typing import Dict, Optional

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
  from var_jax import fileio
  fileio.atomic_save(path, lambda f: np.savez(f, mu=mu, sigma=sigma))


def load_statistics(path):
  """Reads ``(mu, sigma)`` as float64 from an ``.npz`` with keys ``'mu'`` and ``'sigma'`` (pytorch-fid or OpenAI)."""
  from var_jax import fileio
  with fileio.path(path).open('rb') as fh, np.load(fh) as data:     # local or remote (gs://)
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


DEFAULT_IS_SPLIT = 'chunks5000'
IS_SPLIT_RULES = ('chunks<N>', 'equal<N>')


def is_split_kwargs(rule: str, num_samples: Optional[int] = None) -> Dict[str, int]:
  """``inception_score`` keyword arguments of a named split rule.

  ``'chunks<N>'`` (e.g. ``'chunks5000'``, OpenAI's evaluator): ``{'split_size': N}``; ``'equal<N>'`` (e.g.
  ``'equal10'``, improved-GAN / torch-fidelity): ``{'splits': N}``, capped at ``num_samples`` when given.
  """
  m = re.fullmatch(r'(chunks|equal)(\d+)', str(rule))
  if not m or int(m.group(2)) < 1:
    raise ValueError(f'unknown Inception Score split rule {rule!r}: expected \'chunks<N>\' (consecutive chunks of N '
                     f'samples, OpenAI\'s evaluator: \'chunks5000\') or \'equal<N>\' (N equal splits: \'equal10\')')
  n = int(m.group(2))
  if m.group(1) == 'chunks':
    return {'split_size': n}
  return {'splits': min(n, num_samples) if num_samples else n}


def inception_score(logits_or_probs, splits: Optional[int] = None, from_logits: bool = True, *,
                    split_size: Optional[int] = None):
  """Inception Score of class predictions of shape (N, C): ``(mean, std)`` over contiguous chunks.

  Each chunk scores ``exp(mean_x KL(p(y|x) || p(y)))`` with ``p(y)`` the chunk's mean prediction; ``mean`` is the
  plain (unweighted) mean of the chunk scores, ``std`` their population (ddof=0) standard deviation. The chunks:

  * ``split_size=S`` (the default, ``S = 5000``, when neither argument is given): ``[i * S, (i + 1) * S)``, the last
    one shorter when S does not divide N: OpenAI's guided-diffusion evaluator
    (``compute_inception_score(activations, split_size=5000)``), whose numbers the VAR paper reports;
  * ``splits=K``: ``[i * N // K, (i + 1) * N // K)`` for i < K: the improved-GAN code and torch-fidelity.

  The two agree only for N = S * K. ``from_logits=False`` takes probabilities (rows summing to 1, zeros allowed).
  """
  x = np.asarray(logits_or_probs, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f'predictions must be a 2-D array (num_samples, num_classes), got shape {x.shape}')
  n = x.shape[0]
  if splits is not None and split_size is not None:
    raise ValueError(f'give splits (equal splits) or split_size (chunks of that many samples), not both: '
                     f'splits={splits}, split_size={split_size}')
  if splits is None and split_size is None:
    split_size = is_split_kwargs(DEFAULT_IS_SPLIT)['split_size']
  if splits is not None:
    if not 1 <= splits <= n:
      raise ValueError(f'splits must be in [1, num_samples={n}], got {splits}')
    bounds = [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
  else:
    if split_size < 1 or n < 1:
      raise ValueError(f'split_size must be positive and there must be samples, got split_size={split_size}, '
                       f'{n} samples')
    bounds = [(i, min(i + split_size, n)) for i in range(0, n, split_size)]
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
  scores = []
  for lo, hi in bounds:
    part, log_part = p[lo:hi], log_p[lo:hi]
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


DISTANCE_DTYPES = ('float32', 'float16')
# OpenAI's ManifoldEstimator(row_batch_size=10000, col_batch_size=10000): the blocks whose float16 finiteness decides
# the float32 fallback. Module-level so that tests can shrink it.
EVALUATOR_BLOCK = 10_000
_NO_EXCESS_PRECISION = {'xla_allow_excess_precision': False}   # every float16 op rounds, also inside fusions


def _evaluator_sq_dists(q, p, q_is_row, use32):
  """OpenAI's ``DistanceBlock`` between queries ``q`` (b, D) and points ``p`` (N, D), as a (b, N) float32 array.

  Its ``_batch_pairwise_distances(U, V) = max(|u|^2 - 2 u.v + |v|^2, 0)`` on features cast to float16: squares in
  float16, row sums and the matmul accumulated in float32 and rounded to float16 (TF's float16 reductions and cuBLAS
  float16 GEMMs accumulate in float32), then ``(|u|^2 - 2 u.v) + |v|^2`` and the clamp in float16. ``U`` holds the
  evaluator's rows (``q_is_row``: the queries; else the points; float16 rounding makes the two orders differ).
  Where ``use32`` (b, N) is set, the float32 formula (on the float32 features) replaces it: the evaluator's
  ``tf.cond`` fallback for a block that is not all finite in float16 (``None``: nowhere, the float32 formula is not
  evaluated). Returns ``(distances, float16 distances)``.
  """
  f16, f32 = jnp.float16, jnp.float32
  q16, p16 = q.astype(f16), p.astype(f16)
  nq = jnp.sum(jnp.square(q16), axis=1, dtype=f32).astype(f16)
  npt = jnp.sum(jnp.square(p16), axis=1, dtype=f32).astype(f16)
  two_ab = 2 * jnp.matmul(q16, p16.T, preferred_element_type=f32).astype(f16)
  if q_is_row:
    d16 = jnp.maximum((nq[:, None] - two_ab) + npt[None, :], 0)
  else:
    d16 = jnp.maximum((npt[None, :] - two_ab) + nq[:, None], 0)
  if use32 is None:
    return d16.astype(f32), d16
  nq32, np32 = jnp.sum(q * q, axis=1), jnp.sum(p * p, axis=1)
  ab32 = jnp.matmul(q, p.T, precision=jax.lax.Precision.HIGHEST)
  if q_is_row:
    d32 = jnp.maximum(nq32[:, None] - 2 * ab32 + np32[None, :], 0)
  else:
    d32 = jnp.maximum(np32[None, :] - 2 * ab32 + nq32[:, None], 0)
  return jnp.where(use32, d32, d16.astype(f32)), d16


def _block_finite(d16, block):
  """(b, number of point blocks): whether each row's float16 distances are finite in each block of ``block`` points."""
  n = d16.shape[1]
  return jnp.stack([jnp.all(jnp.isfinite(d16[:, s:s + block]), axis=1) for s in range(0, n, block)], axis=1)


def _use32(use32_blocks, n, block, fallback):
  return jnp.repeat(use32_blocks, block, axis=1)[:, :n] if fallback else None


@functools.partial(jax.jit, static_argnames=('k', 'q_is_row', 'block', 'fallback'),
                   compiler_options=_NO_EXCESS_PRECISION)
def _evaluator_kth(queries, use32_blocks, points, k, q_is_row, block, fallback):
  use32 = _use32(use32_blocks, points.shape[0], block, fallback)
  d, d16 = _evaluator_sq_dists(queries, points, q_is_row, use32)
  return -jax.lax.top_k(-d, k + 1)[0][:, k], _block_finite(d16, block)


@functools.partial(jax.jit, static_argnames=('q_is_row', 'block', 'fallback'),
                   compiler_options=_NO_EXCESS_PRECISION)
def _evaluator_inside(queries, use32_blocks, points, sq_radii, q_is_row, block, fallback):
  use32 = _use32(use32_blocks, points.shape[0], block, fallback)
  d, d16 = _evaluator_sq_dists(queries, points, q_is_row, use32)
  return jnp.any(d <= sq_radii[None, :], axis=1), _block_finite(d16, block)


def _evaluator_pass(fn, queries, points, batch_size, **kw):
  """Runs ``fn`` over query batches as the evaluator would: float16 everywhere first; if some evaluator block
  (``EVALUATOR_BLOCK`` queries x ``EVALUATOR_BLOCK`` points) has a non-finite float16 distance, once more with the
  float32 formula on exactly those blocks."""
  block = EVALUATOR_BLOCK
  nq, npb = queries.shape[0], -(-points.shape[0] // block)
  batch_size = min(batch_size, nq)

  def run(use32_blocks):   # use32_blocks: (query blocks, point blocks) bool
    outs, fins = [], []
    for start in range(0, nq, batch_size):
      batch = queries[start:start + batch_size]
      valid = batch.shape[0]
      rows = use32_blocks[np.minimum(np.arange(start, start + batch_size), nq - 1) // block]
      if valid < batch_size:
        batch = jnp.pad(batch, ((0, batch_size - valid), (0, 0)))
      out, fin = fn(batch, jnp.asarray(rows), points, block=block, fallback=bool(use32_blocks.any()), **kw)
      outs.append(np.asarray(out)[:valid])
      fins.append(np.asarray(fin)[:valid])
    return np.concatenate(outs), np.concatenate(fins)

  qb = -(-nq // block)
  out, fin = run(np.zeros((qb, npb), bool))
  finite_blocks = np.stack([fin[i * block:(i + 1) * block].all(axis=0) for i in range(qb)])
  if finite_blocks.all():
    return out
  return run(~finite_blocks)[0]


def _precision_recall_evaluator(real, fake, k, batch_size):
  real, fake = jnp.asarray(real, jnp.float32), jnp.asarray(fake, jnp.float32)   # no centring: it changes float16
  real_r = _evaluator_pass(functools.partial(_evaluator_kth, k=k), real, real, batch_size, q_is_row=True)
  fake_r = _evaluator_pass(functools.partial(_evaluator_kth, k=k), fake, fake, batch_size, q_is_row=True)
  # The evaluator's rows are always the reference (real) features: recall queries are rows, precision queries
  # columns.
  recall = _evaluator_pass(_evaluator_inside, real, fake, batch_size, sq_radii=jnp.asarray(fake_r), q_is_row=True)
  precision = _evaluator_pass(_evaluator_inside, fake, real, batch_size, sq_radii=jnp.asarray(real_r),
                              q_is_row=False)
  return float(precision.mean()), float(recall.mean())


def precision_recall(real_features, fake_features, k=3, batch_size=1000, distance_dtype='float32'):
  """Improved precision and recall (Kynkaanniemi et al., 2019) of ``fake_features`` against ``real_features``.

  Each sample gets a hypersphere of radius its distance to its ``k``-th nearest neighbour within its own set
  (excluding itself). Precision is the fraction of fake samples inside at least one real hypersphere (distance <=
  radius), recall the fraction of real samples inside at least one fake hypersphere. Distances are computed in rows
  of ``batch_size`` queries against a whole set (memory ``batch_size * N``), so 50k x 50k fits; pure function.
  Returns ``(precision, recall)`` as Python floats.

  ``distance_dtype``: ``'float32'`` (default): squared distances in float32 (both sets centred on the real mean
  first, to limit cancellation). ``'float16'``: OpenAI's guided-diffusion evaluator's rule (its ``ManifoldEstimator``
  as the VAR paper ran it): features cast to float16 and squared distances ``max(|u|^2 - 2 u.v + |v|^2, 0)``
  evaluated in float16 (float32 accumulation inside the sums/matmul), with the real features as the rows ``u`` of
  every cross-set distance; a 10000 x 10000 block with a non-finite float16 distance is recomputed in float32 (its
  ``tf.cond``), and radii / comparisons use the float16 values. Equal to the evaluator whenever its float32
  accumulation order rounds to the same float16 (all but ~1e-4 of the entries).
  """
  if distance_dtype not in DISTANCE_DTYPES:
    raise ValueError(f'distance_dtype must be one of {DISTANCE_DTYPES}, got {distance_dtype!r}')
  real, fake = np.asarray(real_features), np.asarray(fake_features)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f'features must be 2-D with the same dimension, got {real.shape} and {fake.shape}')
  if not 1 <= k < min(real.shape[0], fake.shape[0]):
    raise ValueError(f'k must be in [1, min(num_real, num_fake) - 1], got k={k} for {real.shape[0]} real and '
                     f'{fake.shape[0]} fake samples')
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  if distance_dtype == 'float16':
    return _precision_recall_evaluator(real, fake, k, batch_size)
  # Centre both sets on the real mean (distances are translation-invariant) to limit cancellation in the expansion.
  center = real.mean(axis=0, dtype=np.float64)
  real, fake = jnp.asarray(real - center), jnp.asarray(fake - center)
  real_sq_radii = jnp.asarray(_batched(functools.partial(_kth_sq_radius, k=k), real, batch_size, real))
  fake_sq_radii = jnp.asarray(_batched(functools.partial(_kth_sq_radius, k=k), fake, batch_size, fake))
  precision = _batched(_inside_any, fake, batch_size, real, real_sq_radii).mean()
  recall = _batched(_inside_any, real, batch_size, fake, fake_sq_radii).mean()
  return float(precision), float(recall)
