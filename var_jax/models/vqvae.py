"""The multi-scale VQVAE (stage 1): taming-style conv encoder/decoder around the multi-scale quantizer. NHWC.

Mirrors the reference ``models/vqvae.py`` + ``models/basic_vae.py``; submodule names follow the reference's
module tree (``down_{i}/block_{j}`` for ``down.{i}.block.{j}``) so that ``var_jax.interop`` maps names by rule.
"""
from __future__ import annotations

from typing import Any, List, Sequence

import jax
import jax.numpy as jnp

from var_jax.models.var_config import VQVAEConfig
from var_jax.models.layers import ConfigModule, Conv
from var_jax.models.quantizer import MultiScaleQuantizer
from var_jax.models.taming import ConvDecoder, ConvEncoder

Dtype = Any


class VQVAE(ConfigModule):
  """Encoder -> quant_conv -> multi-scale quantizer -> post_quant_conv -> decoder.

  Images are NHWC float in [-1, 1]; token maps are lists of int32 (B, pn*pn), row-major, coarsest first.
  Call the methods through ``VQVAE(cfg).apply(variables, x, method=VQVAE.img_to_idx)`` etc.
  """
  config: VQVAEConfig

  def setup(self):
    c = self.config
    attn = tuple(i == len(c.ch_mult) - 1 and c.using_sa for i in range(len(c.ch_mult)))   # the last level only
    self.encoder = ConvEncoder(c.ch, c.ch_mult, c.num_res_blocks, c.z_channels, attn, c.using_mid_sa, c.dropout,
                               dtype=self.dtype)
    self.decoder = ConvDecoder(c.ch, c.ch_mult, c.num_res_blocks + 1, c.in_channels, attn, c.using_mid_sa, c.dropout,
                               dtype=self.dtype)
    self.quantize = MultiScaleQuantizer(c)
    self.quant_conv = Conv(c.z_channels, c.quant_conv_ks, dtype=self.dtype)
    self.post_quant_conv = Conv(c.z_channels, c.quant_conv_ks, dtype=self.dtype)

  # ---- training forward (tokenizer training) ----
  def __call__(self, x, train: bool = True):
    """Returns (reconstruction, aux) where aux has ``vq_loss``, ``hits`` (S, V) code counts and ``indices``.

    Straight-through estimator: gradients reach the encoder through f_hat, the codebook/phis through the VQ loss.
    The reconstruction is not clamped here (the loss sees the raw decoder output, as the reference trainer's).
    """
    f = self.encode_features(x, train)
    f_hat, aux = self.quantize(f)
    rec, pre_out = self.decoder(self.post_quant_conv(f_hat), train, return_pre_out=True)
    aux['pre_out'] = pre_out     # the last decoder conv's input (VQGAN's adaptive weight needs it)
    aux['features'] = f          # encoder features (dead-code restart draws from them)
    return rec.astype(jnp.float32), aux

  # ---- inference ----
  def encode_features(self, x, train: bool = False):
    return self.quant_conv(self.encoder(x, train)).astype(jnp.float32)

  def img_to_idx(self, x) -> List[jax.Array]:
    return self.quantize.f_to_idx_and_fhat(self.encode_features(x))[0]

  def img_to_fhats(self, x) -> List[jax.Array]:
    return self.quantize.f_to_idx_and_fhat(self.encode_features(x))[1]

  def fhat_to_img(self, f_hat):
    """Decoded image, clamped to [-1, 1]."""
    return jnp.clip(self.decoder(self.post_quant_conv(f_hat.astype(self.dtype))).astype(jnp.float32), -1, 1)

  def idx_to_img(self, idx_list: Sequence[jax.Array]):
    return self.fhat_to_img(self.quantize.idx_to_fhat(idx_list, last_one=True))

  def img_to_reconstructed_img(self, x):
    """The reference's ``img_to_reconstructed_img(x, last_one=True)``."""
    return self.fhat_to_img(self.img_to_fhats(x)[-1])

  def idx_to_var_input(self, idx_list: Sequence[jax.Array]):
    return self.quantize.idx_to_var_input(idx_list)

  def init_all(self, x):
    """Touch every submodule (used by ``init``)."""
    rec, aux = self(x, train=False)
    self.quantize.init_phis(aux['features'])
    return rec
