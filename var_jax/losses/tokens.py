"""Token losses: VAR's label-smoothed cross-entropy, ELM's AR / MLM losses (Hamming soft labels) and MLM mask."""
from __future__ import annotations

import itertools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _log_softmax(logits):
  return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def label_smoothed_cross_entropy(logits, targets, smoothing: float = 0.0):
  """Per-token cross-entropy with label smoothing, as ``torch.nn.CrossEntropyLoss(label_smoothing=s,
  reduction='none')``: (1 - s) * NLL(target) + s * mean over classes of -log p. logits (..., V) -> (...)."""
  logp = _log_softmax(logits)
  nll = -jnp.take_along_axis(logp, jnp.asarray(targets, jnp.int32)[..., None], axis=-1)[..., 0]
  if not smoothing:
    return nll
  return (1.0 - smoothing) * nll - smoothing * jnp.mean(logp, axis=-1)


def var_loss(logits, targets, smoothing: float = 0.1, token_weights: Optional[jax.Array] = None):
  """The reference trainer's loss: smoothed CE, per-token weight (default 1/L) summed over tokens, batch mean."""
  per_tok = label_smoothed_cross_entropy(logits, targets, smoothing)
  if token_weights is None:
    token_weights = jnp.full(per_tok.shape[-1:], 1.0 / per_tok.shape[-1], jnp.float32)
  return jnp.mean(jnp.sum(per_tok * token_weights, axis=-1))


# ----------------------------------------------------------------------------- ELM
def softlabel_weights(bit_chunks, hm_dist: int):
  """Reference ``get_softlabels`` (train_ddp.py): bit chunks (..., cd) 0/1 -> (M, 2^cd) weights, M = prod(...).

  Weight of code c is exp(-3 d(c)) / sum over codes with Hamming distance d <= hm_dist (0 beyond). Dense: 2^cd
  columns per sub-token (what the reference builds); ``hamming_soft_loss`` computes the same loss without it.
  """
  x = jnp.asarray(bit_chunks)
  cd = x.shape[-1]
  x = x.reshape(-1, cd).astype(jnp.float32)
  codes = np.arange(2 ** cd)[:, None]
  book = ((codes >> np.arange(cd - 1, -1, -1)[None]) & 1).astype(np.float32)           # (2^cd, cd) MSB first
  dots = (2 * x - 1) @ jnp.asarray(2 * book - 1).T                                       # (M, 2^cd)
  dist = (cd - dots) / 2
  w = jnp.where(dist <= hm_dist, jnp.exp(-3.0 * dist), 0.0)
  return w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-12)


def soft_label_loss(logits, weights):
  """Reference ``weights=`` loss: mean over rows of -sum_v w_v log_softmax(logits)_v; logits (..., V) flattened."""
  lp = _log_softmax(logits)
  lp = lp.reshape(-1, lp.shape[-1])
  return jnp.mean(-jnp.sum(jnp.asarray(weights, jnp.float32) * lp, axis=-1))


def _hamming_masks(code_dim: int, hm_dist: int) -> Tuple[np.ndarray, np.ndarray]:
  masks, dists = [], []
  for d in range(min(hm_dist, code_dim) + 1):
    for pos in itertools.combinations(range(code_dim), d):
      masks.append(sum(1 << p for p in pos))
      dists.append(d)
  return np.asarray(masks, np.int32), np.asarray(dists, np.float32)


def hamming_soft_loss(logits, tokens, code_dim: int, hm_dist: int):
  """``soft_label_loss(logits, softlabel_weights(bits of tokens, hm_dist))`` computed by gathering the
  sum_{k<=hm_dist} C(cd, k) neighbours of each token (XOR masks) instead of a dense (M, 2^cd) weight matrix."""
  lp = _log_softmax(logits)
  lp = lp.reshape(-1, lp.shape[-1])
  tok = jnp.asarray(tokens, jnp.int32).reshape(-1)
  masks, dists = _hamming_masks(code_dim, hm_dist)
  w = np.exp(-3.0 * dists)
  w = (w / w.sum()).astype(np.float32)
  nbr = jnp.bitwise_xor(tok[:, None], jnp.asarray(masks)[None])                          # (M, n_nbr)
  return jnp.mean(-jnp.sum(jnp.take_along_axis(lp, nbr, axis=-1) * jnp.asarray(w), axis=-1))


def ar_loss(logits, tokens, hm_dist: int = 0, code_dim: Optional[int] = None):
  """ELM AR training loss: logits (B, N*T, V), tokens (B, N, T).

  ``hm_dist=0``: mean cross-entropy over all B*N*T sub-tokens (train.sh, ``--hm-dist 0``). ``hm_dist > 0``: the
  Hamming soft-label loss of train_ddp.py (its argparse default is 1); code_dim defaults to log2(V).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  v = logits.shape[-1]
  if hm_dist > 0:
    return hamming_soft_loss(logits, tokens, code_dim or int(round(math.log2(v))), hm_dist)
  return jnp.mean(label_smoothed_cross_entropy(logits.reshape(-1, v), tokens.reshape(-1)))


def mlm_loss(logits, tokens, token_all_mask, smoothing: float = 0.0):
  """ELM MLM training loss: per sub-token CE with label smoothing (reference ``LabelSmoothingCrossEntropy``:
  (1-s) nll + s mean(-log p)), averaged over the masked sub-tokens. logits (B, N*T, V), tokens (B, N, T),
  token_all_mask (B, N) (1 = masked position)."""
  tokens = jnp.asarray(tokens, jnp.int32)
  b, n, t = tokens.shape
  loss = label_smoothed_cross_entropy(jnp.reshape(logits, (b, n, t, -1)), tokens, smoothing)
  m = jnp.broadcast_to(jnp.asarray(token_all_mask, jnp.float32)[..., None], (b, n, t))
  return jnp.sum(loss * m) / jnp.sum(m)


def mlm_random_mask(rng, batch: int, seq_len: int, gen_iter: int = 10, schedule: str = 'cos'):
  """The reference MLM training mask (``maskpersample=False``): one step ~ U{0..gen_iter-1} per batch, mask rate
  cos(pi/2 * step/gen_iter) ('cos') or 1 - step/gen_iter ('linear'), max(1, floor(N * rate)) positions per row
  chosen uniformly. -> (B, N) uint8, 1 = masked."""
  k_step, k_noise = jax.random.split(rng)
  step = jax.random.randint(k_step, (), 0, gen_iter)
  ratio = step.astype(jnp.float32) / gen_iter
  if schedule == 'cos':
    rate = jnp.cos(math.pi / 2.0 * ratio)
  elif schedule == 'linear':
    rate = 1.0 - ratio
  else:
    raise ValueError(f"schedule must be 'cos' or 'linear', got {schedule!r}")
  n_mask = jnp.maximum(1, jnp.floor(seq_len * rate).astype(jnp.int32))
  noise = jax.random.uniform(k_noise, (batch, seq_len))
  rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  return (rank < n_mask).astype(jnp.uint8)
