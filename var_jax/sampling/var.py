"""Next-scale sampling: the whole K-scale loop and the VQVAE decode in one compiled program.

- KV caches preallocated to the full sequence length (static shapes: one compilation per model, batch size and
  options). Scale k's keys/values go to [begin_k, end_k); its queries attend to [0, end_k).
- Classifier-free guidance as the reference: conditional and null-class halves in one batch of 2B, guidance
  t = cfg * k / (K - 1) at scale k, logits = (1 + t) * cond - t * uncond.
- top-k / top-p filtering with the reference's semantics (``sample_with_top_k_top_p_``), then multinomial
  sampling with ``jax.random.categorical``. Randomness is per sample: sample i at scale k draws from
  ``fold_in(fold_in(key_i, k), ...)``, so an image depends only on its own key — not on the batch it was
  generated in, the batch size or the number of devices.
- The reference's optional "more smooth" mode: the code map of each scale is a Gumbel-softmax mixture of codes
  (temperature max(0.27 (1 - 0.95 k/(K-1)), 0.005), logits scaled by 1 + k/(K-1)); the tokens returned are the
  sampled ones.
- Zero-shot editing: at every scale the tokens inside the keep-mask are replaced by the input image's tokens before
  the next scale's input is computed (the reference demo's ``autoregressive_infer_cfg_with_mask``).

Training-free accelerations (``SamplingOptions``; all off = the plain sampler above, bit for bit):

- ``cfg_until=s`` (guidance cut-off, as Switti / SkipVAR): the doubled batch (conditional + null class) and the
  guidance formula only at scales 0..s; at the first scale after s the null-class half of every KV cache is dropped
  and the later scales run the conditional half alone (batch B instead of 2B) with its own logits. ``s = K - 1``
  is the full sampler. (Guidance is t = 0 at scale 0 anyway, so ``cfg_until=0`` is conditional sampling.)
- ``prune=((s, keep), ...)`` (FastVAR-style cached token pruning) at scales s >= 1: every position j of scale s
  gets the score ``|| in_s[j] - bilinear_up(in_{s-1})[j] ||_2``, where ``in_s`` is the scale's input map
  (``area_resize(f_hat, pn_s)``, the map its input tokens embed; ``in_0`` = zeros) and ``bilinear_up`` resizes the
  previous scale's input map to pn_s x pn_s: how much the scale's input changed against the coarser view. The
  ``n = ceil(keep * pn_s^2)`` highest-scoring positions (static, ties to the lower index, kept in raster order) go
  through the transformer, with their own position and level embeddings, attending to the full KV cache of the
  earlier scales. The others take the previous scale's prediction: its (guided, unfiltered) logits, nearest-
  upsampled to pn_s x pn_s (FastVAR restores pruned tokens from the previous scale's cached output; the head is
  per token, so nearest-upsampled outputs give nearest-upsampled logits), then every position is sampled as usual.
  KV cache: only the kept tokens' keys/values exist; they are packed at the scale's slots (attention has no
  positional term, so slot order does not matter) and the cache is shorter by the pruned count, so every later
  scale attends to exactly the earlier scales' tokens that were run (the pruned positions are absent, not stale).
- A drafter (a second VAR on the same tokenizer) with ``draft_scales=k``: the drafter samples scales 0..k-1 (its
  own KV caches, the same per-sample keys and options), then the refiner fills its cache for those scales from the
  resulting input maps in one block-causal teacher-forcing pass (``VAR.prefill``: the same keys/values that
  decoding those tokens scale by scale writes) and samples scales k..K-1 (CoDe's draft/refine split).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models.var import VAR
from var_jax.models.vqvae import VQVAE
from var_jax.ops.resize import area_resize, bilinear_resize
from var_jax.sampling.common import filter_top_k_top_p


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  cfg: float = 1.5              # classifier-free guidance ratio (the reference's default)
  top_k: int = 0                # 0: off
  top_p: float = 0.0            # 0: off
  more_smooth: bool = False     # Gumbel-softmax code mixtures (visualisation only, not for FID)
  cfg_until: Optional[int] = None                # guidance at scales 0..cfg_until only (None: every scale)
  prune: Tuple[Tuple[int, float], ...] = ()      # ((scale index, keep fraction), ...), scale >= 1
  draft_scales: int = 0                          # > 0: a drafter model samples scales 0..draft_scales-1

  def __post_init__(self):
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0, got {self.top_k}')
    if not 0.0 <= self.top_p < 1.0:
      raise ValueError(f'top_p must be in [0, 1), got {self.top_p}')
    if self.cfg_until is not None and self.cfg_until < 0:
      raise ValueError(f'cfg_until must be a scale index >= 0 or None, got {self.cfg_until}')
    object.__setattr__(self, 'prune', tuple(sorted((int(k), float(f)) for k, f in dict(self.prune).items())))
    for si, frac in self.prune:
      if si < 1 or not 0.0 < frac <= 1.0:
        raise ValueError(f'prune: scale {si}: keep fraction {frac}; the scale must be >= 1 and the fraction in '
                         f'(0, 1]')
    if self.draft_scales < 0:
      raise ValueError(f'draft_scales must be >= 0, got {self.draft_scales}')

  def check_scales(self, num_scales: int):
    """The scale indices against a model's K scales (ValueError naming the argument)."""
    if self.cfg_until is not None and self.cfg_until >= num_scales:
      raise ValueError(f'cfg_until must be a scale index in [0, {num_scales - 1}], got {self.cfg_until}')
    bad = [si for si, _ in self.prune if si >= num_scales]
    if bad:
      raise ValueError(f'prune: scale {bad[0]} is out of range for {num_scales} scales (1..{num_scales - 1})')
    if self.draft_scales and not 1 <= self.draft_scales <= num_scales - 1:
      raise ValueError(f'draft_scales must be in [1, {num_scales - 1}], got {self.draft_scales}')


