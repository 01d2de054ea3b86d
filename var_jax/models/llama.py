"""Llama-style transformer blocks shared by ELM (AR and MLM) and BiGR.

Mirrors the blocks of the reference ``llama/ar_model.py`` / ``llama/mlm_model.py`` (Pepper-lll/LMforImageGeneration)
and ``llama/gpt*.py`` (haoosz/BiGR):

- pre-norm ``RMSNorm`` (``x * rsqrt(mean(x^2) + eps) * weight``, the normalisation in float32);
- ``Attention``: one fused ``wqkv`` projection (q, k, v in that order, no bias), 2D rotary embedding on q and k,
  softmax attention with scale ``1/sqrt(head_dim)`` (or the reference's cosine-similarity variant, no scale), ``wo``
  (no bias). ``n_kv_head < n_head`` (grouped keys/values) is supported as the reference does (``repeat_interleave``);
  every release has ``n_kv_head == n_head``;
- ``FeedForward``: SwiGLU ``w2(silu(w1 x) * w3 x)``, hidden width ``find_multiple(int(2 * 4 * dim / 3), multiple_of)``
  (optionally times ``ffn_dim_multiplier`` before rounding);
- ``TransformerBlock``: ``x + attn(norm(x))`` then ``+ ffn(norm(.))``, optional adaLN modulation (its own
  ``adaLN_modulation`` Linear on SiLU(cond) as ELM AR's ``use_adaLN``, or modulation computed outside, as BiGR's
  shared adaLN), optional drop path.

The modules are configured by a ``LlamaArgs`` (the reference ``ModelArgs`` fields ELM and BiGR share; their configs
extend it), plus what differs per model: the attention type, adaLN, the drop-path rate.

Attention masking is explicit: ``causal=True`` for autoregressive models, ``causal=False`` (full attention) for the
masked models, plus an optional boolean ``mask`` (True = may attend). A preallocated KV cache (``init_kv_cache``) with a
write index makes step-by-step decoding possible: the new keys/values are written at ``[cache_index, cache_index+S)``
and the queries see the slots ``< cache_index + S`` (causally: ``<=`` their own position).

Initialisers follow the reference ``_init_weights``: Linear weights and Embeddings N(0, initializer_range), biases
zero, norms one; the models zero their output heads and adaLN layers themselves. Every parameter carries logical
axis names for ``var_jax.sharding``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models.layers import ConfigModule, Dense, drop_path, l2_normalize, logical

Dtype = Any
KVCache = Dict[str, jax.Array]   # {'k': (B, L, n_kv_head, head_dim), 'v': (B, L, n_kv_head, head_dim)}


def find_multiple(n: int, k: int) -> int:
  """The smallest multiple of k that is >= n (the reference's helper)."""
  return n if n % k == 0 else n + k - (n % k)


def ffn_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: Optional[float] = None) -> int:
  """SwiGLU hidden width of the reference ``FeedForward`` (dim 1024 -> 2816, 1280 -> 3584, 1536 -> 4096)."""
  hidden = int(2 * (4 * dim) / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return find_multiple(hidden, multiple_of)


def normal_init(std: float):
  """``tensor.normal_(0, std)`` (not truncated), the reference ``_init_weights`` for Linear and Embedding."""
  def init(key, shape, dtype=jnp.float32):
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)
  return init


def zeros_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


def ones_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.ones(shape, dtype)


