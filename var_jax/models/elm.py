"""ELM ("Elucidating the design space of language models for image generation"): the AR and MLM transformers.

Mirrors ``llama/ar_model.py`` and ``llama/mlm_model.py`` of Pepper-lll/LMforImageGeneration on the blocks of
``var_jax.models.llama``. Images are coded by a binary autoencoder into K bits per latent cell; the K bits of a cell
split into ``token_each`` (T) consecutive chunks of ``code_dim`` (cd) bits, each chunk one sub-token in
[0, 2^cd), most significant bit first (``bits_to_tokens``).

- ``ELMAR``: sequence [class, tokens 0..N-2] (N = block_size cells in raster order); position s predicts token s.
  The T sub-tokens of a position are embedded by T tables, concatenated and projected (``proj``, T*D -> D, no bias,
  only when T > 1). T heads (D -> 2^cd, no bias) read the same hidden state: logits (B, S*T, V), row s*T+i.
- ``ELMMLM``: one table of 2^cd + 1 rows (mask id 2^cd), sequence of (N+1)*T slots (the class embedding repeated T
  times, then every sub-token), RoPE repeated per position, full attention, ``MlmLayer`` head tied to the token
  table. Logits (B, N*T, 2^cd).

In both the class slot's RoPE entry is zeros (``precompute_rope_2d``). The bit/token packing is a plain function
here; the losses and the MLM training mask are in ``var_jax.losses.tokens``; ``var_jax.interop.elm`` moves weights
from/to the reference checkpoints.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models.layers import (BATCH_EMBED, BATCH_LENGTH_EMBED, ConfigModule, Dense, drop_labels,
                                   layer_norm_no_affine, logical, lookup)
from var_jax.models.llama import (KVCache, LlamaArgs, RMSNorm, TransformerBlock, init_kv_cache, modulate, normal_init,
                                  ones_init, precompute_rope_2d, zeros_init)

Dtype = Any

# ----------------------------------------------------------------------------- config
# The reference ``ModelArgs`` fields (name -> default) of llama/ar_model.py and llama/mlm_model.py.
_COMMON_FIELDS = (
    'use_adaLN', 'pause', 'pause_num', 'token_each', 'cls_row', 'pos_type', 'code_dim', 'dim', 'n_layer', 'n_head',
    'n_kv_head', 'multiple_of', 'ffn_dim_multiplier', 'rope_base', 'norm_eps', 'initializer_range',
    'token_dropout_p', 'attn_dropout_p', 'resid_dropout_p', 'ffn_dropout_p', 'drop_path_rate', 'num_classes',
    'caption_dim', 'class_dropout_prob', 'vocab_size', 'cls_token_num', 'block_size', 'max_batch_size',
    'max_seq_len')
AR_MODEL_ARGS = frozenset(_COMMON_FIELDS + ('attn_type', 'split_embder', 'model_type'))
# model_type is not a field of the MLM ModelArgs, but the MLM Transformer reads it (an upstream bug the fixtures patch
# with a class attribute): accepted here too.
MLM_MODEL_ARGS = frozenset(_COMMON_FIELDS + (
    'mask_ratio_min', 'mask_ratio_max', 'mask_ratio_mu', 'mask_ratio_std', 'smoothing', 'gen_iter', 'maskpersample',
    'mask_schstep', 'mask_schtype', 'norm_type', 'model_type'))

# GPT_models presets of the reference: (n_layer, dim) -> n_head (head_dim 64 in all).
GPT_PRESETS = {'GPT-B': (12, 768, 12), 'GPT-L': (24, 1024, 16), 'GPT-XL': (36, 1280, 20), 'GPT-XXL': (48, 1536, 24),
               'GPT-XXXL': (48, 2560, 40), 'GPT-2B': (48, 1792, 28)}


def check_model_args(modeling: str, names):
  """A ``TypeError`` naming every name that is not a reference ``ModelArgs`` field of ``modeling``."""
  allowed = AR_MODEL_ARGS if modeling == 'ar' else MLM_MODEL_ARGS
  unknown = sorted(k for k in names if k not in allowed)
  if unknown:
    raise TypeError(f'unknown ELM {modeling.upper()} ModelArgs field(s): {", ".join(unknown)}')


@dataclasses.dataclass(frozen=True)
class ELMConfig(LlamaArgs):
  """ELM transformer hyperparameters: the reference ``ModelArgs`` field names and defaults (the shared ones in
  ``llama.LlamaArgs``), plus ``modeling``.

  ``modeling`` ('ar' or 'mlm', ours) picks the model. Build from the reference's own keyword arguments with
  ``ELMConfig.from_model_args(modeling, **model_args)`` (unknown names are rejected).

  Fields a checkpoint's shapes determine (``var_jax.interop.elm.infer_elm_config``): ``modeling`` (keys), ``dim``,
  ``n_layer``, ``code_dim`` (token table rows), ``token_each`` (AR: number of tables; MLM: ``proj``/``output.i``),
  ``num_classes`` (class table rows minus the null row), ``use_adaLN`` (AR keys), the FFN width (``multiple_of`` /
  ``ffn_dim_multiplier`` must reproduce it), ``n_kv_head`` given ``n_head``, and for MLM ``block_size``
  (``pos_embed`` rows, when present). Not determined by shapes: ``n_head`` (GPT preset or given), ``block_size``
  (AR; the latent grid is sqrt(block_size) square), ``rope_base``, ``norm_eps``, ``cls_token_num``, dropouts,
  ``class_dropout_prob``, ``smoothing``, sampling options. ``vocab_size``, ``caption_dim``, ``max_batch_size``,
  ``max_seq_len``, ``split_embder``, ``model_type``, ``norm_type``, ``mask_ratio_*`` are stored but unused, as in the
  reference (the vocabulary is 2^code_dim).
  """
  modeling: str = 'ar'
  # shared ModelArgs (beyond LlamaArgs)
  pause: bool = False
  pause_num: int = 0                  # MLM ModelArgs default: 10 (from_model_args applies it)
  token_each: int = 4
  cls_row: bool = False
  pos_type: str = 'rope2d'
  code_dim: int = 16
  vocab_size: int = 256
  # AR only
  attn_type: str = 'sdp'
  split_embder: bool = False
  model_type: str = 'c2i'
  # MLM only (and the mask_ratio_* / smoothing / gen_iter of LlamaArgs)
  maskpersample: bool = False
  mask_schstep: int = 10000
  mask_schtype: str = 'cos'
  norm_type: str = 'RMS'

  def __post_init__(self):
    if self.modeling not in ('ar', 'mlm'):
      raise ValueError(f"modeling must be 'ar' or 'mlm', got {self.modeling!r}")
    if self.pos_type != 'rope2d':
      raise NotImplementedError(f"pos_type={self.pos_type!r}: only 'rope2d' is supported (the reference's rope1d "
                                f'calls precompute_freqs_cis with too many arguments; no release uses another)')
    super().__post_init__()
    if self.token_each < 1 or self.code_dim < 1:
      raise ValueError(f'token_each and code_dim must be >= 1, got {self.token_each}, {self.code_dim}')
    if self.attn_type not in ('sdp', 'cs'):
      raise ValueError(f"attn_type must be 'sdp' or 'cs', got {self.attn_type!r}")
    if self.modeling == 'ar' and self.pause:
      raise NotImplementedError('ELM AR pause=True is broken upstream (the forward reads an undefined num_pause)')
    if self.modeling == 'mlm' and self.cls_token_num != 1:
      raise NotImplementedError('ELM MLM supports cls_token_num=1 only (the reference RoPE table does not fit '
                                'otherwise)')
    if self.modeling == 'mlm' and (self.attn_type != 'sdp'):
      raise ValueError('ELM MLM has no attn_type option (scaled dot-product attention only)')

  @classmethod
  def from_model_args(cls, modeling: str = 'ar', **model_args) -> 'ELMConfig':
    """Build from the reference ``ModelArgs`` keyword arguments (``GPT_models[...](**kwargs)`` + preset fields).

    Unknown names (for this ``modeling``) raise a ``TypeError`` naming them; missing ones take the reference
    defaults (MLM: ``pause_num=10``).
    """
    if modeling not in ('ar', 'mlm'):
      raise ValueError(f"modeling must be 'ar' or 'mlm', got {modeling!r}")
    check_model_args(modeling, model_args)
    kw = dict(model_args)
    if modeling == 'mlm':
      kw.setdefault('pause_num', 10)
    return cls(modeling=modeling, **kw)

  # ------------------------------------------------------------------ derived
  @property
  def codebook_size(self) -> int:
    """2^code_dim: the number of sub-token values (the reference's ``vocab_size`` argument is ignored)."""
    return 2 ** self.code_dim

  @property
  def mask_token_id(self) -> int:
    """MLM mask id (= codebook_size)."""
    return self.codebook_size

  @property
  def token_table_rows(self) -> int:
    """Rows of each token table: AR 2^cd; MLM 2^cd + 1 (mask) + 1 if pause."""
    if self.modeling == 'ar':
      return self.codebook_size
    return self.codebook_size + 1 + int(self.pause)

  @property
  def seq_len(self) -> int:
    """N: latent cells per image."""
    return self.block_size

  @property
  def bits_per_cell(self) -> int:
    """K = token_each * code_dim: the BAE's code width."""
    return self.token_each * self.code_dim

  @property
  def rope_cls_slots(self) -> int:
    if self.modeling == 'ar' and self.cls_row:
      return self.grid
    return self.cls_token_num

  def rope_table(self) -> np.ndarray:
    """AR: (rope_cls_slots + N, hd/2, 2); MLM: ((1 + N) * T, hd/2, 2)."""
    rep = self.token_each if self.modeling == 'mlm' else 1
    return precompute_rope_2d(self.head_dim, self.grid, self.rope_base, self.rope_cls_slots, rep)

  def drop_path_rates(self) -> List[float]:
    if self.n_layer == 1:
      return [0.0]
    return [float(x) for x in np.linspace(0, self.drop_path_rate, self.n_layer, dtype=np.float32)]


class _ELMTransformer(ConfigModule):
  """What ELMAR and ELMMLM share: the class table (``cls_embedding``, created first), the blocks ``layers_{i}``, the
  final ``norm``, token dropout and the RoPE table; label dropout + class lookup; the run through the blocks."""
  config: ELMConfig
  MODELING = ''

  def setup(self):
    cfg = self.config
    if cfg.modeling != self.MODELING:
      raise ValueError(f'{type(self).__name__} needs an ELMConfig with modeling="{self.MODELING}"')
    self.cls_embedding = self.param('cls_embedding', logical(normal_init(cfg.initializer_range), ('classes', 'embed')),
                                    (cfg.num_class_rows, cfg.dim), jnp.float32)
    adaln = cfg.use_adaLN and cfg.modeling == 'ar'
    self.layers = [TransformerBlock(cfg, rate, adaln, cfg.attn_type, dtype=self.dtype, name=f'layers_{i}')
                   for i, rate in enumerate(cfg.drop_path_rates())]
    self.norm = RMSNorm(cfg.norm_eps, dtype=self.dtype)
    self.token_dropout = nn.Dropout(cfg.token_dropout_p)
    self._rope = cfg.rope_table()

  def class_embed(self, labels, train: bool = False, force_drop_ids=None):
    """(B,) labels -> (B, 1, D): the reference ``LabelEmbedder``'s ``token_drop`` (forced ids (== 1), or
    Bernoulli(class_dropout_prob) in training from the rng stream 'dropout', -> the null class ``num_classes``)
    then the lookup."""
    cfg = self.config
    if force_drop_ids is not None and cfg.class_dropout_prob <= 0:
      raise ValueError('force_drop_ids needs the null class: class_dropout_prob is 0, so the class table has no row '
                       f'{cfg.num_classes}')
    draw = force_drop_ids is None and train and cfg.class_dropout_prob > 0
    labels = drop_labels(labels, cfg.class_dropout_prob, cfg.null_class, self.make_rng('dropout') if draw else None,
                         force_drop_ids)
    return lookup(self.cls_embedding, labels, BATCH_EMBED)[:, None, :].astype(self.dtype)

  def _blocks(self, h, freqs, causal: bool, cond, train: bool):
    """Token dropout, then every block (no cache) -> (h, the list of block outputs)."""
    h = self.token_dropout(h, deterministic=not train)

    def block(layer, h, freqs, cond):
      return layer(h, freqs, causal=causal, cond=cond, train=train)[0]
    if self.config.remat and train:
      block = nn.remat(block)                # causal / train are closed over: static
    hidden = []
    for layer in self.layers:
      h = block(layer, h, freqs, cond)
      hidden.append(h)
    return h, hidden


# ----------------------------------------------------------------------------- AR
class ELMAR(_ELMTransformer):
  """ELM autoregressive transformer (reference ``llama/ar_model.py`` ``Transformer``).

  Methods (``ELMAR(cfg).apply(variables, ..., method=ELMAR.name)``):

  - ``__call__(tokens, labels, train=False, force_drop_ids=None, return_hidden=False)``: teacher forcing on the
    full token grid (B, N, T) -> logits (B, N*T, V) float32 (input [class, tokens 0..N-2]); with ``return_hidden``
    also the list of block outputs (B, N, D).
  - ``forward_prefix(idx, labels, ...)``: the reference ``forward(idx, cond)`` for a prefix idx (B, S, T) (S may be
    0) -> logits (B, (S+1)*T, V).
  - ``class_embed``, ``embed_tokens``, ``decode`` (KV-cache step; see ``init_cache``).

  Training randomness (label dropout, dropouts, drop path) uses the rng stream 'dropout' when ``train=True``.
  As in the reference, ``cls_token_num`` > 1 (or ``cls_row``) only changes the RoPE table (its first C rows are
  zeros, and the sequence still holds one class slot); the reference's training forward then slices
  ``logits[:, C-1:]``, which breaks its loss, so no release uses it.
  """
  MODELING = 'ar'

  def setup(self):
    super().setup()
    cfg = self.config
    init = normal_init(cfg.initializer_range)
    d, t = cfg.dim, cfg.token_each
    self.tok_embedder = [self.param(f'tok_embedder_{i}', logical(init, ('vocab', 'embed')),
                                    (cfg.token_table_rows, d), jnp.float32) for i in range(t)]
    if t > 1:
      self.proj = Dense(d, use_bias=False, kernel_axes=('mlp', 'embed'), kernel_init=init, dtype=self.dtype)
    if cfg.use_adaLN:
      self.final_adaLN = Dense(2 * d, kernel_axes=('embed', 'adaln'), kernel_init=zeros_init, bias_init=zeros_init,
                               dtype=self.dtype)
    self.output = [Dense(cfg.codebook_size, use_bias=False, kernel_axes=('embed', 'vocab'), kernel_init=zeros_init,
                         dtype=self.dtype, name=f'output_{i}') for i in range(t)]

  # ------------------------------------------------------------------ pieces
  def embed_tokens(self, idx):
    """(B, S, T) sub-tokens -> (B, S, D): T tables, concatenated and projected when T > 1."""
    idx = jnp.asarray(idx, jnp.int32)
    embs = [lookup(tab, idx[..., i], BATCH_LENGTH_EMBED).astype(self.dtype) for i, tab in enumerate(self.tok_embedder)]
    if len(embs) == 1:
      return embs[0]
    return self.proj(jnp.concatenate(embs, axis=-1))

  def head(self, h, cond):
    """Final norm (+ final adaLN) and the T heads: (B, S, D) -> (B, S*T, V) float32, row s*T+i."""
    h = self.norm(h)
    if self.config.use_adaLN:
      shift, scale = jnp.split(self.final_adaLN(nn.silu(cond)), 2, axis=-1)
      h = modulate(h, shift, scale)
    logits = jnp.stack([o(h).astype(jnp.float32) for o in self.output], axis=2)     # (B, S, T, V)
    b, s = h.shape[:2]
    return logits.reshape(b, s * self.config.token_each, self.config.codebook_size)

  # ------------------------------------------------------------------ teacher forcing
  def forward_prefix(self, idx, labels, train: bool = False, force_drop_ids=None, return_hidden: bool = False):
    """Reference ``forward(idx, cond)``: input [class, idx 0..S-1] -> logits (B, (S+1)*T, V)."""
    cond = self.class_embed(labels, train, force_drop_ids)
    h = cond
    if idx is not None and idx.shape[1] > 0:
      h = jnp.concatenate([cond, self.embed_tokens(idx)], axis=1)
    h, hidden = self._blocks(h, jnp.asarray(self._rope[:h.shape[1]]), True, cond, train)
    logits = self.head(h, cond)
    return (logits, hidden) if return_hidden else logits

  def __call__(self, tokens, labels, train: bool = False, force_drop_ids=None, return_hidden: bool = False):
    """tokens (B, N, T) -> logits (B, N*T, V); position s (input token s-1, or the class at s=0) predicts s."""
    return self.forward_prefix(tokens[:, :-1], labels, train, force_drop_ids, return_hidden)

  # ------------------------------------------------------------------ KV-cache decoding
  def decode(self, h, cond, caches: List[KVCache], cache_index):
    """Run S new embedded inputs h (B, S, D) at positions [cache_index, cache_index+S) against the caches.

    Position 0 is the class slot (h = ``class_embed``), position s >= 1 holds ``embed_tokens(token s-1)``.
    ``cond`` is the class embedding (B, 1, D) (used by adaLN only). Returns (logits (B, S*T, V), new caches).
    """
    s = h.shape[1]
    freqs = jax.lax.dynamic_slice_in_dim(jnp.asarray(self._rope), jnp.asarray(cache_index, jnp.int32), s, axis=0)
    new = []
    h = h.astype(self.dtype)
    for layer, cache in zip(self.layers, caches):
      h, cache = layer(h, freqs, causal=True, cache=cache, cache_index=cache_index, cond=cond)
      new.append(cache)
    return self.head(h, cond), new


def init_cache(cfg: ELMConfig, batch: int, max_len: Optional[int] = None, dtype=jnp.float32) -> List[KVCache]:
  """Zeroed KV caches for ``ELMAR.decode``; max_len defaults to N (class + N-1 tokens)."""
  return init_kv_cache(batch, max_len or cfg.seq_len, cfg.num_kv_heads, cfg.head_dim, cfg.n_layer, dtype)


# ----------------------------------------------------------------------------- MLM
class MlmLayer(nn.Module):
  """Reference ``MlmLayer``: Linear(D, D) -> exact GELU -> LayerNorm(eps 1e-5) -> @ word_embeddings^T + bias."""
  vocab: int
  init_std: float = 0.02
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, word_embeddings):
    d = x.shape[-1]
    y = Dense(d, kernel_axes=('embed', 'mlp'), kernel_init=normal_init(self.init_std), bias_init=zeros_init,
              name='fc', dtype=self.dtype)(x)
    y = nn.gelu(y, approximate=False)
    scale = self.param('ln_scale', logical(ones_init, ('norm',)), (d,), jnp.float32)
    shift = self.param('ln_bias', logical(zeros_init, ('norm',)), (d,), jnp.float32)
    y = (layer_norm_no_affine(y.astype(jnp.float32), self.eps) * scale + shift).astype(self.dtype)
    bias = self.param('bias', logical(zeros_init, ('vocab',)), (self.vocab,), jnp.float32)
    logits = jnp.einsum('bsd,vd->bsv', y, word_embeddings.astype(self.dtype), preferred_element_type=jnp.float32)
    return logits + bias


