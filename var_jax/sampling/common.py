"""What the three families' samplers share: PRNG keys per sample, class labels, param casting, top-k / top-p."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def as_key(rng, what: str = 'rng'):
  """A PRNG key from a key or an int seed; None is an error naming ``what``."""
  if rng is None:
    raise ValueError(f'{what} must be a PRNG key or an int seed, got None')
  if isinstance(rng, (int, np.integer)):
    if not 0 <= int(rng) < 2 ** 32:     # jax.random.key keeps the low 32 bits: 2^32 + s would repeat seed s
      raise ValueError(f'{what}: int seed {int(rng)} is outside [0, 2^32) (PRNG seeds are 32 bits)')
    return jax.random.key(int(rng))
  return rng


def per_sample_keys(rng, num_samples: int, sample_ids=None) -> jax.Array:
  """(N,) keys ``fold_in(rng, i)`` for i = 0..N-1, or for the given global ``sample_ids`` (so a sample depends only
  on its own id: not on its batch, the batch size or the device count); rng a key or an int seed."""
  rng = as_key(rng)
  if sample_ids is None:
    ids = jnp.arange(num_samples, dtype=jnp.uint32)
  else:
    ids = jnp.asarray(sample_ids, jnp.uint32).reshape(-1)
    if ids.shape[0] != num_samples:
      raise ValueError(f'{ids.shape[0]} sample_ids for {num_samples} samples')
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(ids)


def resolve_labels(labels, rng, num_samples, num_classes: int) -> np.ndarray:
  """Class labels of a sampling call as int32 (num_classes = unconditional): ``labels`` as given (one label repeated
  ``num_samples`` times), or ``num_samples`` random classes drawn from ``rng`` when ``labels`` is None."""
  nc = num_classes
  if labels is None:
    if num_samples is None:
      raise ValueError('labels=None samples random classes: give num_samples too')
    return np.asarray(jax.random.randint(jax.random.fold_in(rng, 0x7fffffff), (num_samples,), 0, nc), np.int32)
  lab = np.asarray(labels).reshape(-1)
  if num_samples is not None and lab.size == 1:
    lab = np.repeat(lab, num_samples)
  return _checked(lab, labels, nc)


def _checked(lab: np.ndarray, given, nc: int) -> np.ndarray:
  """``lab`` as int32 if it holds integers in [0, nc] (nc = unconditional), else an error showing ``given``."""
  if lab.size == 0 or not np.issubdtype(lab.dtype, np.integer):
    raise ValueError(f'labels must be integers in [0, {nc}] ({nc} = unconditional), got {given!r}')
  if lab.min() < 0 or lab.max() > nc:
    raise ValueError(f'class label out of range: class labels must lie in [0, {nc}] ({nc} = unconditional), '
                     f'got min {lab.min()} max {lab.max()}')
  return lab.astype(np.int32)


def batch_labels(labels, batch: int, num_classes: int, default: Optional[int] = None) -> jax.Array:
  """Labels of an inference batch -> (B,) int32 in [0, num_classes]: (B,) per sample, one int for all, or None for
  ``default`` (when given)."""
  if labels is None and default is not None:
    return jnp.full((batch,), default, jnp.int32)
  lab = np.asarray(labels)
  lab = np.broadcast_to(lab, (batch,)) if lab.ndim == 0 else lab.reshape(-1)
  if lab.shape != (batch,):
    raise ValueError(f'{lab.size} labels for a batch of {batch}')
  return jnp.asarray(_checked(lab, labels, num_classes))


def cast_floating(tree, dtype):
  """Cast the floating leaves of a param tree (once, outside the sampling loop)."""
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def filter_top_k_top_p(logits, top_k: Optional[int] = 0, top_p: float = 0.0):
  """Mask logits to -inf outside the top-k and outside the top-p nucleus, with the reference's semantics.

  top-k keeps every logit >= the k-th largest (ties kept; k clipped to V; 0/None: off). top-p removes the tokens
  whose ascending cumulative probability is <= 1 - top_p, i.e. keeps a token iff the probability mass ranked above
  it is < top_p (so the largest is always kept). Implemented with one descending sort of the k (or V) largest values
  and a threshold compare — no argsort/scatter over the vocabulary. (Only exact float ties at the nucleus boundary
  can be decided differently from the reference's sort order, which is itself arbitrary there.)
  """
  top_k = int(top_k or 0)
  if top_k <= 0 and top_p <= 0:
    return logits
  v = logits.shape[-1]
  k = min(top_k, v) if top_k > 0 else v
  vals = jax.lax.top_k(logits, k)[0]                               # descending, (..., k)
  thresh = vals[..., -1:] if top_k > 0 else jnp.full_like(vals[..., :1], -jnp.inf)
  if top_p > 0:
    probs = jax.nn.softmax(vals.astype(jnp.float32), axis=-1)
    above = jnp.cumsum(probs, axis=-1) - probs                     # mass ranked strictly above each value
    keep = above < top_p
    thresh = jnp.maximum(thresh, jnp.min(jnp.where(keep, vals, jnp.inf), axis=-1, keepdims=True))
  return jnp.where(logits < thresh, -jnp.inf, logits)