def kept_count(keep: float, pn: int) -> int:
  """Tokens run through the transformer at a pruned pn x pn scale: ceil(keep * pn^2), at least 1."""
  return max(1, min(pn * pn, int(math.ceil(keep * pn * pn - 1e-9))))


def cache_layout(patch_nums: Sequence[int], prune, dense_scales: int = 0) -> Tuple[List[Tuple[int, int]], int]:
  """(slots (begin, end) of every scale's tokens in the KV cache, cache length): scales packed one after the
  other, a pruned scale taking only its kept count (scales < ``dense_scales``, e.g. a refiner's prefilled ones,
  are never pruned). Without pruning: ``VARConfig.begin_ends`` and ``seq_len``."""
  keep = dict(prune)
  spans, cur = [], 0
  for si, pn in enumerate(patch_nums):
    n = kept_count(keep[si], pn) if si in keep and si >= dense_scales else pn * pn
    spans.append((cur, cur + n))
    cur += n
  return spans, cur


def _nearest_up_index(pn_from: int, pn_to: int) -> np.ndarray:
  """(pn_to^2,) flat source index of each target position of a nearest upsampling pn_from -> pn_to."""
  src = (np.arange(pn_to) * pn_from) // pn_to
  return (src[:, None] * pn_from + src[None, :]).reshape(-1).astype(np.int32)


def prune_scores(in_map, prev_map):
  """(B, pn^2) scores of ``prune``: ``|| in_map - bilinear_up(prev_map) ||_2`` per position (float32)."""
  pn = in_map.shape[1]
  up = bilinear_resize(prev_map.astype(jnp.float32), pn)
  d = in_map.astype(jnp.float32) - up
  return jnp.sqrt(jnp.sum(d * d, axis=-1)).reshape(in_map.shape[0], pn * pn)


def _per_sample(fn, keys, *xs):
  return jax.vmap(fn)(keys, *xs)