class ELMMLM(_ELMTransformer):
  """ELM masked transformer (reference ``llama/mlm_model.py`` ``Transformer``).

  ``__call__(masked_tokens, labels, token_all_mask=None, train=False, force_drop_ids=None, return_hidden=False)``:
  masked_tokens (B, N, T) with masked positions set to the mask id 2^cd (or pass the clean tokens and
  ``token_all_mask`` (B, N), 1 = masked, which writes the mask id) -> logits (B, N*T, 2^cd) float32; with
  ``return_hidden`` also the block outputs (B, (N+1)*T, D) (first T slots: the class).
  The head's tied token table is read through ``stop_gradient`` (the reference uses ``weight.data.detach()``).
  """
  MODELING = 'mlm'

  def setup(self):
    super().setup()
    cfg = self.config
    self.tok_embedder = self.param('tok_embedder', logical(normal_init(cfg.initializer_range), ('vocab', 'embed')),
                                   (cfg.token_table_rows, cfg.dim), jnp.float32)
    self.mlm_layer = MlmLayer(cfg.token_table_rows, cfg.initializer_range, dtype=self.dtype)

  def __call__(self, masked_tokens, labels, token_all_mask=None, train: bool = False, force_drop_ids=None,
               return_hidden: bool = False):
    cfg = self.config
    idx = jnp.asarray(masked_tokens, jnp.int32)
    b, n, t = idx.shape
    if n != cfg.seq_len or t != cfg.token_each:
      raise ValueError(f'ELMMLM expects tokens (B, {cfg.seq_len}, {cfg.token_each}), got {idx.shape}')
    if token_all_mask is not None:
      idx = jnp.where(jnp.asarray(token_all_mask)[..., None] != 0, cfg.mask_token_id, idx)
    tok = lookup(self.tok_embedder, idx, ('activation_batch', 'activation_length', None, 'activation_embed')
                 ).astype(self.dtype)                                                   # (B, N, T, D)
    cond = self.class_embed(labels, train, force_drop_ids)                              # (B, 1, D)
    cls = jnp.broadcast_to(cond[:, :, None, :], (b, 1, t, cfg.dim))
    h = jnp.concatenate([cls, tok], axis=1).reshape(b, (n + 1) * t, cfg.dim)
    h, hidden = self._blocks(h, jnp.asarray(self._rope), False, None, train)
    h = self.norm(h)
    logits = self.mlm_layer(h, jax.lax.stop_gradient(self.tok_embedder))
    logits = logits[:, t:, :cfg.codebook_size]
    return (logits, hidden) if return_hidden else logits


