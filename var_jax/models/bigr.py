"""BiGR: a bidirectional Llama backbone over binary latent codes plus a Bernoulli-diffusion transcoder.

Mirrors the reference ``llama/gpt.py`` (``Transformer``, ``DenoiseModel``) and ``llama/bindiff/binarylatent.py``
(``BinaryDiffusion``) of haoosz/BiGR. Submodule names follow the reference's (``layers_{i}/attention/wqkv`` for
``layers.{i}.attention.wqkv``, ``denoise_mlp/blocks_{i}/adaLN_modulation`` for
``denoise_mlp.blocks.{i}.adaLN_modulation.1``), so ``var_jax.interop.bigr`` maps names by rule.

Data flow (B images, N = seq_len tokens of K = binary_size bits, C = cls_token_num class slots, D = dim):

* ``backbone``: the 0/1 bits (B, N, K) go through ``Linear(K, D)`` (with bias); masked positions are replaced by the
  learned ``mask_tok``; C copies of the class embedding are prepended. Full bidirectional attention with 2D RoPE
  (the class slots' RoPE entries are zeros). With ``use_adaLN`` one shared ``Linear(D, 6D)`` on SiLU(class
  embedding) plus a per-layer ``ada_gss`` modulates every block. After the blocks: RMSNorm, the class slots are
  dropped, and ``diffusion_pos_embed_learned`` is added: z (B, N, D).
* ``transcoder`` (``DenoiseModel``): per token, logits of the K bits of x0 (or of their flips with ``p_flip``) from
  x_t, the timestep and z.
* ``loss``: the reference training forward with explicit timesteps, uniforms and mask
  (``var_jax.losses.bigr.sample_training_inputs`` draws them from a PRNG key the way the reference does).

Randomness is explicit: label dropout takes ``force_drop_ids`` or a ``label_drop_rng`` key; the dropouts (token,
attention, residual, FFN, drop path) use the ``'dropout'`` rng stream when ``deterministic=False``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from var_jax.losses.diffusion import loss_terms
from var_jax.models import bernoulli_diffusion as bd
from var_jax.models.layers import (BATCH_EMBED, BATCH_LENGTH_EMBED, ConfigModule, Dense, drop_labels,
                                   layer_norm_no_affine, logical, lookup)
from var_jax.models.llama import (LlamaArgs, RMSNorm, TransformerBlock, modulate, normal_init, precompute_rope_2d,
                                  zeros_init)

Dtype = Any


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class BiGRConfig(LlamaArgs):
  """The reference ``ModelArgs`` (same field names and defaults; the ones ELM shares in ``llama.LlamaArgs``) plus
  ``beta_type``.

  Only some fields shape the network; the others (mask ratios, smoothing, caption_dim, quant_size, max_* ...) are
  kept so a reference ``ModelArgs`` round-trips. ``beta_type`` is ours: the reference hard-codes 'linear'.
  """
  quant_size: int = 256
  binary_size: int = 16
  denoise_hidden_dim: int = 1024
  p_flip: bool = False
  n_repeat: int = 1
  aux: float = 0.0
  focal: float = 0.0
  alpha: float = -1
  sample_temperature: float = 1.0
  n_sample_steps: int = 256
  infer_steps: int = 100
  num_block_mlp: int = 3
  seq_len: int = 256
  # ours
  beta_type: str = 'linear'

  def __post_init__(self):
    super().__post_init__()
    if self.seq_len > self.block_size:
      raise ValueError(f'seq_len {self.seq_len} exceeds block_size {self.block_size} (RoPE table)')
    if self.use_adaLN and self.cls_token_num != 1:
      raise ValueError('use_adaLN broadcasts the class modulation over the sequence, which the reference supports '
                       f'only with cls_token_num = 1 (got {self.cls_token_num})')
    if self.beta_type not in bd.BETA_TYPES:
      raise ValueError(f'unknown beta_type {self.beta_type!r}; expected one of {bd.BETA_TYPES}')

  @classmethod
  def from_model_args(cls, **kw) -> 'BiGRConfig':
    """Build from reference ``ModelArgs`` keyword arguments; unknown names are an error that lists them."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kw) - known)
    if unknown:
      raise ValueError(f'unknown BiGR ModelArgs field(s): {", ".join(unknown)}')
    return cls(**kw)

  def model_args(self) -> Dict[str, Any]:
    """The reference ``ModelArgs`` fields (without ``beta_type`` and ``remat``, ours)."""
    d = dataclasses.asdict(self)
    d.pop('beta_type')
    d.pop('remat')
    return d


