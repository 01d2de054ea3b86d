"""BiGR's training loss: the reference training randomness (mask, timesteps, x_t uniforms) drawn from one key, and
the loss of ``BiGR.loss`` under it."""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models.bigr import BiGR


def training_mask_count(step, seq_len: int):
  """max(1, floor(N cos(pi/2 * step/N))) in float32, as the reference computes it (step in 0..N-1)."""
  ratio = jnp.asarray(step, jnp.float32) / jnp.float32(seq_len)
  rate = jnp.cos(jnp.float32(math.pi / 2.0) * ratio)
  return jnp.maximum(1, jnp.floor(jnp.float32(seq_len) * rate).astype(jnp.int32))


def sample_training_inputs(key, batch: int, seq_len: int, binary_size: int, num_timesteps: int
                           ) -> Dict[str, jax.Array]:
  """The reference's training randomness from one key: one mask count per batch (cosine schedule), that many
  masked positions per row (the smallest of B x N uniforms), one timestep per token in 1..T, and the uniforms
  that draw x_t. Returns {'token_all_mask' (B, N) bool, 't' (B*N,) int32, 'u' (B*N, K) float32}."""
  k_step, k_noise, k_t, k_u = jax.random.split(key, 4)
  step = jax.random.randint(k_step, (), 0, seq_len)
  count = training_mask_count(step, seq_len)
  noise = jax.random.uniform(k_noise, (batch, seq_len))
  ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  mask = ranks < count
  t = jax.random.randint(k_t, (batch * seq_len,), 1, num_timesteps + 1)
  u = jax.random.uniform(k_u, (batch * seq_len, binary_size))
  return {'token_all_mask': mask, 't': t.astype(jnp.int32), 'u': u}


def training_loss(model: BiGR, params, key, inp, labels, *, train: bool = True,
                  schedule: Optional[Dict[str, np.ndarray]] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The reference training loss with all randomness drawn from ``key``: mask, timesteps, x_t uniforms, label
  dropout (class_dropout_prob) and, with ``train``, the dropouts."""
  cfg = model.config
  k_in, k_lab, k_drop = jax.random.split(key, 3)
  b, n, k = np.shape(inp)
  r = sample_training_inputs(k_in, b, n, k, cfg.n_sample_steps)
  variables = params if 'params' in params else {'params': params}
  return model.apply(variables, inp, labels, r['token_all_mask'], r['t'], r['u'],
                     label_drop_rng=k_lab if train else None, deterministic=not train, schedule=schedule,
                     rngs={'dropout': k_drop} if train else None, method=BiGR.loss)
