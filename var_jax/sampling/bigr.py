"""BiGR generation (the reference ``Transformer.generate_with_cfg``) as one jitted program.

Iteration ``it`` of ``num_iter`` (ratio r = (it+1)/I):

1. The backbone runs on [cond; null] with the bits fixed so far (unfixed positions enter as ``mask_tok``).
2. The transcoder denoises one x_t chain per token from x_T ~ Bernoulli(0.5) over ``infer_steps`` of the T diffusion
   steps (descending). The **same** x_t feeds the conditional and the null condition; CFG mixes the logits
   (``l_u + cfg (l_c - l_u)`` after dividing by the temperature), then sigmoid (and the p_flip re-mapping). Every step
   but the last samples the Bernoulli posterior; the last (t = 1) returns the x0 probabilities ``pred``.
3. Confidence = mean_k |2 pred - 1|; fixed positions get -inf; ``gumbel_temp * schedule(r) * G`` is added; the
   ``floor(N cos(pi/2 it/I)) - floor(N cos(pi/2 r))`` most confident positions are fixed to Bernoulli(pred) bits.

Both loops are ``lax`` loops; the counts, CFG and Gumbel scales per iteration are static tables. Randomness is either
injected (``noise``: the arrays ``u_diff`` (I, S, B*N, K), ``u_select`` (I, B, N, K), ``gumbel`` (I, B, N), i.e. the
fixture's ``sample_u_diff``/``sample_u_select``/``sample_gumbel``; Bernoulli(p) is ``u < p``) or drawn from a PRNG
key inside the loops (``fold_in`` per iteration and step, so nothing of size I*S*B*N*K is materialised).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models import bernoulli_diffusion as bd
from var_jax.models.bigr import BiGR
from var_jax.sampling.common import as_key


def cosine_unmask_counts(seq_len: int, num_iter: int) -> np.ndarray:
  """Positions fixed per iteration: floor(N cos(pi/2 i/I)) - floor(N cos(pi/2 (i+1)/I)) (float64, as numpy)."""
  out, old = [], seq_len
  for step in range(num_iter):
    new = math.floor(np.cos(math.pi / 2.0 * (1.0 * (step + 1) / num_iter)) * seq_len)
    out.append(old - new)
    old = new
  return np.asarray(out, np.int32)


def _per_iteration(value: float, schedule: str, num_iter: int, forms, what: str) -> np.ndarray:
  """``forms[schedule](value, ratio)`` per iteration (num_iter,) float64, ratio = (it+1)/I."""
  if schedule not in forms:
    raise ValueError(f'unknown {what} {schedule!r}; expected one of {tuple(forms)}')
  ratio = (np.arange(num_iter) + 1.0) / num_iter
  return np.broadcast_to(np.asarray(forms[schedule](value, ratio), np.float64), (num_iter,)).copy()


_CFG_FORMS = {'constant': lambda c, r: c, 'linear': lambda c, r: 1.0 + (c - 1.0) * r}
_GUMBEL_FORMS = {'constant': lambda g, r: g, 'down': lambda g, r: g * (1.0 - r), 'up': lambda g, r: g * r}
CFG_SCHEDULES = tuple(_CFG_FORMS)
GUMBEL_SCHEDULES = tuple(_GUMBEL_FORMS)


def cfg_scales(cfg_scale: float, cfg_schedule: str, num_iter: int) -> np.ndarray:
  """CFG scale per iteration: constant, or linear 1 + (cfg - 1) (it+1)/I."""
  return _per_iteration(cfg_scale, cfg_schedule, num_iter, _CFG_FORMS, 'cfg_schedule')


def gumbel_scales(gumbel_temp: float, gumbel_schedule: str, num_iter: int) -> np.ndarray:
  """Gumbel scale per iteration: constant, down (1 - ratio) or up (ratio), ratio = (it+1)/I."""
  return _per_iteration(gumbel_temp, gumbel_schedule, num_iter, _GUMBEL_FORMS, 'gumbel_schedule')


def make_generate_fn(model: BiGR, batch: int, *, num_iter: int = 10, cfg_scale: float = 1.0,
                     cfg_schedule: str = 'constant', gumbel_temp: float = 1.0, gumbel_schedule: str = 'constant',
                     temperature: Optional[float] = None, infer_steps: Optional[int] = None, injected: bool = False):
  """A jitted ``fn(variables, labels, noise_or_key) -> dict`` for a fixed batch size and settings (see ``generate``).

  With ``injected`` the third argument is the noise dict {'u_diff', 'u_select', 'gumbel'}; else a PRNG key.
  """
  cfg = model.config
  temperature = float(cfg.sample_temperature if temperature is None else temperature)
  infer_steps = cfg.infer_steps if infer_steps is None else int(infer_steps)
  if not 1 <= infer_steps <= cfg.n_sample_steps:
    raise ValueError(f'infer_steps must be in 1..{cfg.n_sample_steps}, got {infer_steps}')
  cfgs = cfg_scales(cfg_scale, cfg_schedule, num_iter)
  gscales = gumbel_scales(gumbel_temp, gumbel_schedule, num_iter)
  n, k, d = cfg.seq_len, cfg.binary_size, cfg.dim
  counts = cosine_unmask_counts(n, num_iter)
  if counts.sum() != n:
    raise ValueError(f'the cosine schedule fixes {counts.sum()} of {n} positions')   # never for cos
  sched = bd.make_schedule(cfg.n_sample_steps, cfg.beta_type)
  steps = bd.sampling_steps(cfg.n_sample_steps, infer_steps)                # descending, ends at 1
  m = batch * n
  noise_shapes = {'u_diff': (num_iter, infer_steps, m, k), 'u_select': (num_iter, batch, n, k),
                  'gumbel': (num_iter, batch, n)}

  def fn(variables, labels, noise_or_key):
    labels = jnp.asarray(labels, jnp.int32)
    if labels.shape != (batch,):
      raise ValueError(f'labels must have shape ({batch},), got {labels.shape}')
    labels2 = jnp.concatenate([labels, jnp.full_like(labels, cfg.null_class)])
    gsc = jnp.asarray(gscales, jnp.float32)
    if injected:
      noise = noise_or_key
      for name, shape in noise_shapes.items():
        if tuple(noise[name].shape) != shape:
          raise ValueError(f'noise[{name!r}] has shape {tuple(noise[name].shape)}, expected {shape}')
      u_diff = lambda it, j: noise['u_diff'][it, j]
      u_select = lambda it: noise['u_select'][it]
      gumbel = lambda it: noise['gumbel'][it]
    else:
      k_diff, k_sel, k_gum = jax.random.split(noise_or_key, 3)
      u_diff = lambda it, j: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(k_diff, it), j), (m, k))
      u_select = lambda it: jax.random.uniform(jax.random.fold_in(k_sel, it), (batch, n, k))
      gumbel = lambda it: jax.random.gumbel(jax.random.fold_in(k_gum, it), (batch, n))

    def x0_probs(x_t, t, zz, cfg_it):
      logits = model.apply(variables, jnp.concatenate([x_t, x_t]), jnp.full((2 * m,), t, jnp.int32), zz,
                           method=BiGR.transcoder) / temperature
      lc, lu = logits[:m], logits[m:]
      return bd.x0_probs(lu + cfg_it * (lc - lu), x_t, p_flip=cfg.p_flip)

    def iteration(it, carry):
      seq, mask, unmask_iter, preds, masks_before = carry
      cfg_it = jnp.asarray(cfgs, jnp.float32)[it]
      z = model.apply(variables, jnp.concatenate([seq, seq]), labels2, jnp.concatenate([mask, mask]),
                      method=BiGR.backbone)                                 # (2B, N, D)
      zz = z.reshape(2 * m, d)
      x_t = (u_diff(it, 0) < 0.5).astype(jnp.float32)

      def step(j, x_t):
        t, t_prev = jnp.asarray(steps)[j], jnp.asarray(steps)[j + 1]
        p = x0_probs(x_t, t, zz, cfg_it)
        post = bd.posterior_probs(p, x_t, t, t_prev, sched)
        return (u_diff(it, j + 1) < post).astype(jnp.float32)

      x_t = jax.lax.fori_loop(0, len(steps) - 1, step, x_t)
      pred = x0_probs(x_t, int(steps[-1]), zz, cfg_it).reshape(batch, n, k)
      conf = jnp.mean(jnp.abs(pred - 0.5) * 2.0, -1)
      conf = jnp.where(mask, conf, -jnp.inf) + gsc[it] * gumbel(it)
      rank = jnp.argsort(jnp.argsort(-conf, axis=1), axis=1)
      chosen = rank < jnp.asarray(counts)[it]
      bits = (u_select(it) < pred).astype(jnp.float32)
      seq = jnp.where(chosen[..., None], bits, seq)
      masks_before = masks_before.at[it].set(mask)
      preds = preds.at[it].set(pred)
      unmask_iter = jnp.where(chosen, it, unmask_iter)
      return seq, mask & ~chosen, unmask_iter, preds, masks_before

    carry = (jnp.zeros((batch, n, k), jnp.float32), jnp.ones((batch, n), bool), jnp.full((batch, n), -1, jnp.int32),
             jnp.zeros((num_iter, batch, n, k), jnp.float32), jnp.zeros((num_iter, batch, n), bool))
    seq, mask, unmask_iter, preds, masks_before = jax.lax.fori_loop(0, num_iter, iteration, carry)
    return {'bits': seq.astype(jnp.uint8), 'pred': preds, 'mask_before': masks_before, 'unmask_iter': unmask_iter,
            'unmask_count': jnp.asarray(counts), 'final_mask': mask}

  return jax.jit(fn)


def generate(model: BiGR, variables: Mapping[str, Any], labels, *, num_iter: int = 10, cfg_scale: float = 1.0,
             cfg_schedule: str = 'constant', gumbel_temp: float = 1.0, gumbel_schedule: str = 'constant',
             temperature: Optional[float] = None, infer_steps: Optional[int] = None, rng=None,
             noise: Optional[Mapping[str, Any]] = None) -> Dict[str, jax.Array]:
  """Sample bits for ``labels`` (B,): the reference ``generate_with_cfg``.

  Builds and compiles the program each call; use ``make_generate_fn`` once to sample many batches.

  Args:
    model, variables: a ``BiGR`` and its {'params': ...}.
    labels: (B,) class ids.
    num_iter: unmasking iterations I.
    cfg_scale, cfg_schedule: CFG on the transcoder logits ('constant' or 'linear'). The reference needs
      cfg_scale > 1 (it crashes otherwise); here cfg_scale = 1 is plain conditional sampling.
    gumbel_temp, gumbel_schedule: the Gumbel noise on the confidences ('constant', 'down' or 'up').
    temperature, infer_steps: default to the config's ``sample_temperature`` and ``infer_steps`` (S).
    rng: a PRNG key or an int seed (when ``noise`` is None).
    noise: injected randomness {'u_diff': (I, S, B*N, K), 'u_select': (I, B, N, K), 'gumbel': (I, B, N)}
      (unscaled standard Gumbel noise).

  Returns:
    {'bits' (B, N, K) uint8, 'pred' (I, B, N, K) x0 probabilities per iteration, 'mask_before' (I, B, N) bool,
    'unmask_iter' (B, N), 'unmask_count' (I,), 'final_mask' (B, N) (all False)}.
  """
  labels = jnp.asarray(labels, jnp.int32)
  fn = make_generate_fn(model, int(labels.shape[0]), num_iter=num_iter, cfg_scale=cfg_scale,
                        cfg_schedule=cfg_schedule, gumbel_temp=gumbel_temp, gumbel_schedule=gumbel_schedule,
                        temperature=temperature, infer_steps=infer_steps, injected=noise is not None)
  if noise is not None:
    return fn(variables, labels, {name: jnp.asarray(noise[name], jnp.float32) for name in ('u_diff', 'u_select',
                                                                                           'gumbel')})
  if rng is None:
    raise ValueError('generate needs rng (a PRNG key or an int seed) or injected noise')
  return fn(variables, labels, as_key(rng))