# The reference ``BIGR_models`` (the sizes; the rest comes from the training/sampling arguments).
BIGR_PRESETS: Dict[str, Dict[str, int]] = {
    'BiGR-L': dict(n_layer=24, n_head=16, dim=1024, num_block_mlp=3, denoise_hidden_dim=1024),
    'BiGR-XL': dict(n_layer=36, n_head=20, dim=1280, num_block_mlp=6, denoise_hidden_dim=1280),
    'BiGR-XXL': dict(n_layer=48, n_head=24, dim=1536, num_block_mlp=8, denoise_hidden_dim=1536),
    'BiGR-L-512': dict(n_layer=24, n_head=16, dim=1024, num_block_mlp=6, denoise_hidden_dim=1280),
}


def bigr_config(name: str, **model_args) -> BiGRConfig:
  """A released size (``BIGR_PRESETS``) with further ``ModelArgs`` (e.g. binary_size, p_flip, use_adaLN)."""
  if name not in BIGR_PRESETS:
    raise ValueError(f'unknown BiGR model {name!r}; expected one of {sorted(BIGR_PRESETS)}')
  return BiGRConfig.from_model_args(**{**BIGR_PRESETS[name], **model_args})


# ----------------------------------------------------------------------------- backbone block
_zeros = zeros_init


class BiGRBlock(nn.Module):
  """``llama.TransformerBlock`` (full attention) plus, with use_adaLN, this layer's ``ada_gss`` (6, D) added to the
  shared modulation (B, C=1, 6, D) before it is split into (shift, scale, gate) x (attention, FFN).

  The block shares this module's scope, so the parameters sit at ``layers_{i}/{ada_gss, attention, feed_forward,
  attention_norm, ffn_norm}`` as in the reference.
  """
  config: BiGRConfig
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    if cfg.use_adaLN:
      self.ada_gss = self.param('ada_gss', logical(normal_init(1.0 / math.sqrt(cfg.dim)), (None, 'embed')),
                                (6, cfg.dim), jnp.float32)
    self.block = TransformerBlock(cfg, self.drop_path, dtype=self.dtype)
    nn.share_scope(self, self.block)

  def __call__(self, x, cond_adaln, rope, deterministic: bool = True):
    modulation = None
    if self.config.use_adaLN:
      mods = cond_adaln + self.ada_gss.astype(cond_adaln.dtype)             # (B, C, 6, D)
      modulation = [mods[:, :, i] for i in range(6)]                        # (B, C=1, D) each
    out, _ = self.block(x, rope, None, causal=False, modulation=modulation, train=not deterministic)
    return out