@dataclasses.dataclass(frozen=True)
class LlamaArgs:
  """The reference ``ModelArgs`` fields (names and defaults) that ELM and BiGR share: the Llama backbone, its
  dropouts, the class conditioning, the sequence sizes and the MLM masking options (stored, unused by the models).
  Both families' configs extend it; ``block_size`` is the square latent grid of the 2D RoPE table."""
  # mlm
  mask_ratio_min: float = 0.5
  mask_ratio_max: float = 1.0
  mask_ratio_mu: float = 0.55
  mask_ratio_std: float = 0.25
  smoothing: float = 0.1
  gen_iter: int = 10
  # model
  dim: int = 4096
  n_layer: int = 32
  n_head: int = 32
  n_kv_head: Optional[int] = None
  multiple_of: int = 256
  ffn_dim_multiplier: Optional[float] = None
  rope_base: float = 10000
  norm_eps: float = 1e-5
  initializer_range: float = 0.02
  use_adaLN: bool = False
  # train setting
  token_dropout_p: float = 0.1
  attn_dropout_p: float = 0.0
  resid_dropout_p: float = 0.1
  ffn_dropout_p: float = 0.1
  drop_path_rate: float = 0.0
  num_classes: int = 1000
  caption_dim: int = 2048
  class_dropout_prob: float = 0.1
  cls_token_num: int = 1
  block_size: int = 256
  max_batch_size: int = 32
  max_seq_len: int = 2048
  # ours, not a reference field (never exported as ModelArgs): rematerialise each block in training (activation
  # memory for recompute; python -m var_jax.aot --plan shows when a recipe needs it)
  remat: bool = False

  def __post_init__(self):
    if self.dim % self.n_head:
      raise ValueError(f'dim={self.dim} is not divisible by n_head={self.n_head}')
    if self.head_dim % 4:
      raise ValueError(f'head_dim={self.head_dim} (dim / n_head) must be divisible by 4 for the 2D RoPE table')
    if self.n_head % self.num_kv_heads:
      raise ValueError(f'n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}')
    if self.grid * self.grid != self.block_size:
      raise ValueError(f'block_size={self.block_size} must be a square (the latent grid)')

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_head

  @property
  def num_kv_heads(self) -> int:
    return self.n_kv_head if self.n_kv_head is not None else self.n_head

  @property
  def ffn_hidden_dim(self) -> int:
    return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

  @property
  def grid(self) -> int:
    return math.isqrt(self.block_size)

  @property
  def num_class_rows(self) -> int:
    """Rows of the class table: num_classes, plus the null class (``num_classes``) when label dropout is on."""
    return self.num_classes + int(self.class_dropout_prob > 0)

  @property
  def null_class(self) -> int:
    return self.num_classes


