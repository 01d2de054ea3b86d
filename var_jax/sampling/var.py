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
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

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

  def __post_init__(self):
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0, got {self.top_k}')
    if not 0.0 <= self.top_p < 1.0:
      raise ValueError(f'top_p must be in [0, 1), got {self.top_p}')


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


def sample(vae: VQVAE, var: VAR, vae_vars, var_vars, labels, keys, opts: SamplingOptions,
           edit_tokens: Optional[Sequence[jax.Array]] = None, edit_masks: Optional[Sequence[jax.Array]] = None,
           cache_dtype=None) -> Tuple[jax.Array, jax.Array]:
  """labels (B,) int, keys (B,) PRNG keys -> (images NHWC float32 in [0, 1], tokens int32 (B, L)).

  Pure function of its inputs; jit it with ``opts`` static (``make_sampler`` does).
  """
  cfg = var.config
  pns = cfg.patch_nums
  k_scales = len(pns)
  b = labels.shape[0]
  cond = var.apply(var_vars, jnp.concatenate([labels, jnp.full_like(labels, cfg.num_classes)]),
                   method=VAR.class_cond)
  x = var.apply(var_vars, cond, method=VAR.first_scale_input)
  caches = var.apply(var_vars, 2 * b, cache_dtype, method=VAR.init_cache)
  f_hat = jnp.zeros((b, pns[-1], pns[-1], cfg.z_channels), jnp.float32)
  codebook = vae_vars['params']['quantize']['embedding']
  tokens = []
  for si, pn in enumerate(pns):
    ratio = si / (k_scales - 1) if k_scales > 1 else 0.0
    logits, caches = var.apply(var_vars, si, x, cond, caches, method=VAR.decode_scale)
    t = opts.cfg * ratio
    logits = (1 + t) * logits[:b] - t * logits[b:]
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
      keep = edit_masks[si]
      idx = jnp.where(keep, edit_tokens[si], idx)
      h = jnp.where(keep[..., None], jnp.take(codebook, edit_tokens[si], axis=0), h)
    tokens.append(idx)
    h = h.reshape(b, pn, pn, cfg.z_channels)
    f_hat, nxt = vae.apply(vae_vars, si, f_hat, h, method=lambda m, s, f, hh: m.quantize.next_ar_input(s, f, hh))
    if si != k_scales - 1:
      x = var.apply(var_vars, si + 1, nxt.reshape(b, -1, cfg.z_channels), method=VAR.next_scale_input)
      x = jnp.concatenate([x, x], axis=0)
  images = vae.apply(vae_vars, f_hat, method=VQVAE.fhat_to_img)
  return (images + 1) * 0.5, jnp.concatenate(tokens, axis=1)


def sampler_fn(vae_config, var_config, opts: SamplingOptions, dtype=jnp.float32, edit: bool = False):
  """``fn(vae_vars, var_vars, labels, keys[, edit_tokens, edit_masks]) -> (images, tokens)``, not jitted.

  ``dtype`` is the compute dtype of the transformer and the decoder (bf16 for speed on GPU/TPU; pass params
  already cast with ``cast_floating``); the quantizer's f_hat accumulation and the codebook stay float32.
  """
  vae, var = VQVAE(vae_config, dtype=dtype), VAR(var_config, dtype=dtype)

  if edit:
    def fn(vae_vars, var_vars, labels, keys, edit_tokens, edit_masks):
      return sample(vae, var, vae_vars, var_vars, labels, keys, opts, edit_tokens, edit_masks, cache_dtype=dtype)
  else:
    def fn(vae_vars, var_vars, labels, keys):
      return sample(vae, var, vae_vars, var_vars, labels, keys, opts, cache_dtype=dtype)
  return fn


def make_sampler(vae_config, var_config, opts: SamplingOptions, dtype=jnp.float32, edit: bool = False,
                 in_shardings=None, out_shardings=None):
  """``jax.jit`` of ``sampler_fn`` (with the given shardings, if any)."""
  kw = {k: v for k, v in (('in_shardings', in_shardings), ('out_shardings', out_shardings)) if v is not None}
  return jax.jit(sampler_fn(vae_config, var_config, opts, dtype, edit), **kw)