# ----------------------------------------------------------------------------- bits <-> tokens
def bits_to_tokens(bits, token_each: int):
  """BAE bits (B, h, w, K) 0/1 -> sub-tokens (B, h*w, T) int32 (train_ddp.py recipe).

  Cells in raster order; the K channels split into T chunks of cd = K/T; inside a chunk the first channel is the most
  significant bit.
  """
  bits = jnp.asarray(bits)
  b, hh, ww, k = bits.shape
  if k % token_each:
    raise ValueError(f'{k} bits per cell do not split into token_each={token_each} chunks')
  cd = k // token_each
  x = bits.reshape(b, hh * ww, token_each, cd).astype(jnp.int32)
  weights = jnp.asarray(2 ** np.arange(cd - 1, -1, -1), jnp.int32)
  return jnp.sum(x * weights, axis=-1).astype(jnp.int32)


def tokens_to_bits(tokens, code_dim: int, hw: Optional[Tuple[int, int]] = None):
  """Sub-tokens (B, N, T) -> bits (B, h, w, T*code_dim) uint8 (inverse of ``bits_to_tokens``; sample.py recipe).

  ``hw`` defaults to a square grid.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  b, n, t = tokens.shape
  if hw is None:
    g = math.isqrt(n)
    if g * g != n:
      raise ValueError(f'{n} tokens are not a square grid: pass hw')
    hw = (g, g)
  shifts = jnp.asarray(np.arange(code_dim - 1, -1, -1), jnp.int32)
  bits = (tokens[..., None] >> shifts) & 1                                              # (B, N, T, cd)
  return bits.reshape(b, hw[0], hw[1], t * code_dim).astype(jnp.uint8)


__all__ = ['ELMConfig', 'check_model_args', 'ELMAR', 'ELMMLM', 'MlmLayer', 'init_cache', 'bits_to_tokens', 'tokens_to_bits',
           'AR_MODEL_ARGS', 'MLM_MODEL_ARGS', 'GPT_PRESETS']
