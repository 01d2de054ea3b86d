"""Bernoulli (bit-flip) diffusion of BiGR: noise schedules, the forward process, the posterior step.

Everything here is a pure function of arrays. The schedule buffers are numpy float32 arrays of length ``T + 1``
(index 0 is the clean data), computed exactly as the reference ``noise_scheduler`` does (float64 recursion, then a
float32 cast; ``cumbeta`` is the running product of the float32 ``beta`` accumulated in float64, as CPU
``torch.cumprod`` does), so they equal the buffers stored in checkpoints bit for bit.

Conventions (reference ``BinaryDiffusion``):

* ``x_t`` is a 0/1 array; ``P(x_t = 1 | x_0) = k_final[t] * x_0 + b_final[t]`` for ``t`` in ``0..T``.
* One forward step at time ``t`` maps a probability ``q`` to ``beta[t] * q + (1 - beta[t]) / 2``.
* The transcoder is fed ``t - 1`` while the scheduler is indexed by ``t`` in ``1..T``.
* Inference walks ``sampling_steps(T, S)`` (``S`` of the ``T`` steps, descending, always ending at ``t = 1``).

The training loss terms on top of these are in ``var_jax.losses.diffusion``.
"""
from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

BETA_TYPES = ('linear', 'cos', 'sigmoid')


# ----------------------------------------------------------------------------- schedules
def _sigmoid_schedule(t, start=-3.0, end=3.0, tau=1.0, clip_min=0.0):
  sig = lambda x: 1.0 / (1.0 + np.exp(-x))
  v_start, v_end = sig(start / tau), sig(end / tau)
  out = sig((t * (end - start) + start) / tau)
  return np.clip((v_end - out) / (v_end - v_start), clip_min, 1.0)


def make_schedule(num_timesteps: int, beta_type: str = 'linear') -> Dict[str, np.ndarray]:
  """The reference ``noise_scheduler(steps, beta_type)`` buffers.

  Args:
    num_timesteps: T, the number of diffusion steps (``n_sample_steps`` of the model).
    beta_type: 'linear' (the one BiGR uses: beta_t = 1 - 1/(T-t+1)), 'cos' or 'sigmoid'.

  Returns:
    {'k_final', 'b_final', 'beta', 'cumbeta'}: float32 arrays of shape (T+1,).
  """
  steps = int(num_timesteps)
  if steps < 1:
    raise ValueError(f'the number of diffusion steps must be >= 1, got {num_timesteps}')
  if beta_type == 'linear':
    beta = 1.0 - 1.0 / (steps - np.arange(1, steps + 1) + 1)
    k, b = [1.0], [0.0]
    for i in range(steps):
      k.append(k[-1] * beta[i])
      b.append(beta[i] * b[-1] + 0.5 * (1.0 - beta[i]))
    k_final, b_final = np.asarray(k[1:]), np.asarray(b[1:])
  elif beta_type in ('cos', 'sigmoid'):
    grid = np.linspace(0.0, 1.0, steps + 1)
    if beta_type == 'cos':
      kk = 0.5 + 0.5 * np.cos(grid * np.pi)
    else:
      kk = _sigmoid_schedule(grid, 0, 3, 0.8)
    bb = (1.0 - kk) * 0.5
    beta = np.asarray([kk[i + 1] / kk[i] for i in range(steps)])
    k_final, b_final = kk[1:], bb[1:]
  else:
    raise ValueError(f'unknown beta_type {beta_type!r}; expected one of {BETA_TYPES}')
  k_final = np.hstack([1.0, k_final]).astype(np.float32)
  b_final = np.hstack([0.0, b_final]).astype(np.float32)
  beta = np.hstack([1.0, beta]).astype(np.float32)
  # torch.cumprod of a float32 CPU tensor accumulates in float64 and rounds each output once
  cumbeta = np.cumprod(beta.astype(np.float64)).astype(np.float32)
  return {'k_final': k_final, 'b_final': b_final, 'beta': beta, 'cumbeta': cumbeta}