def edit_force_masks(keep_mask, patch_nums: Sequence[int]) -> List[jax.Array]:
  """Keep-mask -> per-scale boolean (B, pn*pn) 'use the input token here' masks, as the reference demo:
  bilinear-resample the mask to each scale, threshold at 0.5, and keep everything at scales with <= 3 tokens.

  ``keep_mask`` is (B, h, w) float/bool with 1 = keep the input, at any resolution (image or token map); a mask
  that is not at the finest token resolution is first area-averaged to it.
  """
  m = jnp.asarray(keep_mask, jnp.float32)
  if m.ndim != 3:
    raise ValueError(f'keep_mask must be (B, h, w) or (h, w), got shape {tuple(m.shape)}')
  pl = patch_nums[-1]
  m = m[..., None]
  if m.shape[1:3] != (pl, pl):
    m = area_resize(m, pl)
  out = []
  for pn in patch_nums:
    f = bilinear_resize(m, pn)[..., 0] > 0.5
    if pn * pn <= 3:
      f = jnp.ones_like(f)
    out.append(f.reshape(f.shape[0], pn * pn))
  return out


def _doubled(opts: SamplingOptions, si: int) -> bool:
  """Scale si runs the doubled (conditional + null class) batch."""
  return opts.cfg_until is None or si <= opts.cfg_until


def _run_scales(vae: VQVAE, var: VAR, vae_vars, var_vars, labels, keys, opts: SamplingOptions, lo: int, hi: int,
                state: Dict, cache_dtype=None, edit_tokens=None, edit_masks=None, dense_scales: int = 0) -> Dict:
  """Sample scales lo..hi-1 with one transformer, continuing ``state``: f_hat (B, h, w, Cvae), the next scale's
  input map ``nxt`` and the previous one ``prev_map``, ``prev_logits`` (for a pruned next scale), ``tokens``,
  ``in_maps`` (every scale's input map so far) and the KV ``caches`` (None: start fresh at scale 0)."""
  cfg = var.config
  pns = cfg.patch_nums
  k_scales = len(pns)
  b = labels.shape[0]
  keep = dict(opts.prune)
  spans, length = cache_layout(pns, opts.prune, dense_scales)
  cond_all = var.apply(var_vars, jnp.concatenate([labels, jnp.full_like(labels, cfg.num_classes)]),
                       method=VAR.class_cond)
  codebook = vae_vars['params']['quantize']['embedding']
  state = dict(state, tokens=list(state['tokens']), in_maps=list(state['in_maps']))
  caches = state['caches']
  if caches is None:
    caches = var.apply(var_vars, 2 * b if _doubled(opts, lo) else b, cache_dtype,
                       None if length == cfg.seq_len else length, method=VAR.init_cache)
  f_hat = state['f_hat']
  for si in range(lo, hi):
    pn = pns[si]
    dbl = _doubled(opts, si)
    if not dbl and caches[0]['k'].shape[0] != b:          # guidance cut-off: keep the conditional half
      caches = jax.tree.map(lambda a: a[:b], caches)
    cond = cond_all if dbl else cond_all[:b]
    if si == 0:
      x = var.apply(var_vars, cond, method=VAR.first_scale_input)
    else:
      x = var.apply(var_vars, si, state['nxt'].reshape(b, -1, cfg.z_channels), method=VAR.next_scale_input)
      if dbl:
        x = jnp.concatenate([x, x], axis=0)
    span = spans[si]
    if si in keep and si >= dense_scales:
      kidx = jnp.sort(jax.lax.top_k(prune_scores(state['nxt'], state['prev_map']), span[1] - span[0])[1], axis=-1)
      kk = jnp.concatenate([kidx, kidx], axis=0) if dbl else kidx
      x = jnp.take_along_axis(x, kk[..., None], axis=1)
    logits, caches = var.apply(var_vars, si, x, cond, caches, None if span == cfg.begin_ends[si] else span,
                               method=VAR.decode_scale)
    ratio = si / (k_scales - 1) if k_scales > 1 else 0.0
    if dbl:
      t = opts.cfg * ratio
      logits = (1 + t) * logits[:b] - t * logits[b:]
    if si in keep and si >= dense_scales:                  # pruned positions: the previous scale's prediction
      full = jnp.take(state['prev_logits'], jnp.asarray(_nearest_up_index(pns[si - 1], pn)), axis=1)
      logits = jax.vmap(lambda f, i, lg: f.at[i].set(lg))(full, kidx, logits)
    if si + 1 in keep:
      state['prev_logits'] = logits
    logits = filter_top_k_top_p(logits, opts.top_k, opts.top_p)
    step_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, si)))(keys)   # (B, 2) keys
    idx = _per_sample(lambda k, lg: jax.random.categorical(k, lg, axis=-1), step_keys[:, 0], logits)
    idx = idx.astype(jnp.int32)
    if opts.more_smooth:
      tau = max(0.27 * (1 - ratio * 0.95), 0.005)
      gumbel = _per_sample(lambda k, lg: jax.random.gumbel(k, lg.shape, jnp.float32), step_keys[:, 1], logits)
      soft = jax.nn.softmax((logits * (1 + ratio) + gumbel) / tau, axis=-1)
      h = jnp.einsum('blv,vc->blc', soft, codebook)
    else:
      h = jnp.take(codebook, idx, axis=0)
    if edit_tokens is not None:
      km = edit_masks[si]
      idx = jnp.where(km, edit_tokens[si], idx)
      h = jnp.where(km[..., None], jnp.take(codebook, edit_tokens[si], axis=0), h)
    state['tokens'].append(idx)
    h = h.reshape(b, pn, pn, cfg.z_channels)
    f_hat, nxt = vae.apply(vae_vars, si, f_hat, h, method=lambda m, s, f, hh: m.quantize.next_ar_input(s, f, hh))
    state['prev_map'] = state['nxt']
    state['nxt'] = nxt
    if si != k_scales - 1:
      state['in_maps'].append(nxt)
  state['f_hat'], state['caches'] = f_hat, caches
  return state


