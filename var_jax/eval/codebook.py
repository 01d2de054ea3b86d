"""Tokenizer health during training (traceable, jnp): reconstruction PSNR, the VQVAE's per-scale code-usage EMA
and its margins (the reference's ``ema_vocab_hit_SV``), and the BAE's bit statistics."""
from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models.var_config import VQVAEConfig


def psnr(x, y):
  """PSNR in dB of images in [-1, 1] (measured on [0, 1])."""
  mse = jnp.mean(jnp.square((jnp.clip(x, -1, 1) - jnp.clip(y, -1, 1)) / 2), axis=(1, 2, 3))
  return jnp.mean(10 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)))


def update_code_ema(ema, hits, step):
  """The reference's ema_vocab_hit_SV update: copy at the first step, 0.9/0.1 below 100 steps, then 0.99/0.01."""
  decay = jnp.where(step == 0, 0.0, jnp.where(step < 100, 0.9, 0.99))
  return ema * decay + hits * (1 - decay)


def usage_margins(vae_cfg: VQVAEConfig, global_batch: int) -> np.ndarray:
  """Per-scale hit threshold: 8% of a uniform share of that scale's tokens per step (the reference's margin)."""
  return np.array([global_batch * p * p / vae_cfg.vocab_size * 0.08 for p in vae_cfg.patch_nums], np.float32)


def bit_statistics(bits, probs, near: float = 0.1) -> Dict[str, jax.Array]:
  """Bit-usage statistics of a batch of BAE codes: bits (..., K) 0/1 and their probabilities (..., K).

  ``bit_mean_per_channel`` (K,): mean activation of each bit; ``bits_used``: channels that are not constant over
  the batch (the reference's "unique codes used"); ``bit_entropy``: mean binary entropy (in bits) of the channel
  means (1 = every channel balanced); ``probs_near_half``: fraction of probabilities with |p - 0.5| < ``near``;
  ``prob_confidence``: mean |2p - 1| (1 = every bit certain).
  """
  k = bits.shape[-1]
  mean = jnp.mean(bits.reshape(-1, k).astype(jnp.float32), axis=0)
  m = jnp.clip(mean, 1e-7, 1 - 1e-7)
  ent = -(m * jnp.log2(m) + (1 - m) * jnp.log2(1 - m))
  ent = jnp.where((mean > 0) & (mean < 1), ent, 0.0)
  p = probs.astype(jnp.float32)
  return {'bit_mean_per_channel': mean, 'bits_used': jnp.sum((mean > 0) & (mean < 1)).astype(jnp.float32),
          'bit_entropy': jnp.mean(ent), 'probs_near_half': jnp.mean((jnp.abs(p - 0.5) < near).astype(jnp.float32)),
          'prob_confidence': jnp.mean(jnp.abs(2 * p - 1))}
