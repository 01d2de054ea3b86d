"""The training loss terms of BiGR's Bernoulli diffusion (the reference ``BinaryDiffusion._train_loss``): BCE with
logits, the reference ``focal_loss`` and the per-bit terms ``loss_terms`` (with the optional auxiliary one-step
posterior BCE) on the schedule of ``var_jax.models.bernoulli_diffusion``."""
from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models import bernoulli_diffusion as bd


def bce_with_logits(logits, y):
  """torch ``binary_cross_entropy_with_logits(reduction='none')``: max(l,0) - l*y + log1p(exp(-|l|))."""
  return jnp.maximum(logits, 0.0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def focal_loss(logits, targets, alpha: float = -1.0, gamma: float = 1.0):
  """The reference ``focal_loss``: BCE * clamp(1 - p_t)^gamma, times an alpha weighting.

  ``alpha == -1``: the paper's weighted BCE, ``(1-w) y + w (1-y) + 1/K`` with ``w`` the fraction of ones among the K
  targets of a row; ``alpha > 0``: ``alpha y + (1-alpha)(1-y)``; otherwise unweighted.
  """
  p = jax.nn.sigmoid(logits)
  ce = bce_with_logits(logits, targets)
  p_t = 1.0 - (p * targets + (1.0 - p) * (1.0 - targets))
  p_t = jnp.clip(p_t, 1e-6, 1.0 - 1e-6)
  loss = ce * p_t ** gamma
  k = targets.shape[-1]
  if alpha == -1:
    w = targets.sum(-1, keepdims=True) / k
    loss = ((1.0 - w) * targets + w * (1.0 - targets) + 1.0 / k) * loss
  elif alpha > 0:
    loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
  return loss


def _bce_probs(pred, y):
  return -(jnp.log(pred) * y + (1.0 - y) * jnp.log(1.0 - pred))


def loss_terms(logits, x0, x_t, t, schedule: Dict[str, np.ndarray], *, p_flip: bool, focal: float = 0.0,
               alpha: float = -1.0, aux: float = 0.0) -> Dict[str, jnp.ndarray]:
  """Per-bit training losses of the reference ``BinaryDiffusion._train_loss`` (loss_final='mean').

  Args:
    logits: (M, K) transcoder output for (x_t, t - 1).
    x0: (M, K) clean 0/1 bits.
    x_t: (M, K) noisy 0/1 bits.
    t: (M,) timesteps in 1..T.
    schedule: ``make_schedule`` buffers.
    p_flip: predict the flips (target x0 XOR x_t) instead of x0.
    focal: focal gamma; ``< 0`` selects plain BCE.
    alpha: focal alpha (-1 = the paper's weighted BCE).
    aux: weight of the auxiliary one-step posterior BCE (0 = off).

  Returns:
    {'loss_all', 'bce_loss_all'} (M, K), and the scalars 'loss', 'bce_loss', 'acc' (means over all bits, as the
    diffusion module reports them), plus 'aux_loss' when aux > 0.
  """
  logits = jnp.asarray(logits, jnp.float32)
  x0 = jnp.asarray(x0, jnp.float32)
  x_t = jnp.asarray(x_t, jnp.float32)
  if p_flip:
    flipped = x_t * (-logits) + (1.0 - x_t) * logits     # logits of x0 itself
    if focal >= 0:
      target = jnp.logical_xor(x0 > 0.5, x_t > 0.5).astype(jnp.float32)
      bce = focal_loss(logits, target, alpha=alpha, gamma=focal)
    else:
      bce = bce_with_logits(flipped, x0)
    logits = flipped
  else:
    if focal >= 0:
      bce = focal_loss(logits, x0, alpha=0, gamma=focal)
    else:
      bce = bce_with_logits(logits, x0)
  acc = jnp.mean(((logits > 0.0).astype(jnp.float32) == x0).astype(jnp.float32))
  out = {'bce_loss_all': bce, 'bce_loss': bce.mean(), 'acc': acc}
  loss_all = bce
  if aux > 0:
    t = jnp.asarray(t)
    ftr = ((t - 1) == 0).astype(jnp.float32)[:, None]
    p0 = jax.nn.sigmoid(logits)
    pe = bd.q_probs(jnp.stack([p0, 1.0 - p0], -1), t - 1, schedule)
    q1 = bd.one_step(jnp.stack([x_t, 1.0 - x_t], -1), t, schedule['beta'])
    un = pe * q1
    un = (un / (un.sum(-1, keepdims=True) + 1e-6))[..., 0]
    x_tm1 = un * (1.0 - ftr) + p0 * ftr
    pe_gt = bd.q_probs(jnp.stack([x0, 1.0 - x0], -1), t - 1, schedule)
    gt = pe_gt * q1
    gt = (gt / (gt.sum(-1, keepdims=True) + 1e-6))[..., 0]
    aux_all = _bce_probs(jnp.clip(x_tm1, 1e-6, 1.0 - 1e-6), jnp.clip(gt, 0.0, 1.0))
    loss_all = aux * aux_all + loss_all
    out['aux_loss'] = aux_all.mean()
  out['loss_all'] = loss_all
  out['loss'] = loss_all.mean()
  return out