def _initial_state(var: VAR, b: int) -> Dict:
  cfg = var.config
  pns = cfg.patch_nums
  z = jnp.zeros((b, pns[0], pns[0], cfg.z_channels), jnp.float32)
  return {'f_hat': jnp.zeros((b, pns[-1], pns[-1], cfg.z_channels), jnp.float32), 'nxt': z, 'prev_map': z,
          'prev_logits': None, 'tokens': [], 'in_maps': [z], 'caches': None}


def prefill_caches(var: VAR, var_vars, labels, in_maps: Sequence[jax.Array], opts: SamplingOptions,
                   cache_dtype=None) -> List[Dict[str, jax.Array]]:
  """A refiner's KV caches after scales 0..k-1 (k = len(in_maps)), from those scales' input maps (B, pn, pn, Cvae)
  in one block-causal pass (``VAR.prefill``): the doubled batch if scale k is guided, else the conditional half;
  cache length per ``cache_layout`` with the first k scales dense."""
  cfg = var.config
  k = len(in_maps)
  b = labels.shape[0]
  dbl = _doubled(opts, k)
  lab = jnp.concatenate([labels, jnp.full_like(labels, cfg.num_classes)]) if dbl else labels
  cond = var.apply(var_vars, lab, method=VAR.class_cond)
  xs = [var.apply(var_vars, cond, method=VAR.first_scale_input)]
  for si in range(1, k):
    x = var.apply(var_vars, si, in_maps[si].reshape(b, -1, cfg.z_channels), method=VAR.next_scale_input)
    xs.append(jnp.concatenate([x, x], axis=0) if dbl else x)
  _, length = cache_layout(cfg.patch_nums, opts.prune, dense_scales=k)
  caches = var.apply(var_vars, cond.shape[0], cache_dtype, None if length == cfg.seq_len else length,
                     method=VAR.init_cache)
  _, caches = var.apply(var_vars, jnp.concatenate(xs, axis=1), cond, caches, method=VAR.prefill)
  return caches