# ----------------------------------------------------------------------------- rotary embedding
def precompute_rope_2d(head_dim: int, grid: int, base: float = 10000.0, cls_slots: int = 1,
                       repeat: int = 1) -> np.ndarray:
  """2D RoPE table of the reference ``precompute_freqs_cis_2d``: ((cls_slots + grid^2) * repeat, head_dim/2, 2).

  The last axis is (cos, sin). Pair j < head_dim/4 rotates by row * f_j and pair j >= head_dim/4 by col * f_(j -
  head_dim/4), with f_j = base^(-4j/head_dim); grid cell s (raster order) is row s // grid, col s % grid. The first
  ``cls_slots`` rows are **zeros** (cos = sin = 0, not the identity): the class slots' queries and keys become zero
  vectors. ``repeat`` repeats every row that many times (ELM MLM: the T sub-token slots of one position share it).
  Computed in float32 as the reference does.
  """
  if head_dim % 4:
    raise ValueError(f'2D RoPE needs head_dim divisible by 4, got {head_dim} (the reference table would not fit)')
  half = head_dim // 2
  freqs = (np.float32(1.0) / (np.float32(base) ** (np.arange(0, half, 2)[: half // 2].astype(np.float32)
                                                     / np.float32(half)))).astype(np.float32)
  t = np.arange(grid, dtype=np.float32)
  f = np.outer(t, freqs).astype(np.float32)                                   # (grid, head_dim / 4)
  grid_f = np.concatenate([np.broadcast_to(f[:, None, :], (grid, grid, f.shape[1])),
                           np.broadcast_to(f[None, :, :], (grid, grid, f.shape[1]))], axis=-1)
  cache = np.stack([np.cos(grid_f), np.sin(grid_f)], axis=-1).reshape(grid * grid, half, 2).astype(np.float32)
  table = np.concatenate([np.zeros((cls_slots, half, 2), np.float32), cache], axis=0)
  if repeat > 1:
    table = np.repeat(table, repeat, axis=0)
  return table


def apply_rope(x, freqs):
  """Rotate pairs (x[2j], x[2j+1]) of x (B, S, H, Dh) by freqs (S, Dh/2, 2) = (cos, sin); float32 inside."""
  xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
  f = jnp.asarray(freqs, jnp.float32)[None, :, None]                          # (1, S, 1, Dh/2, 2)
  c, s = f[..., 0], f[..., 1]
  x0, x1 = xf[..., 0], xf[..., 1]
  out = jnp.stack([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
  """``x * rsqrt(mean(x^2, -1) + eps) * weight``; the normalisation runs in float32 (reference ``RMSNorm``)."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    weight = self.param('weight', logical(ones_init, ('norm',)), (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * weight.astype(self.dtype)


def init_kv_cache(batch: int, max_len: int, n_kv_head: int, head_dim: int, n_layer: int,
                  dtype=jnp.float32) -> List[KVCache]:
  """One zeroed cache per layer: {'k', 'v'} of shape (batch, max_len, n_kv_head, head_dim)."""
  shape = (batch, max_len, n_kv_head, head_dim)
  return [{'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)} for _ in range(n_layer)]


class Attention(nn.Module):
  """Multi-head self-attention with fused ``wqkv`` (q, k, v order, no bias), RoPE, optional KV cache.

  ``__call__(x, freqs=None, mask=None, *, causal=False, cache=None, cache_index=None, train=False)``
  -> ``(y, new_cache)``:

  - ``x`` (B, S, dim); ``freqs`` (S, head_dim/2, 2) RoPE rows of these S positions (None: no rotation);
  - ``mask``: optional bool, broadcastable to (B, n_head, S, K) with K = S (no cache) or the cache length; True =
    may attend;
  - ``causal``: query i attends keys j <= i (with a cache: absolute positions, query i is at cache_index + i);
  - ``cache``: {'k', 'v'} (B, L, n_kv_head, head_dim) preallocated (``init_kv_cache``); the S new keys/values are
    written at ``cache_index`` (int, may be traced) and the queries attend the cache slots ``< cache_index + S``.
    ``new_cache`` is None without a cache.
  """
  config: LlamaArgs
  attn_type: str = 'sdp'            # 'sdp' scaled dot product; 'cs' cosine similarity (reference option, no scale)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, freqs=None, mask=None, *, causal: bool = False, cache: Optional[KVCache] = None,
               cache_index=None, train: bool = False):
    cfg = self.config
    h, hkv, hd = cfg.n_head, cfg.num_kv_heads, cfg.head_dim
    b, s, _ = x.shape
    init = normal_init(cfg.initializer_range)
    qkv = Dense((h + 2 * hkv) * hd, use_bias=False, kernel_axes=('embed', 'qkv'), kernel_init=init, name='wqkv',
                dtype=self.dtype)(x)
    q = qkv[..., :h * hd].reshape(b, s, h, hd)
    k = qkv[..., h * hd:(h + hkv) * hd].reshape(b, s, hkv, hd)
    v = qkv[..., (h + hkv) * hd:].reshape(b, s, hkv, hd)
    if freqs is not None:
      q = apply_rope(q, freqs)
      k = apply_rope(k, freqs)

    q_pos = jnp.arange(s)
    if cache is None:
      keys, values, new_cache = k, v, None
      k_pos = jnp.arange(s)
      valid = None
    else:
      if cache_index is None:
        raise ValueError('Attention: a cache needs cache_index (where the new keys/values are written)')
      idx = jnp.asarray(cache_index, jnp.int32)
      ck = jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), (0, idx, 0, 0))
      cv = jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), (0, idx, 0, 0))
      new_cache = {'k': ck, 'v': cv}
      keys, values = ck.astype(self.dtype), cv.astype(self.dtype)
      q_pos = q_pos + idx
      k_pos = jnp.arange(ck.shape[1])
      valid = (k_pos[None, :] < idx + s)[None, None]                         # (1, 1, 1, L)
    if causal:
      c = (k_pos[None, :] <= q_pos[:, None])[None, None]                      # (1, 1, S, K)
      valid = c if valid is None else valid & c
    if mask is not None:
      m = jnp.asarray(mask, bool)
      valid = m if valid is None else valid & m
    if hkv != h:
      keys = jnp.repeat(keys, h // hkv, axis=2)
      values = jnp.repeat(values, h // hkv, axis=2)

    if self.attn_type == 'cs':
      q, keys, scale = l2_normalize(q), l2_normalize(keys), 1.0
    elif self.attn_type == 'sdp':
      scale = 1.0 / math.sqrt(hd)
    else:
      raise ValueError(f"attn_type must be 'sdp' or 'cs', got {self.attn_type!r}")
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, keys, preferred_element_type=jnp.float32) * scale
    if valid is not None:
      scores = jnp.where(valid, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if train and cfg.attn_dropout_p > 0:
      probs = nn.Dropout(cfg.attn_dropout_p, deterministic=False)(probs)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(self.dtype), values).reshape(b, s, h * hd)
    out = Dense(cfg.dim, use_bias=False, kernel_axes=('qkv', 'embed'), kernel_init=init, name='wo',
                dtype=self.dtype)(out)
    if cfg.resid_dropout_p > 0:
      out = nn.Dropout(cfg.resid_dropout_p, deterministic=not train)(out)
    return out, new_cache


class FeedForward(ConfigModule):
  """SwiGLU ``w2(silu(w1 x) * w3 x)`` (no biases) and ffn dropout; hidden width ``ffn_hidden_dim``."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    cfg = self.config
    hidden = cfg.ffn_hidden_dim
    init = normal_init(cfg.initializer_range)
    a = Dense(hidden, use_bias=False, kernel_axes=('embed', 'mlp'), kernel_init=init, name='w1', dtype=self.dtype)(x)
    g = Dense(hidden, use_bias=False, kernel_axes=('embed', 'mlp'), kernel_init=init, name='w3', dtype=self.dtype)(x)
    y = Dense(cfg.dim, use_bias=False, kernel_axes=('mlp', 'embed'), kernel_init=init, name='w2',
              dtype=self.dtype)(nn.silu(a) * g)
    if cfg.ffn_dropout_p > 0:
      y = nn.Dropout(cfg.ffn_dropout_p, deterministic=not train)(y)
    return y


def modulate(x, shift, scale):
  return x * (1 + scale) + shift


class TransformerBlock(nn.Module):
  """Pre-norm Llama block: ``h = x + attn(attention_norm(x))``, ``out = h + ffn(ffn_norm(h))``.

  ``__call__(x, freqs=None, mask=None, *, causal=False, cache=None, cache_index=None, cond=None, modulation=None,
  train=False) -> (out, new_cache)``.

  adaLN: with ``use_adaln`` the block owns ``adaLN_modulation`` (Linear dim -> 6 dim with bias, zero-initialised) on
  SiLU(``cond``) (ELM AR ``use_adaLN``); otherwise a ``modulation`` computed outside may be passed (BiGR's shared
  adaLN). Either way the six parts (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each
  broadcastable to x, act as ``x + gate * attn(norm(x) * (1 + scale) + shift)`` (and the same for the FFN).
  """
  config: LlamaArgs
  drop_path: float = 0.0
  use_adaln: bool = False
  attn_type: str = 'sdp'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, freqs=None, mask=None, *, causal: bool = False, cache: Optional[KVCache] = None,
               cache_index=None, cond=None, modulation: Optional[Sequence[Any]] = None, train: bool = False):
    cfg = self.config
    if self.use_adaln:
      if cond is None:
        raise ValueError('TransformerBlock(use_adaln=True) needs cond')
      mods = Dense(6 * cfg.dim, kernel_axes=('embed', 'adaln'), kernel_init=zeros_init, bias_init=zeros_init,
                   name='adaLN_modulation', dtype=self.dtype)(nn.silu(cond.astype(self.dtype)))
      modulation = jnp.split(mods, 6, axis=-1)
    attn = Attention(cfg, self.attn_type, dtype=self.dtype, name='attention')
    ffn = FeedForward(cfg, dtype=self.dtype, name='feed_forward')
    attention_norm = RMSNorm(cfg.norm_eps, dtype=self.dtype, name='attention_norm')
    ffn_norm = RMSNorm(cfg.norm_eps, dtype=self.dtype, name='ffn_norm')

    a_in = attention_norm(x)
    if modulation is not None:
      shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = [jnp.asarray(m).astype(self.dtype)
                                                                        for m in modulation]
      a_in = modulate(a_in, shift_msa, scale_msa)
    a, new_cache = attn(a_in, freqs, mask, causal=causal, cache=cache, cache_index=cache_index, train=train)
    if modulation is not None:
      a = gate_msa * a
    h = x + drop_path(self, a, self.drop_path, not train)
    f_in = ffn_norm(h)
    if modulation is not None:
      f_in = modulate(f_in, shift_mlp, scale_mlp)
    f = ffn(f_in, train)
    if modulation is not None:
      f = gate_mlp * f
    out = h + drop_path(self, f, self.drop_path, not train)
    out = nn.with_logical_constraint(out, ('activation_batch', 'activation_length', 'activation_embed'))
    return out, new_cache