# ----------------------------------------------------------------------------- transcoder
def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """DiT sinusoidal embedding, [cos, sin] order (float32)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], -1)
  return emb


# the transcoder works on one row per token (B*N, ...), batch-major: rows stay sharded like the batch (its Dense
# kernels shard their 'embed' output axis over fsdp too; unconstrained, the partitioner gathered the global
# (B*N, 256) timestep features and (B*N, 1536) embeddings onto every chip: 4.6 GiB of all-gathers per BiGR-XXL step)
ROWS = BATCH_EMBED


class TimestepEmbedder(nn.Module):
  hidden_dim: int
  frequency_embedding_size: int = 256
  init_std: float = 0.02
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    e = timestep_embedding(t, self.frequency_embedding_size).astype(self.dtype)
    init = normal_init(self.init_std)
    e = Dense(self.hidden_dim, kernel_axes=(None, 'embed'), kernel_init=init, bias_init=_zeros, name='mlp_0',
              dtype=self.dtype, out_axes=ROWS)(e)
    return Dense(self.hidden_dim, kernel_axes=('embed', 'mlp'), kernel_init=init, bias_init=_zeros, name='mlp_2',
                 dtype=self.dtype, out_axes=ROWS)(jax.nn.silu(e))


class DenoiseBlock(nn.Module):
  hidden_dim: int
  init_std: float = 0.02
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    hdim, init = self.hidden_dim, normal_init(self.init_std)
    mods = Dense(3 * hdim, kernel_axes=('embed', 'adaln'), kernel_init=_zeros, bias_init=_zeros,
                 name='adaLN_modulation', dtype=self.dtype, out_axes=ROWS)(jax.nn.silu(c))
    shift, scale, gate = jnp.split(mods, 3, axis=-1)
    y = modulate(layer_norm_no_affine(x, 1e-6), shift, scale)
    y = Dense(hdim, kernel_axes=('embed', 'mlp'), kernel_init=init, bias_init=_zeros, name='mlp_0',
              dtype=self.dtype, out_axes=ROWS)(y)
    y = Dense(hdim, kernel_axes=('mlp', 'embed'), kernel_init=init, bias_init=_zeros, name='mlp_2',
              dtype=self.dtype, out_axes=ROWS)(jax.nn.silu(y))
    return x + gate * y


class FinalLayer(nn.Module):
  hidden_dim: int
  out_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    mods = Dense(2 * self.hidden_dim, kernel_axes=('embed', 'adaln'), kernel_init=_zeros, bias_init=_zeros,
                 name='adaLN_modulation', dtype=self.dtype, out_axes=ROWS)(jax.nn.silu(c))
    shift, scale = jnp.split(mods, 2, axis=-1)
    x = modulate(layer_norm_no_affine(x, 1e-6), shift, scale)
    return Dense(self.out_dim, kernel_axes=('embed', 'latent'), kernel_init=_zeros, bias_init=_zeros,
                 name='linear', dtype=self.dtype, out_axes=ROWS)(x)


class DenoiseModel(nn.Module):
  """The reference transcoder: logits of the K bits from x_t (0/1), raw time_steps (the net is fed t - 1) and c."""
  in_dim: int
  hidden_dim: int
  out_dim: int
  num_blocks: int
  rescale: bool = True
  init_std: float = 0.02
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, time_steps, c):
    init = normal_init(self.init_std)
    x = jnp.asarray(x, jnp.float32)
    if self.rescale:
      x = (x * 1.0 - 0.5) * 2.0
    x = Dense(self.hidden_dim, kernel_axes=('latent', 'embed'), kernel_init=init, bias_init=_zeros,
              name='x_embedder', dtype=self.dtype, out_axes=ROWS)(x.astype(self.dtype))
    c = Dense(self.hidden_dim, kernel_axes=('embed', 'mlp'), kernel_init=init, bias_init=_zeros,
              name='c_embedder', dtype=self.dtype, out_axes=ROWS)(c)
    c = TimestepEmbedder(self.hidden_dim, init_std=self.init_std, dtype=self.dtype, name='t_embedder')(time_steps) + c
    for i in range(self.num_blocks):
      x = DenoiseBlock(self.hidden_dim, self.init_std, self.dtype, name=f'blocks_{i}')(x, c)
    return FinalLayer(self.hidden_dim, self.out_dim, self.dtype, name='final_layer')(x, c).astype(jnp.float32)


# ----------------------------------------------------------------------------- the model
class BiGR(ConfigModule):
  """BiGR backbone + transcoder. ``__call__`` runs both (teacher-forced) and creates every parameter.

  Shapes: inp (B, N, K) 0/1 floats with N = seq_len; labels (B,) int; token_all_mask (B, N) bool/0-1 (1 = masked).
  """
  config: BiGRConfig

  def setup(self):
    cfg = self.config
    d = cfg.dim
    init = normal_init(cfg.initializer_range)
    self.cls_embedding = self.param('cls_embedding', logical(init, ('classes', 'embed')), (cfg.num_class_rows, d),
                                    jnp.float32)
    self.mask_tok = self.param('mask_tok', logical(normal_init(1.0), ('embed',)), (d,), jnp.float32)
    self.tok_embeddings = Dense(d, kernel_axes=('latent', 'embed'), kernel_init=init, bias_init=_zeros,
                                dtype=self.dtype)
    if cfg.use_adaLN:
      self.adaLN = Dense(6 * d, kernel_axes=('embed', 'adaln'), kernel_init=_zeros, bias_init=_zeros, dtype=self.dtype,
                         out_axes=BATCH_LENGTH_EMBED)
    dpr = np.linspace(0.0, cfg.drop_path_rate, cfg.n_layer) if cfg.n_layer > 1 else np.array([0.0])
    block_cls = nn.remat(BiGRBlock, static_argnums=(4,)) if cfg.remat else BiGRBlock   # (self, x, c, rope, det)
    self.layers = [block_cls(cfg, float(dpr[i]), self.dtype) for i in range(cfg.n_layer)]
    self.norm = RMSNorm(cfg.norm_eps)
    self.diffusion_pos_embed_learned = self.param('diffusion_pos_embed_learned', logical(init, ('length', 'embed')),
                                                  (cfg.seq_len, d), jnp.float32)
    self.denoise_mlp = DenoiseModel(in_dim=cfg.binary_size, hidden_dim=cfg.denoise_hidden_dim,
                                    out_dim=cfg.binary_size, num_blocks=cfg.num_block_mlp,
                                    init_std=cfg.initializer_range, dtype=self.dtype)
    self.token_dropout = nn.Dropout(cfg.token_dropout_p)

  # --------------------------------------------------------------------------- pieces
  def drop_labels(self, labels, force_drop_ids=None, label_drop_rng=None):
    """Classifier-free-guidance label dropout: dropped labels become the null class.

    ``force_drop_ids`` (B,) (1 = drop) wins; else with ``label_drop_rng`` each label drops with probability
    class_dropout_prob (uniform < p); else nothing is dropped (the reference's eval mode).
    """
    cfg = self.config
    return drop_labels(labels, cfg.class_dropout_prob, cfg.null_class, label_drop_rng, force_drop_ids)

  def class_embedding(self, labels, force_drop_ids=None, label_drop_rng=None):
    """(B, C, D): C copies of the (dropped-out) class embedding."""
    labels = self.drop_labels(labels, force_drop_ids, label_drop_rng)
    e = lookup(self.cls_embedding, labels, BATCH_EMBED).astype(self.dtype)
    return jnp.repeat(e[:, None], self.config.cls_token_num, axis=1)

  def _run(self, inp, labels, token_all_mask, *, force_drop_ids, label_drop_rng, deterministic,
           layer_index: Optional[int] = None):
    cfg = self.config
    inp = jnp.asarray(inp, jnp.float32)
    b, n, k = inp.shape
    if k != cfg.binary_size:
      raise ValueError(f'inp has {k} bits per token, the model expects binary_size={cfg.binary_size}')
    c_num = cfg.cls_token_num
    if n > cfg.block_size:
      raise ValueError(f'{n} tokens exceed block_size {cfg.block_size}')
    cond = self.class_embedding(labels, force_drop_ids, label_drop_rng)             # (B, C, D)
    tok = self.tok_embeddings(inp.astype(self.dtype))
    if token_all_mask is not None:
      m = jnp.asarray(token_all_mask).astype(bool)[..., None]
      tok = jnp.where(m, self.mask_tok.astype(tok.dtype), tok)
    x0 = jnp.concatenate([cond, tok], axis=1)
    h = self.token_dropout(x0, deterministic=deterministic or cfg.token_dropout_p == 0)
    if cfg.use_adaLN:
      cond_adaln = self.adaLN(jax.nn.silu(cond))                                     # (B, C, 6D)
      cond_adaln_4 = cond_adaln.reshape(b, c_num, 6, cfg.dim)
    else:
      cond_adaln, cond_adaln_4 = None, None
    rope = jnp.asarray(precompute_rope_2d(cfg.head_dim, cfg.grid, cfg.rope_base, c_num)[: c_num + n])
    hidden = []
    for i, layer in enumerate(self.layers):
      h = layer(h, cond_adaln_4, rope, deterministic)
      hidden.append(h)
      if layer_index is not None and i == layer_index:
        break
    return h, {'embedded_input': x0, 'adaln_cond': cond_adaln, 'hidden': hidden}

  def backbone(self, inp, labels, token_all_mask=None, *, force_drop_ids=None, label_drop_rng=None,
               deterministic: bool = True, return_intermediates: bool = False):
    """z (B, N, D) = RMSNorm(blocks(...))[:, C:] + diffusion_pos_embed_learned: the transcoder condition.

    With ``return_intermediates`` also a dict: 'embedded_input' (B, C+N, D), 'adaln_cond' (B, C, 6D) or None,
    'hidden' (a list of the block outputs (B, C+N, D)).
    """
    cfg = self.config
    h, inter = self._run(inp, labels, token_all_mask, force_drop_ids=force_drop_ids, label_drop_rng=label_drop_rng,
                         deterministic=deterministic)
    if h.shape[1] - cfg.cls_token_num != cfg.seq_len:
      raise ValueError(f'the backbone needs seq_len={cfg.seq_len} tokens, got {h.shape[1] - cfg.cls_token_num}')
    z = self.norm(h).astype(jnp.float32)[:, cfg.cls_token_num:] + self.diffusion_pos_embed_learned
    return (z, inter) if return_intermediates else z

  def features(self, inp, labels, layer_index: int):
    """The reference ``forward_full_image``: unmasked bits, blocks 0..layer_index (inclusive), no final norm, class
    slots dropped. Returns (token mean (B, D), tokens (B, N, D)). A layer_index outside 0..n_layer-1 runs all."""
    h, _ = self._run(inp, labels, None, force_drop_ids=None, label_drop_rng=None, deterministic=True,
                     layer_index=layer_index)
    tokens = h.astype(jnp.float32)[:, self.config.cls_token_num:]
    return tokens.mean(1), tokens

  def transcoder(self, x_t, t, z):
    """Logits (..., K) of x_t (..., K) 0/1 at scheduler timesteps t (...,) in 1..T (the net gets t - 1); z (..., D)."""
    return self.denoise_mlp(x_t, jnp.asarray(t) - 1, z)

  def __call__(self, inp, labels, token_all_mask=None, x_t=None, t=None, *, force_drop_ids=None,
               label_drop_rng=None, deterministic: bool = True):
    """Teacher-forced backbone + transcoder: (z (B, N, D), logits (B, N, K)). x_t defaults to inp, t to 1."""
    cfg = self.config
    z = self.backbone(inp, labels, token_all_mask, force_drop_ids=force_drop_ids, label_drop_rng=label_drop_rng,
                      deterministic=deterministic)
    b, n = z.shape[:2]
    if x_t is None:
      x_t = inp
    if t is None:
      t = jnp.ones((b, n), jnp.int32)
    logits = self.transcoder(jnp.reshape(x_t, (b * n, cfg.binary_size)), jnp.reshape(t, (b * n,)),
                             z.reshape(b * n, cfg.dim))
    return z, logits.reshape(b, n, cfg.binary_size)

  def loss(self, inp, labels, token_all_mask, t, u, *, targets=None, force_drop_ids=None, label_drop_rng=None,
           deterministic: bool = True, schedule: Optional[Dict[str, np.ndarray]] = None):
    """The reference training forward (``Transformer.forward`` in train mode) with explicit noise.

    Args:
      inp: (B, N, K) 0/1 input bits (masked positions are replaced by ``mask_tok``).
      labels: (B,) class labels.
      token_all_mask: (B, N) 1 = masked; the loss averages over the masked tokens' bits.
      t: (B*N,) timesteps in 1..T, one per token (row-major over (B, N)).
      u: (B*N, K) uniforms: x_t = (u < k_t x0 + b_t).
      targets: x0 bits (B, N, K); defaults to ``inp`` (as train_ddp.py passes).
      force_drop_ids / label_drop_rng: label dropout (see ``drop_labels``).
      deterministic: False enables the dropouts ('dropout' rng).
      schedule: precomputed ``make_schedule`` buffers (computed from the config when None).

    Returns:
      (loss, stats): stats has 'loss', 'bce_loss' (masked means), 'acc' (over all bits, as the reference reports
      it), 'loss_all' / 'bce_loss_all' (B, N, K) per-bit losses before masking, 'x_t' (B*N, K), 'logits'
      (B*N, K) and 'aux_loss' when aux > 0.
    """
    cfg = self.config
    if schedule is None:
      schedule = bd.make_schedule(cfg.n_sample_steps, cfg.beta_type)
    inp = jnp.asarray(inp, jnp.float32)
    b, n, k = inp.shape
    targets = inp if targets is None else jnp.asarray(targets, jnp.float32)
    z = self.backbone(inp, labels, token_all_mask, force_drop_ids=force_drop_ids, label_drop_rng=label_drop_rng,
                      deterministic=deterministic)
    # one row per token, batch-major: kept sharded like the batch (unconstrained, the partitioner gathered the
    # global (B*N, D) timestep embeddings onto every device: 384 MiB per step for BiGR-XXL on 64 chips)
    rows = ('activation_batch', None)
    x0 = nn.with_logical_constraint(targets.reshape(b * n, k), rows)
    t = nn.with_logical_constraint(jnp.asarray(t, jnp.int32).reshape(b * n), ('activation_batch',))
    x_t = bd.q_sample(x0, t, nn.with_logical_constraint(jnp.asarray(u).reshape(b * n, k), rows), schedule)
    z = nn.with_logical_constraint(z.reshape(b * n, cfg.dim), BATCH_EMBED)
    logits = self.transcoder(x_t, t, z)
    terms = loss_terms(logits, x0, x_t, t, schedule, p_flip=cfg.p_flip, focal=cfg.focal, alpha=cfg.alpha, aux=cfg.aux)
    m = jnp.broadcast_to(jnp.asarray(token_all_mask, jnp.float32)[..., None], (b, n, k))
    loss_all = terms['loss_all'].reshape(b, n, k)
    bce_all = terms['bce_loss_all'].reshape(b, n, k)
    denom = m.sum()
    stats = {'loss': (loss_all * m).sum() / denom, 'bce_loss': (bce_all * m).sum() / denom, 'acc': terms['acc'],
             'loss_all': loss_all, 'bce_loss_all': bce_all, 'x_t': x_t, 'logits': logits}
    if 'aux_loss' in terms:
      stats['aux_loss'] = terms['aux_loss']
    return stats['loss'], stats