def sample(vae: VQVAE, var: VAR, vae_vars, var_vars, labels, keys, opts: SamplingOptions,
           edit_tokens: Optional[Sequence[jax.Array]] = None, edit_masks: Optional[Sequence[jax.Array]] = None,
           cache_dtype=None, drafter: Optional[VAR] = None, drafter_vars=None) -> Tuple[jax.Array, jax.Array]:
  """labels (B,) int, keys (B,) PRNG keys -> (images NHWC float32 in [0, 1], tokens int32 (B, L)).

  Pure function of its inputs; jit it with ``opts`` static (``make_sampler`` does). With ``opts.draft_scales`` =
  k > 0, ``drafter`` (a VAR on the same tokenizer and patch_nums, variables ``drafter_vars``) samples scales
  0..k-1 and ``var`` refines the rest.
  """
  pns = var.config.patch_nums
  opts.check_scales(len(pns))
  b = labels.shape[0]
  state = _initial_state(var, b)
  k = opts.draft_scales
  if k:
    if drafter is None or tuple(drafter.config.patch_nums) != tuple(pns):
      raise ValueError(f'draft_scales={k} needs a drafter VAR with patch_nums {pns}')
    state = _run_scales(vae, drafter, vae_vars, drafter_vars, labels, keys, opts, 0, k, state, cache_dtype,
                        edit_tokens, edit_masks)
    state['caches'] = prefill_caches(var, var_vars, labels, state['in_maps'][:k], opts, cache_dtype)
  state = _run_scales(vae, var, vae_vars, var_vars, labels, keys, opts, k, len(pns), state, cache_dtype,
                      edit_tokens, edit_masks, dense_scales=k)
  images = vae.apply(vae_vars, state['f_hat'], method=VQVAE.fhat_to_img)
  return (images + 1) * 0.5, jnp.concatenate(state['tokens'], axis=1)


def sampler_fn(vae_config, var_config, opts: SamplingOptions, dtype=jnp.float32, edit: bool = False,
               drafter_config=None):
  """``fn(vae_vars, var_vars[, drafter_vars], labels, keys[, edit_tokens, edit_masks]) -> (images, tokens)``, not
  jitted (``drafter_vars`` when ``drafter_config`` is given: the drafter of ``opts.draft_scales``).

  ``dtype`` is the compute dtype of the transformer and the decoder (bf16 for speed on GPU/TPU; pass params
  already cast with ``cast_floating``); the quantizer's f_hat accumulation and the codebook stay float32.
  """
  vae, var = VQVAE(vae_config, dtype=dtype), VAR(var_config, dtype=dtype)
  if (drafter_config is None) != (not opts.draft_scales):
    raise ValueError('draft_scales > 0 and a drafter config go together')
  if drafter_config is not None:
    drafter = VAR(drafter_config, dtype=dtype)

    def fn(vae_vars, var_vars, drafter_vars, labels, keys, *edit_args):
      return sample(vae, var, vae_vars, var_vars, labels, keys, opts, *edit_args, cache_dtype=dtype,
                    drafter=drafter, drafter_vars=drafter_vars)
  elif edit:
    def fn(vae_vars, var_vars, labels, keys, edit_tokens, edit_masks):
      return sample(vae, var, vae_vars, var_vars, labels, keys, opts, edit_tokens, edit_masks, cache_dtype=dtype)
  else:
    def fn(vae_vars, var_vars, labels, keys):
      return sample(vae, var, vae_vars, var_vars, labels, keys, opts, cache_dtype=dtype)
  return fn


def make_sampler(vae_config, var_config, opts: SamplingOptions, dtype=jnp.float32, edit: bool = False,
                 in_shardings=None, out_shardings=None, drafter_config=None):
  """``jax.jit`` of ``sampler_fn`` (with the given shardings, if any)."""
  kw = {k: v for k, v in (('in_shardings', in_shardings), ('out_shardings', out_shardings)) if v is not None}
  return jax.jit(sampler_fn(vae_config, var_config, opts, dtype, edit, drafter_config), **kw)
