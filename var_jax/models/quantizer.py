"""Multi-scale residual quantizer (the reference ``VectorQuantizer2``), NHWC.

For each scale k (coarse to fine): area-downsample the residual to pn_k x pn_k, look up the nearest code,
bicubic-upsample the code map back to full size, apply phi_k (``(1-r) x + r conv3x3(x)``), add it to f_hat and
subtract it from the residual. The last scale works at full resolution (no resampling).

phi sharing (``share_quant_resi``): 0 -> one phi per scale (``default_qresi_counts`` of them, picked by nearest
tick), 1 -> a single shared phi, K > 1 -> K phis picked by the nearest tick to si/(S-1). The ticks are the
reference's: linspace(1/3/K, 1-1/3/K, K) when K == 4 else linspace(1/2/K, 1-1/2/K, K).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models.var_config import VQVAEConfig
from var_jax.models.layers import Conv, logical
from var_jax.ops.resize import area_resize, bicubic_resize

HIGHEST = jax.lax.Precision.HIGHEST


def phi_ticks(k: int) -> np.ndarray:
  return np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)


def phi_index_per_scale(config: VQVAEConfig) -> Tuple[Optional[int], ...]:
  """Which phi each scale uses (None: identity, when quant_resi == 0)."""
  n, s = config.num_phis, len(config.patch_nums)
  if n == 0:
    return (None,) * s
  if config.share_quant_resi == 1:
    return (0,) * s
  ticks = phi_ticks(n)
  at = [si / (s - 1) if s > 1 else 0.0 for si in range(s)]
  return tuple(int(np.argmin(np.abs(ticks - a))) for a in at)


class Phi(nn.Module):
  resi_ratio: float

  @nn.compact
  def __call__(self, h):
    r = abs(self.resi_ratio)
    return h * (1 - r) + Conv(h.shape[-1], 3, name='conv')(h) * r


def codebook_init(key, shape, dtype=jnp.float32):
  """torch ``nn.Embedding`` default: N(0, 1). The reference trainer may re-init with ``eini``."""
  return jax.random.normal(key, shape, dtype)


class MultiScaleQuantizer(nn.Module):
  config: VQVAEConfig

  def setup(self):
    c = self.config
    self.embedding = self.param('embedding', logical(codebook_init, ('vocab', 'latent')),
                                (c.vocab_size, c.z_channels), jnp.float32)
    self.phis = [Phi(c.quant_resi, name=f'phi_{i}') for i in range(c.num_phis)]
    # EMA of code hits per scale (reference buffer ``quantize.ema_vocab_hit_SV``); updated by the tokenizer trainer.
    # Optional: created at init, carried when present, so inference may pass ``params`` alone.
    if self.is_mutable_collection('vq_stats') or self.has_variable('vq_stats', 'ema_vocab_hit_SV'):
      self.ema_vocab_hit_SV = self.variable('vq_stats', 'ema_vocab_hit_SV', jnp.zeros,
                                            (len(c.patch_nums), c.vocab_size), jnp.float32)
    self._phi_idx = phi_index_per_scale(c)

  # ------------------------------------------------------------------ pieces
  def init_phis(self, h):
    """Touch every phi (init): with few scales some phis are never selected, but the reference has them all."""
    for p in self.phis:
      h = p(h)
    return h

  def phi(self, si: int, h):
    i = self._phi_idx[si]
    return h if i is None else self.phis[i](h)

  def embed(self, idx):
    """Token ids (...) -> code vectors (..., Cvae)."""
    return jnp.take(self.embedding, idx, axis=0)

  def lookup(self, z):
    """Nearest code for each vector of z (N, C) -> int32 (N,). Squared L2 (or cosine with ``using_znorm``)."""
    e = self.embedding
    z = z.astype(jnp.float32)
    if self.config.using_znorm:
      zn = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
      en = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
      return jnp.argmax(jnp.dot(zn, en.T, precision=HIGHEST), axis=-1).astype(jnp.int32)
    d = (jnp.sum(z * z, axis=1, keepdims=True) + jnp.sum(e * e, axis=1)[None, :]
         - 2.0 * jnp.dot(z, e.T, precision=HIGHEST))
    return jnp.argmin(d, axis=-1).astype(jnp.int32)

  def _scale_code_map(self, si: int, idx_bhw, full_hw: Tuple[int, int]):
    """phi(upsampled code map) of scale si, at full resolution."""
    h = self.embed(idx_bhw)
    if h.shape[1:3] != tuple(full_hw):
      h = bicubic_resize(h, full_hw)
    return self.phi(si, h)

  def _patch_hws(self, f, patch_nums=None):
    hws = [(p, p) if isinstance(p, int) else tuple(p) for p in (patch_nums or self.config.patch_nums)]
    if tuple(hws[-1]) != tuple(f.shape[1:3]):
      raise ValueError(f'the last patch size {hws[-1]} must equal the feature map size {tuple(f.shape[1:3])} '
                       f'(image size = {self.config.downsample} x last patch size)')
    return hws

  # ------------------------------------------------------------------ encode
  def f_to_idx_and_fhat(self, f, patch_nums=None) -> Tuple[List[jax.Array], List[jax.Array]]:
    """f (B, H, W, C) -> (tokens per scale [int32 (B, ph*pw)], accumulated f_hat after each scale)."""
    f = jax.lax.stop_gradient(f.astype(jnp.float32))
    b, hh, ww, c = f.shape
    hws = self._patch_hws(f, patch_nums)
    f_rest, f_hat = f, jnp.zeros_like(f)
    idxs, fhats = [], []
    for si, (ph, pw) in enumerate(hws):
      z = f_rest if si == len(hws) - 1 else area_resize(f_rest, (ph, pw))
      idx = self.lookup(z.reshape(-1, c)).reshape(b, ph, pw)
      h = self._scale_code_map(si, idx, (hh, ww))
      f_hat = f_hat + h
      f_rest = f_rest - h
      idxs.append(idx.reshape(b, ph * pw))
      fhats.append(f_hat)
    return idxs, fhats

  # ------------------------------------------------------------------ decode
  def idx_to_fhat(self, idx_list: Sequence[jax.Array], last_one: bool = True):
    """Tokens per scale -> f_hat (all scales upsampled to the max scale and summed, as ``embed_to_fhat``)."""
    pn_last = self.config.patch_nums[-1]
    b = idx_list[0].shape[0]
    f_hat = jnp.zeros((b, pn_last, pn_last, self.config.z_channels), jnp.float32)
    outs = []
    for si, idx in enumerate(idx_list):
      pn = int(round(idx.shape[1] ** 0.5))
      f_hat = f_hat + self._scale_code_map(si, idx.reshape(b, pn, pn), (pn_last, pn_last))
      outs.append(f_hat)
    return f_hat if last_one else outs

  def idx_to_var_input(self, idx_list: Sequence[jax.Array]):
    """Teacher-forcing input of the transformer: for scales 2..K, the running f_hat area-downsampled to that
    scale, flattened -> (B, L - first_l, Cvae) float32."""
    pns = self.config.patch_nums
    pn_last = pns[-1]
    b = idx_list[0].shape[0]
    f_hat = jnp.zeros((b, pn_last, pn_last, self.config.z_channels), jnp.float32)
    nxt = []
    for si in range(len(pns) - 1):
      f_hat = f_hat + self._scale_code_map(si, idx_list[si].reshape(b, pns[si], pns[si]), (pn_last, pn_last))
      nxt.append(area_resize(f_hat, pns[si + 1]).reshape(b, -1, self.config.z_channels))
    if not nxt:
      return jnp.zeros((b, 0, self.config.z_channels), jnp.float32)
    return jnp.concatenate(nxt, axis=1)

  def next_ar_input(self, si: int, f_hat, h_bhwc):
    """Sampling step: add scale si's (already embedded) code map to f_hat; return (f_hat, next scale's input map).

    ``h_bhwc`` is (B, pn, pn, Cvae) — code vectors or, in the Gumbel "more smooth" mode, soft mixtures of them.
    """
    pns = self.config.patch_nums
    pn_last = pns[-1]
    if si != len(pns) - 1:
      f_hat = f_hat + self.phi(si, bicubic_resize(h_bhwc, (pn_last, pn_last)))
      return f_hat, area_resize(f_hat, pns[si + 1])
    f_hat = f_hat + self.phi(si, h_bhwc)
    return f_hat, f_hat

  # ------------------------------------------------------------------ training
  def __call__(self, f):
    """Training forward: (f_hat with straight-through gradient to f, aux).

    aux: ``vq_loss`` = mean over scales of beta * ||sg(f_hat) - f||^2 + ||f_hat - sg(f)||^2 (means over elements),
    ``hits`` (S, V) code counts per scale, ``indices`` tokens per scale.
    """
    c = self.config
    f = f.astype(jnp.float32)
    f_ng = jax.lax.stop_gradient(f)
    b, hh, ww, ch = f.shape
    hws = self._patch_hws(f)
    sn = len(hws)
    f_rest, f_hat = f_ng, jnp.zeros_like(f)
    vq_loss = 0.0
    hits, idxs = [], []
    for si, (ph, pw) in enumerate(hws):
      z = f_rest if si == sn - 1 else area_resize(f_rest, (ph, pw))
      idx = self.lookup(jax.lax.stop_gradient(z).reshape(-1, ch))
      hits.append(jnp.zeros((c.vocab_size,), jnp.float32).at[idx].add(1.0))
      idx = idx.reshape(b, ph, pw)
      h = self._scale_code_map(si, idx, (hh, ww))
      f_hat = f_hat + h
      f_rest = jax.lax.stop_gradient(f_rest - h)
      vq_loss = vq_loss + c.beta * jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - f)) \
          + jnp.mean(jnp.square(f_hat - f_ng))
      idxs.append(idx.reshape(b, ph * pw))
    vq_loss = vq_loss / sn
    f_hat_ste = jax.lax.stop_gradient(f_hat) - f_ng + f
    return f_hat_ste, dict(vq_loss=vq_loss, hits=jnp.stack(hits), indices=idxs)
