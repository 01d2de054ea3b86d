"""Losses shared by the trainers."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def label_smoothed_cross_entropy(logits, targets, smoothing: float = 0.0):
  """Per-token cross-entropy with label smoothing, as ``torch.nn.CrossEntropyLoss(label_smoothing=s,
  reduction='none')``: (1 - s) * NLL(target) + s * mean over classes of -log p. logits (..., V) -> (...)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if not smoothing:
    return nll
  return (1.0 - smoothing) * nll - smoothing * jnp.mean(logp, axis=-1)


def var_loss(logits, targets, smoothing: float = 0.1, token_weights: Optional[jax.Array] = None):
  """The reference trainer's loss: smoothed CE, per-token weight (default 1/L) summed over tokens, batch mean."""
  per_tok = label_smoothed_cross_entropy(logits, targets, smoothing)
  if token_weights is None:
    token_weights = jnp.full(per_tok.shape[-1:], 1.0 / per_tok.shape[-1], jnp.float32)
  return jnp.mean(jnp.sum(per_tok * token_weights, axis=-1))
