"""ELM generation (the reference ``generate_cfg`` of ``llama/ar_model.py`` and ``llama/mlm_model.py``) in JAX.

**AR** (``ar_sample_tokens``): the batch holds every sample's (cond, null) pair on adjacent rows (2B rows; the
reference stacks [all cond; all null], the same rows in another order). The class slot is prefilled into a preallocated
KV cache (``ELMAR.decode`` at position 0), then every step runs one new position against the cache: step s feeds
token s-1 and predicts token s, so N steps give the N tokens. The reference recomputes the whole prefix at every
step instead; the logits are the same (``tests/elm_sampling_test.py`` checks both against each other and against the
fixtures). At step s (ratio r = (s+1)/N):

  logits = u + (c - u) * cfg(r);  logits /= temperature;  keep logits >= the top_k-th value;  sample softmax

for each of the T sub-tokens of the position independently (they share one hidden state). The whole loop is one
``lax.scan``.

**MLM** (``mlm_sample_tokens``): starts from all-mask tokens; at iteration it (ratio r = (it+1)/I):

1. logits of [cond; null] from the full bidirectional forward, ``u + (c - u) * cfg(r)`` (no temperature, no top-k:
   the reference uses neither here);
2. every sub-token is sampled from the softmax; known positions keep their tokens (``sampled``);
3. confidence of a position = mean over its T sub-tokens of ``log p(sampled) + temperature * (1 - r) * Gumbel``
   (+inf for known positions);
4. ``mask_len = max(1, min(#unknown - 1, floor(N * cos(pi/2 r))))`` (``mask_schtype='linear'``: 1 - r); the
   positions whose confidence is ``<=`` the mask_len-th smallest are masked again for the next iteration.

The result is the last ``sampled`` (all positions filled), as the reference returns ``sampled_ids``. The reference
takes ``#unknown`` of the batch's first sample for every sample; here each sample uses its own count, which is the
same number unless confidences tie exactly at a cut (measure zero with Gumbel noise), and keeps samples independent
of their batch.

**Randomness**, per sample: either a PRNG key per sample (``keys`` (B,); step s of sample i draws from
``fold_in(key_i, s)``, so a sample does not depend on its batch), or injected numbers in the reference fixtures'
layout: AR ``uniforms`` (N, B, T) (sub-token i at step s uses ``uniforms[s, :, i]``), MLM ``uniforms`` (I, B, N*T)
and ``gumbel`` (I, B, N, T) (standard Gumbel noise, scaled here). A categorical draw from a uniform u is the inverse
CDF ``(cumsum(probs) <= u).sum()`` clipped to V - 1 (the fixtures' rule); keyed sampling uses the same rule with
``jax.random.uniform``. Greedy decoding is ``top_k=1``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models.elm import ELMAR, ELMMLM, init_cache
from var_jax.sampling.common import filter_top_k_top_p, per_sample_keys

AR_CFG_SCHEDULES = ('constant', 'linear', 'cos', 'log', 'square', 'square_root')
MLM_CFG_SCHEDULES = ('constant', 'linear', 'powercos')
MASK_SCHEDULES = ('cos', 'linear')


# ----------------------------------------------------------------------------- schedules (host, float64)
def _step_ratios(num_iter: int):
  """(step, ratio = (step + 1) / num_iter) per step, in Python floats as the reference."""
  return [(step, 1.0 * (step + 1) / num_iter) for step in range(int(num_iter))]


def cfg_scales(cfg_scale: float, cfg_schedule: str, num_iter: int, modeling: str = 'ar',
               scale_pow: float = 1.0) -> np.ndarray:
  """CFG scale per step (num_iter,) float64, as the reference computes it in Python floats.

  With ratio = (step+1)/num_iter: constant cfg; linear 1 + (cfg-1) ratio; cos 1 + (cfg-1) cos(-pi/2 + ratio pi/2);
  log 1 + (cfg-1) log1p(ratio (e-1)) / log1p(e-1); square 1 + (cfg-1) ratio^2; square_root 1 + (cfg-1)
  sqrt(step/num_iter) (step, not step+1, as upstream). These are the AR schedules; the MLM generate has constant,
  linear and powercos ((cfg-1) (1 - cos(pi ratio^scale_pow)) / 2 + 1).
  """
  allowed = AR_CFG_SCHEDULES if modeling == 'ar' else MLM_CFG_SCHEDULES
  if cfg_schedule not in allowed:
    raise ValueError(f'unknown cfg_schedule {cfg_schedule!r} for ELM {modeling.upper()}; expected one of {allowed}')
  return np.asarray([float(_cfg_at(cfg_scale, cfg_schedule, step, ratio, num_iter, scale_pow))
                     for step, ratio in _step_ratios(num_iter)], np.float64)


def _cfg_at(cfg_scale: float, cfg_schedule: str, step: int, ratio: float, num_iter: int, scale_pow: float):
  if cfg_schedule == 'constant':
    return cfg_scale
  if cfg_schedule == 'linear':
    return 1.0 + (cfg_scale - 1.0) * ratio
  if cfg_schedule == 'cos':
    return 1.0 + (cfg_scale - 1.0) * np.cos(-np.pi / 2 + ratio * (np.pi / 2))
  if cfg_schedule == 'log':
    return 1.0 + (cfg_scale - 1.0) * np.log1p(ratio * (np.e - 1.0)) / np.log1p(np.e - 1.0)
  if cfg_schedule == 'square':
    return 1.0 + (cfg_scale - 1) * ratio ** 2
  if cfg_schedule == 'square_root':
    return 1.0 + (cfg_scale - 1.0) * ((1.0 * step / num_iter) ** 0.5)
  return (cfg_scale - 1) * ((1 - np.cos((((step + 1) / num_iter) ** scale_pow) * math.pi)) * 1 / 2) + 1   # powercos


def mlm_mask_lengths(seq_len: int, num_iter: int, mask_schtype: str = 'cos') -> np.ndarray:
  """floor(N * mask_ratio) per iteration (before the clamp to [1, #unknown - 1]); mask_ratio = cos(pi/2 r)
  ('cos', the default) or 1 - r ('linear'), r = (it+1)/I, in float64 as the reference."""
  if mask_schtype not in MASK_SCHEDULES:
    raise ValueError(f'unknown mask_schtype {mask_schtype!r}; expected one of {MASK_SCHEDULES}')
  ratios = [np.cos(math.pi / 2.0 * r) if mask_schtype == 'cos' else 1.0 - r for _, r in _step_ratios(num_iter)]
  return np.asarray([int(np.floor(seq_len * m)) for m in ratios], np.int64)


def mlm_masked_counts(seq_len: int, num_iter: int, mask_schtype: str = 'cos') -> np.ndarray:
  """Positions masked after each MLM iteration: mask_len = max(1, min(#unknown - 1, floor(N mask_ratio))), with
  #unknown = N before the first iteration and the previous mask_len after (the count without ties at the cut).
  The last entry is what the final iteration would re-mask; the result ignores it (all N are returned filled)."""
  unknown, out = int(seq_len), []
  for floor_len in mlm_mask_lengths(seq_len, num_iter, mask_schtype):
    unknown = max(1, min(unknown - 1, int(floor_len)))
    out.append(unknown)
  return np.asarray(out, np.int64)


# ----------------------------------------------------------------------------- sampling primitives
def inverse_cdf(probs, u):
  """Categorical sample by inverse CDF: ``(cumsum(probs) <= u).sum()`` clipped to V - 1. probs (..., V), u (...)."""
  cdf = jnp.cumsum(probs.astype(jnp.float32), axis=-1)
  idx = jnp.sum(cdf <= jnp.asarray(u, jnp.float32)[..., None], axis=-1)
  return jnp.minimum(idx, probs.shape[-1] - 1).astype(jnp.int32)


def _labels(labels):
  labels = jnp.asarray(labels, jnp.int32)
  if labels.ndim != 1 or labels.shape[0] < 1:
    raise ValueError(f'labels must have shape (B,), got {labels.shape}')
  return labels


def _keys(keys, batch: int):
  keys = jnp.asarray(keys)
  if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    raise TypeError(f'keys must be a (B,) array of typed PRNG keys (jax.random.key), got dtype {keys.dtype}')
  if keys.shape != (batch,):
    raise ValueError(f'keys must have shape ({batch},) (one PRNG key per sample), got {keys.shape}')
  return keys


def _pair_labels(labels, null_class: int):
  """(B,) -> (2B,) [l_0, null, l_1, null, ...]: each sample's CFG pair on adjacent rows, so a batch sharded over
  devices keeps both rows of a sample on its device (the reference stacks [all cond; all null]: same rows)."""
  return jnp.stack([labels, jnp.full_like(labels, null_class)], axis=1).reshape(-1)


def _split_pairs(x, axis: int = 0):
  """Rows of ``_pair_labels`` order -> (conditional, unconditional), each with B rows on ``axis``."""
  x = jnp.moveaxis(x, axis, 0)
  x = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
  return jnp.moveaxis(x[:, 0], 0, axis), jnp.moveaxis(x[:, 1], 0, axis)


# ----------------------------------------------------------------------------- AR
def ar_sample_tokens(model: ELMAR, variables: Mapping[str, Any], labels, randomness, *, cfg_scale: float = 4.0,
                     cfg_schedule: str = 'linear', temperature: float = 1.0, top_k: Optional[int] = 1000,
                     injected: bool = False, return_logits: bool = False, cache_dtype=None) -> Dict[str, jax.Array]:
  """The reference AR ``generate_cfg(idx=None, cond=labels, num_iter=N, ...)`` with a KV cache (pure; jit it).

  Args:
    model, variables: an ``ELMAR`` and its {'params': ...}.
    labels: (B,) class ids (``num_classes`` = the null class).
    randomness: (B,) PRNG keys (one per sample), or with ``injected`` the uniforms (N, B, T).
    cfg_scale, cfg_schedule: ``u + (c - u) * cfg(step)``; ``AR_CFG_SCHEDULES``.
    temperature: divides the guided logits (> 0).
    top_k: keep logits >= the k-th largest; None/0: off; 1: greedy.
    return_logits: also return the raw model logits of each step (N, 2B, T, V) (rows B.. are the null class);
      memory N*2B*T*V floats.
    cache_dtype: KV-cache dtype (default the model's dtype).

  Returns:
    {'tokens': (B, N, T) int32} (+ {'step_logits': (N, 2B, T, V)}).
  """
  cfg = model.config
  n, t = cfg.seq_len, cfg.token_each
  labels = _labels(labels)
  b = labels.shape[0]
  if not temperature > 0:
    raise ValueError(f'temperature must be > 0 for ELM AR sampling, got {temperature}')
  if top_k is not None and int(top_k) < 0:
    raise ValueError(f'top_k must be >= 0 (0/None = off), got {top_k}')
  scales = jnp.asarray(cfg_scales(cfg_scale, cfg_schedule, n, 'ar'), jnp.float32)
  if injected:
    uniforms = jnp.asarray(randomness, jnp.float32)
    if uniforms.shape != (n, b, t):
      raise ValueError(f'uniforms must have shape (N, B, T) = {(n, b, t)}, got {uniforms.shape}')
  else:
    keys = _keys(randomness, b)
    uniforms = None

  labels2 = _pair_labels(labels, cfg.num_classes)
  cond = model.apply(variables, labels2, method=ELMAR.class_embed)                   # (2B, 1, D)
  caches = init_cache(cfg, 2 * b, n, dtype=cache_dtype or model.dtype)

  def step(carry, xs):
    h_in, caches = carry
    s, u = xs
    logits, caches = model.apply(variables, h_in, cond, caches, s, method=ELMAR.decode)   # (2B, T, V) f32
    lc, lu = _split_pairs(logits)
    guided = lu + (lc - lu) * scales[s]
    probs = jax.nn.softmax(filter_top_k_top_p(guided / temperature, top_k), axis=-1)
    if u is None:
      u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, s), (t,), jnp.float32))(keys)
    tok = inverse_cdf(probs, u)                                                         # (B, T)
    h_next = model.apply(variables, jnp.repeat(tok, 2, axis=0)[:, None, :], method=ELMAR.embed_tokens)
    return (h_next.astype(h_in.dtype), caches), ((tok, logits) if return_logits else tok)

  xs = (jnp.arange(n, dtype=jnp.int32), uniforms)
  _, ys = jax.lax.scan(step, (cond.astype(model.dtype), caches), xs)
  if return_logits:
    toks, step_logits = ys
    lc, lu = _split_pairs(step_logits, axis=1)                                          # reference row order
    return {'tokens': jnp.transpose(toks, (1, 0, 2)), 'step_logits': jnp.concatenate([lc, lu], axis=1)}
  return {'tokens': jnp.transpose(ys, (1, 0, 2))}


def make_ar_sampler(model: ELMAR, *, injected: bool = False, **settings):
  """``jax.jit`` of ``fn(variables, labels, randomness) -> dict`` (``ar_sample_tokens`` with ``settings``)."""
  return jax.jit(lambda variables, labels, r: ar_sample_tokens(model, variables, labels, r, injected=injected,
                                                               **settings))


# ----------------------------------------------------------------------------- MLM
def mlm_sample_tokens(model: ELMMLM, variables: Mapping[str, Any], labels, randomness, *,
                      num_iter: Optional[int] = None, cfg_scale: float = 4.0, cfg_schedule: str = 'linear',
                      temperature: float = 1.0, scale_pow: float = 1.0, injected: bool = False
                      ) -> Dict[str, jax.Array]:
  """The reference MLM ``generate_cfg(idx=None, cond=labels, num_iter, temperature, cfg_scale, cfg_schedule)``
  (pure; jit it).

  Args:
    model, variables: an ``ELMMLM`` and its {'params': ...}.
    labels: (B,) class ids.
    randomness: (B,) PRNG keys, or with ``injected`` a mapping {'uniforms': (I, B, N*T), 'gumbel': (I, B, N, T)}.
    num_iter: iterations I (default the config's ``gen_iter``).
    cfg_scale, cfg_schedule, scale_pow: ``MLM_CFG_SCHEDULES`` (scale_pow: 'powercos' only).
    temperature: scales the Gumbel noise on the confidences, times (1 - ratio) (>= 0).

  Returns:
    {'tokens' (B, N, T) int32: the last sampled ids; 'masked_after_step' (I, B) int32: positions masked for the
    next iteration; 'final_input' (B, N, T): the masked tokens the next iteration would see}.
  """
  cfg = model.config
  n, t, v = cfg.seq_len, cfg.token_each, cfg.codebook_size
  num_iter = int(cfg.gen_iter if num_iter is None else num_iter)
  if num_iter < 1:
    raise ValueError(f'num_iter must be >= 1, got {num_iter}')
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {temperature}')
  labels = _labels(labels)
  b = labels.shape[0]
  scales = jnp.asarray(cfg_scales(cfg_scale, cfg_schedule, num_iter, 'mlm', scale_pow), jnp.float32)
  floor_len = jnp.asarray(mlm_mask_lengths(n, num_iter, cfg.mask_schtype), jnp.int32)
  ratios = (np.arange(num_iter) + 1.0) / num_iter
  gscale = jnp.asarray(temperature * (1.0 - ratios), jnp.float32)
  mask_id = cfg.mask_token_id
  if injected:
    uniforms = jnp.asarray(randomness['uniforms'], jnp.float32)
    gumbel = jnp.asarray(randomness['gumbel'], jnp.float32)
    if uniforms.shape != (num_iter, b, n * t):
      raise ValueError(f"uniforms must have shape (I, B, N*T) = {(num_iter, b, n * t)}, got {uniforms.shape}")
    if gumbel.shape != (num_iter, b, n, t):
      raise ValueError(f"gumbel must have shape (I, B, N, T) = {(num_iter, b, n, t)}, got {gumbel.shape}")
  else:
    keys = _keys(randomness, b)
    uniforms = gumbel = None

  labels2 = _pair_labels(labels, cfg.num_classes)

  def iteration(carry, xs):
    idx, _ = carry
    it, u, g = xs
    if u is None:
      def draw(k):
        ku, kg = jax.random.split(jax.random.fold_in(k, it))
        return jax.random.uniform(ku, (n * t,), jnp.float32), jax.random.gumbel(kg, (n, t), jnp.float32)
      u, g = jax.vmap(draw)(keys)
    logits = model.apply(variables, jnp.repeat(idx, 2, axis=0), labels2)                   # (2B, N*T, V)
    lc, lu = _split_pairs(logits)
    probs = jax.nn.softmax(lu + (lc - lu) * scales[it], axis=-1)
    drawn = inverse_cdf(probs, u).reshape(b, n, t)
    unknown = idx == mask_id
    sampled = jnp.where(unknown, drawn, idx)
    sel = jnp.take_along_axis(probs.reshape(b, n, t, v), sampled[..., None], axis=-1)[..., 0]
    conf = jnp.where(unknown, jnp.log(sel), jnp.inf) + gscale[it] * g
    pos_conf = jnp.mean(conf, axis=-1)                                                    # (B, N)
    n_unknown = jnp.sum(unknown[..., 0], axis=-1).astype(jnp.int32)
    mask_len = jnp.maximum(1, jnp.minimum(n_unknown - 1, floor_len[it]))
    cut = jnp.take_along_axis(jnp.sort(pos_conf, axis=-1), (mask_len - 1)[:, None], axis=-1)
    masking = pos_conf <= cut
    idx = jnp.where(masking[..., None], mask_id, sampled)
    return (idx, sampled), jnp.sum(masking, axis=-1).astype(jnp.int32)

  idx0 = jnp.full((b, n, t), mask_id, jnp.int32)
  xs = (jnp.arange(num_iter, dtype=jnp.int32), uniforms, gumbel)
  (idx, sampled), counts = jax.lax.scan(iteration, (idx0, idx0), xs)
  return {'tokens': sampled, 'masked_after_step': counts, 'final_input': idx}


def make_mlm_sampler(model: ELMMLM, *, injected: bool = False, **settings):
  """``jax.jit`` of ``fn(variables, labels, randomness) -> dict`` (``mlm_sample_tokens`` with ``settings``)."""
  return jax.jit(lambda variables, labels, r: mlm_sample_tokens(model, variables, labels, r, injected=injected,
                                                                **settings))


# ----------------------------------------------------------------------------- convenience
def generate(model, variables: Mapping[str, Any], labels, *, rng=None, uniforms=None, gumbel=None,
             **settings) -> Dict[str, jax.Array]:
  """Sample tokens with an ``ELMAR`` or ``ELMMLM`` (compiles each call; use ``make_*_sampler`` to reuse).

  Randomness: ``rng`` (a key or int seed; sample i uses ``fold_in(rng, i)``), or injected ``uniforms`` (AR
  (N, B, T); MLM (I, B, N*T) with ``gumbel`` (I, B, N, T)). ``settings``: the keyword arguments of
  ``ar_sample_tokens`` / ``mlm_sample_tokens``.
  """
  labels = jnp.asarray(labels, jnp.int32).reshape(-1)
  is_ar = isinstance(model, ELMAR)
  if uniforms is not None:
    r = uniforms if is_ar else {'uniforms': uniforms, 'gumbel': gumbel}
    if not is_ar and gumbel is None:
      raise ValueError('MLM with injected uniforms needs gumbel too')
  else:
    if rng is None:
      raise ValueError('generate needs rng (a PRNG key or an int seed) or injected uniforms')
    r = per_sample_keys(rng, labels.shape[0])
  make = make_ar_sampler if is_ar else make_mlm_sampler
  return make(model, injected=uniforms is not None, **settings)(variables, labels, r)


__all__ = ['AR_CFG_SCHEDULES', 'MLM_CFG_SCHEDULES', 'MASK_SCHEDULES', 'cfg_scales', 'mlm_mask_lengths',
           'mlm_masked_counts', 'inverse_cdf', 'ar_sample_tokens', 'make_ar_sampler', 'mlm_sample_tokens',
           'make_mlm_sampler', 'generate']
