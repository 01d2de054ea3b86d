"""The binary autoencoder (BAE) of ELM and BiGR, in Flax Linen, NHWC.

The tokenizer of "Elucidating the design space of language models for image generation" (ELM,
Pepper-lll/LMforImageGeneration, ``bae/binaryae.py``) and of BiGR (haoosz/BiGR, the same network). A taming-style
conv encoder maps an image in [0, 1] to ``emb_dim`` features on a grid downsampled ``2**(levels-1)`` times; a 1x1
conv and a sigmoid give the probability of each of K bits; bits are drawn by the threshold ``p > 0.5`` or by
Bernoulli sampling ``u < p``; the bits select a sum of K learned ``emb_dim`` vectors (``quant = sum_k bit_k e_k``,
0/1 bits, no +-1) that the generator decodes back to an image in [0, 1] (not clamped).

Differences from the VQVAE (both are built from the taming blocks of ``var_jax.models.layers``) that matter for
parity: the encoder and the generator end with GroupNorm then a conv, *without* an activation; attention uses
separate q/k/v 1x1 convs; the res blocks' shortcut conv is ``conv_out``;
attention follows every res block of each level whose resolution is in ``attn_resolutions`` (the encoder counts
resolutions down from ``resolution``, the generator up from ``resolution // 2**(levels-1)``); ``norm_first`` adds a
GroupNorm on the embedding before the generator's first conv; the generator has ``int(res_blocks * gen_mul)`` blocks
per level.

Tensors the reference holds but never uses (the 1x1 ``conv_out`` of every res block whose input and output widths
are equal, and the generator's ``logsigma`` ELBO head) are created at ``init`` in a separate collection,
``'unused'``, so that a checkpoint round trip is exact while optimisers (which see ``'params'`` only) leave them
alone, as torch does (their grads are ``None``). ``apply`` never needs that collection.

Usage::

  model = BinaryAutoEncoder(cfg)
  variables = model.init(key, images, train=False)            # images (B, H, W, 3) in [0, 1]
  bits = model.apply(variables, images, method='bits')       # (B, h, w, K) uint8, threshold
  bits = model.apply(variables, images, 'bernoulli', key, method='bits')
  recon = model.apply(variables, bits, method='decode')       # (B, H, W, 3)
  recon, aux = model.apply(variables, images, train=True, rng=key)   # training forward (straight-through)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from var_jax.losses.bae import codebook_loss_from_probs
from var_jax.models import taming
from var_jax.models.layers import ConfigModule, Conv, logical
from var_jax.models.quantizer import codebook_init
from var_jax.models.taming import UNUSED, UnusedConv  # UNUSED: re-exported (the collection name)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class BAEConfig:
  """Hyperparameters of the reference ``BinaryAutoEncoder(H)`` (``H`` fields named as there).

  Defaults are the released 256px tokenizers (the reference's ``custom`` dataset defaults with ``--norm_first``);
  set ``codebook_size`` to the release's K (ELM 16/20/24, BiGR 24/32). The network itself accepts any image size:
  ``resolution`` (the reference's ``img_size``) only decides, with ``attn_resolutions``, which levels have attention.
  """
  in_channels: int = 3                      # n_channels
  nf: int = 128
  ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
  res_blocks: int = 2
  attn_resolutions: Tuple[int, ...] = (16,)
  resolution: int = 256                     # img_size
  codebook_size: int = 16                   # K, the number of bits per latent cell
  emb_dim: int = 256
  norm_first: bool = True
  gen_mul: float = 1.0
  use_tanh: bool = False

  def __post_init__(self):
    object.__setattr__(self, 'ch_mult', tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, 'attn_resolutions', tuple(int(r) for r in self.attn_resolutions))
    if self.use_tanh:
      raise ValueError('BAEConfig(use_tanh=True): the +-1 (tanh) BAE is not supported; no released BAE uses it '
                       '(every ELM/BiGR release has use_tanh=False, 0/1 bits)')
    if not self.ch_mult:
      raise ValueError('ch_mult must have at least one level')
    if self.res_blocks < 0 or self.decoder_res_blocks < 0:
      raise ValueError(f'res_blocks={self.res_blocks}, gen_mul={self.gen_mul}: block counts must be >= 0')
    for m in self.ch_mult:
      if (self.nf * m) % 32:
        raise ValueError(f'nf*ch_mult must be divisible by 32 (GroupNorm groups): nf={self.nf} ch_mult={self.ch_mult}')
    if self.norm_first and self.emb_dim % 32:
      raise ValueError(f'norm_first puts a GroupNorm(32) on emb_dim={self.emb_dim}: it must be divisible by 32')

  @property
  def num_levels(self) -> int:
    return len(self.ch_mult)

  @property
  def downsample(self) -> int:
    return 2 ** (self.num_levels - 1)

  @property
  def latent_size(self) -> int:
    return self.resolution // self.downsample

  @property
  def decoder_res_blocks(self) -> int:
    """Res blocks per generator level: ``int(res_blocks * gen_mul)``, as the reference."""
    return int(self.res_blocks * self.gen_mul)

  @property
  def encoder_attn_levels(self) -> Tuple[bool, ...]:
    """Per encoder level i: attention after each res block (resolution ``resolution // 2**i``)."""
    out, res = [], self.resolution
    for _ in range(self.num_levels):
      out.append(res in self.attn_resolutions)
      res //= 2
    return tuple(out)

  @property
  def generator_attn_levels(self) -> Tuple[bool, ...]:
    """Per level i (indexed as the encoder's): the generator counts up from ``resolution // 2**(levels-1)``."""
    n = self.num_levels
    return tuple((self.resolution // 2 ** (n - 1)) * 2 ** (n - 1 - i) in self.attn_resolutions for i in range(n))

  def check_image_size(self, size: int):
    """Images of ``size`` px fit: ``resolution`` (which places the attention levels) equals it and the
    downsampling divides it."""
    if self.resolution != size:
      raise ValueError(f'config.data.image_size={size} but config.bae.resolution={self.resolution} (the BAE '
                       f'places attention by resolution: set both)')
    if size % self.downsample:
      raise ValueError(f'config.data.image_size={size} is not divisible by the BAE downsampling '
                       f'{self.downsample} (ch_mult {self.ch_mult})')

class ResBlock(taming.ResnetBlock):
  """The BAE's res block: the shortcut conv is ``conv_out``, declared (in ``'unused'``) even at equal widths."""
  shortcut: str = 'conv_out'
  unused_shortcut: bool = True


class AttnBlock(taming.AttnBlock):
  """The BAE's attention: separate 1x1 q/k/v convs, float32 softmax."""
  separate_qkv: bool = True


_LAYOUT = dict(out_silu=False, block=ResBlock, attn=AttnBlock)   # no activation before the last conv


class BAEGenerator(taming.ConvDecoder):
  """Embedded bits (B, h, w, emb_dim) -> image (B, h*f, w*f, C) float32 (``norm_in``: the reference's
  ``norm_first``), plus the reference's unused ELBO head."""

  @nn.compact
  def __call__(self, z):
    out, h = super().__call__(z, return_pre_out=True)
    width = h.shape[-1]
    # the reference's ELBO head (conv3x3 - ReLU - conv1x1), built but never used by encode/decode/forward
    UnusedConv(width, 3, name='logsigma_0')(width)
    UnusedConv(self.out_channels, 1, name='logsigma_2')(width)
    return out.astype(jnp.float32)


class BinaryQuantizer(ConfigModule):
  """1x1 conv to K logits (``proj``) and the K x emb_dim embedding table (``embed``)."""
  config: BAEConfig

  def setup(self):
    c = self.config
    self.proj = Conv(c.codebook_size, 1, padding=0, dtype=self.dtype)
    self.embed = self.param('embed', logical(codebook_init, (None, 'latent')), (c.codebook_size, c.emb_dim),
                            jnp.float32)

  def logits(self, h):
    return self.proj(h).astype(jnp.float32)

  def embed_bits(self, bits):
    """(..., K) 0/1 bits (any dtype; floats carry straight-through gradients) -> (..., emb_dim) sum of rows."""
    return jnp.einsum('...k,kd->...d', bits.astype(jnp.float32), self.embed)


def _sample_bits(probs, mode: str, rng, uniforms):
  if mode == 'threshold':
    return (probs > 0.5).astype(jnp.uint8)
  if mode == 'bernoulli':
    if uniforms is None:
      if rng is None:
        raise ValueError("mode='bernoulli' needs rng (a jax PRNG key) or uniforms (the same shape as the bits)")
      uniforms = jax.random.uniform(rng, probs.shape, jnp.float32)
    elif tuple(uniforms.shape) != tuple(probs.shape):
      raise ValueError(f'uniforms have shape {tuple(uniforms.shape)}, the bits {tuple(probs.shape)}')
    return (uniforms < probs).astype(jnp.uint8)
  raise ValueError(f"mode must be 'threshold' or 'bernoulli', got {mode!r}")


class BinaryAutoEncoder(ConfigModule):
  """The reference ``BinaryAutoEncoder`` (encoder, ``quantize``, generator). NHWC, images in [0, 1].

  Bits are (B, h, w, K) uint8, channel k = the reference's bit k (its (B, K, h, w) layout transposed).
  """
  config: BAEConfig

  def setup(self):
    c = self.config
    # image (B, H, W, C) -> features (B, H/f, W/f, emb_dim), f = 2**(levels-1); and back
    self.encoder = taming.ConvEncoder(c.nf, c.ch_mult, c.res_blocks, c.emb_dim, c.encoder_attn_levels, **_LAYOUT,
                                      dtype=self.dtype)
    self.quantize = BinaryQuantizer(c, dtype=self.dtype)
    self.generator = BAEGenerator(c.nf, c.ch_mult, c.decoder_res_blocks, c.in_channels, c.generator_attn_levels,
                                  norm_in=c.norm_first, **_LAYOUT, dtype=self.dtype)

  # ------------------------------------------------------------------ encoding
  def encode_logits(self, images) -> Tuple[jax.Array, jax.Array]:
    """images (B, H, W, C) -> (encoder_out (B, h, w, emb_dim), proj_logits (B, h, w, K)), both float32."""
    h = self.encoder(images)
    return h.astype(jnp.float32), self.quantize.logits(h)

  def probs(self, images) -> jax.Array:
    """Probability of each bit, ``sigmoid(proj_logits)``: (B, h, w, K) float32."""
    return jax.nn.sigmoid(self.encode_logits(images)[1])

  def bits(self, images, mode: str = 'threshold', rng: Optional[jax.Array] = None,
           uniforms: Optional[jax.Array] = None) -> jax.Array:
    """(B, h, w, K) uint8 bits: ``p > 0.5`` ('threshold') or ``u < p`` ('bernoulli', u from ``rng`` or given).

    Training of the ELM/BiGR generators tokenises with 'bernoulli' (the reference ``encode()`` samples).
    """
    return _sample_bits(self.probs(images), mode, rng, uniforms)

  def encode(self, images, mode: str = 'bernoulli', rng: Optional[jax.Array] = None,
             uniforms: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    """The reference ``encode()``: (straight-through quant (B, h, w, emb_dim), bits (B, h, w, K) uint8)."""
    probs = self.probs(images)
    bits = _sample_bits(probs, mode, rng, uniforms)
    return self.quantize.embed_bits(_straight_through(bits, probs)), bits

  # ------------------------------------------------------------------ decoding
  def embed_bits(self, bits) -> jax.Array:
    """(B, h, w, K) bits -> (B, h, w, emb_dim) ``sum_k bit_k * embed[k]``."""
    return self.quantize.embed_bits(bits)

  def decode_quant(self, quant) -> jax.Array:
    """The generator on embedded bits (the reference ``decode(x, is_bin=False)``)."""
    return self.generator(quant)

  def decode(self, bits) -> jax.Array:
    """(B, h, w, K) bits -> images (B, H, W, C) float32 (not clamped; the reference saves ``clamp(255 x)``)."""
    return self.generator(self.quantize.embed_bits(bits))

  # ------------------------------------------------------------------ training forward
  def __call__(self, images, train: bool = True, rng: Optional[jax.Array] = None,
               uniforms: Optional[jax.Array] = None, mode: Optional[str] = None
               ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """The reference ``forward(x)``: (reconstruction (B, H, W, C), aux).

    Bits are Bernoulli samples when ``train`` (the reference's default ``deterministic=False``; pass ``rng`` or
    ``uniforms``) and thresholded otherwise; ``mode`` overrides that choice. The generator gets the straight-through
    ``stop_gradient(bits) + p - stop_gradient(p)`` (value: the bits up to float rounding; gradient: d/dp), so the
    reconstruction loss trains the encoder and ``proj`` through the probabilities.
    aux: ``codebook_loss`` (scalar, ``var_jax.losses.bae.codebook_loss_from_probs``), ``bits`` (uint8), ``probs``, ``logits``.
    """
    if mode is None:
      mode = 'bernoulli' if train else 'threshold'
    h, logits = self.encode_logits(images)
    probs = jax.nn.sigmoid(logits)
    bits = _sample_bits(probs, mode, rng, uniforms)
    quant = self.quantize.embed_bits(_straight_through(bits, probs))
    recon = self.generator(quant)
    aux = dict(codebook_loss=codebook_loss_from_probs(probs), bits=bits, probs=probs, logits=logits)
    return recon, aux


def _straight_through(bits, probs):
  # the reference's ``z_b.detach() + z - z.detach()`` with z the probabilities, evaluated in the same order
  return (jax.lax.stop_gradient(bits.astype(jnp.float32)) + probs) - jax.lax.stop_gradient(probs)