def sampling_steps(num_timesteps: int, infer_steps: int) -> np.ndarray:
  """The timesteps the reference sampler visits, in the order it visits them (descending, ending at 1).

  All T steps when ``infer_steps == T``, else ``1 + int(linspace(0, 1, S) * (T - 1))``.
  """
  steps = np.arange(1, num_timesteps + 1)
  if infer_steps != num_timesteps:
    idx = np.array(np.linspace(0.0, 1.0, infer_steps) * (num_timesteps - 1), int)
    steps = steps[idx]
  return steps[::-1].copy()


# ----------------------------------------------------------------------------- forward process
def _at(buf, t, ndim):
  """buf[t] shaped to broadcast against an array of rank ``ndim`` whose leading axis is indexed by ``t``."""
  v = jnp.asarray(buf)[jnp.asarray(t)]
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def q_probs(x0, t, schedule: Dict[str, np.ndarray]):
  """P(x_t = 1 | x_0) = k_final[t] * x0 + b_final[t]; ``t`` indexes the leading axes of ``x0``."""
  x0 = jnp.asarray(x0, jnp.float32)
  return _at(schedule['k_final'], t, x0.ndim) * x0 + _at(schedule['b_final'], t, x0.ndim)


def q_sample(x0, t, u, schedule: Dict[str, np.ndarray]):
  """x_t = (u < P(x_t = 1 | x_0)) as 0/1 float32, with explicit uniforms ``u`` of x0's shape."""
  return (jnp.asarray(u) < q_probs(x0, t, schedule)).astype(jnp.float32)


def one_step(q, t, beta):
  """The reference ``scheduler.one_step``: ``beta[t] * q + 0.5 * (1 - beta[t])``."""
  q = jnp.asarray(q, jnp.float32)
  k = _at(beta, t, q.ndim)
  return q * k + 0.5 * (1.0 - k)


def posterior_probs(p_x0, x_t, t, t_prev, schedule: Dict[str, np.ndarray]):
  """P(x_{t_prev} = 1 | x_t, x0 ~ p_x0): the reference sampler's step from ``t`` down to ``t_prev < t``.

  ``(k[t'] [p, 1-p] + b[t']) * (one_step applied for t, t-1, ..., t'+1 to [x_t, 1-x_t])``, normalised, first
  component. ``t`` and ``t_prev`` are scalars (may be traced); the one-step products run sequentially in float32 as
  in the reference.
  """
  p = jnp.asarray(p_x0, jnp.float32)
  x_t = jnp.asarray(x_t, jnp.float32)
  k_final, b_final = jnp.asarray(schedule['k_final']), jnp.asarray(schedule['b_final'])
  beta = jnp.asarray(schedule['beta'])
  pe = jnp.stack([p, 1.0 - p], -1) * k_final[t_prev] + b_final[t_prev]
  q = jnp.stack([x_t, 1.0 - x_t], -1)

  def body(m, q):
    k = beta[t - m]
    return q * k + 0.5 * (1.0 - k)

  q = jax.lax.fori_loop(0, t - t_prev, body, q)
  un = pe * q
  un = un / un.sum(-1, keepdims=True)
  return un[..., 0]


def x0_probs(logits, x_t, *, p_flip: bool):
  """Sigmoid of (guided) transcoder logits as P(x0 = 1); with p_flip the net predicts flips of x_t."""
  p = jax.nn.sigmoid(jnp.asarray(logits, jnp.float32))
  if p_flip:
    x_t = jnp.asarray(x_t, jnp.float32)
    p = x_t * (1.0 - p) + (1.0 - x_t) * p
  return p


def check_schedule(buffers: Dict[str, np.ndarray], num_timesteps: int, beta_type: str = 'linear',
                   prefix: str = '') -> Optional[str]:
  """Name of the first buffer that differs from ``make_schedule(num_timesteps, beta_type)``, or None."""
  want = make_schedule(num_timesteps, beta_type)
  for name, w in want.items():
    a = np.asarray(buffers[name])
    if a.shape != w.shape or not np.allclose(a.astype(np.float64), w.astype(np.float64), rtol=1e-6, atol=1e-7):
      return prefix + name
  return None
