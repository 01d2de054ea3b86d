"""The taming-transformers conv encoder/decoder blocks of both tokenizers (the VQVAE and the BAE), NHWC.

One implementation: ``ResnetBlock``, ``AttnBlock``, ``Downsample2x`` / ``Upsample2x``, the reference's container
modules (a resolution level, the middle: ``ConvSequence``) and the whole ``ConvEncoder`` / ``ConvDecoder``. The two tokenizers differ
only in options: the res block's shortcut name (``nin_shortcut`` / ``conv_out``) and whether an unused one is kept,
fused or separate q/k/v convs, which levels have attention, whether an activation precedes the last conv, and the
BAE generator's input GroupNorm. Submodule names follow the reference module trees (``down_{i}/block_{j}`` for
``down.{i}.block.{j}``).
"""
from __future__ import annotations

from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from var_jax.models.layers import Conv, GroupNorm, logical, torch_default_bias_init, torch_default_kernel_init
from var_jax.ops.resize import nearest_upsample_2x

Dtype = Any
ModuleDef = Any
UNUSED = 'unused'   # the collection of tensors a reference stores but never reads (kept for exact round trips)

class UnusedConv(nn.Module):
  """Declares (at init only) a conv's kernel and bias in the ``'unused'`` collection; computes nothing."""
  features: int
  kernel_size: int

  @nn.compact
  def __call__(self, in_features: int):
    if not self.is_initializing():
      return
    k = self.kernel_size
    for name, shape, init, axes in (
        ('kernel', (k, k, in_features, self.features), torch_default_kernel_init, (None, None, 'conv_in', 'conv_out')),
        ('bias', (self.features,), torch_default_bias_init(k * k * in_features), ('conv_out',))):
      boxed = logical(init, axes)
      key = self.make_rng('params')
      self.variable(UNUSED, name, lambda b=boxed, kk=key, s=shape: b(kk, s, jnp.float32))


class ResnetBlock(nn.Module):
  """taming ``ResnetBlock``: GN-SiLU-conv3x3-GN-SiLU-[dropout]-conv3x3 plus the input, which goes through a 1x1 conv
  (named ``shortcut``) when the widths differ. With ``unused_shortcut`` that 1x1 conv is also declared at equal widths,
  in the ``'unused'`` collection (a reference that builds it and never uses it)."""
  out_channels: int
  dropout: float = 0.0
  shortcut: str = 'nin_shortcut'
  unused_shortcut: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.silu(GroupNorm(name='norm1', dtype=self.dtype)(x))
    h = Conv(self.out_channels, 3, name='conv1', dtype=self.dtype)(h)
    h = nn.silu(GroupNorm(name='norm2', dtype=self.dtype)(h))
    if self.dropout > 1e-6:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = Conv(self.out_channels, 3, name='conv2', dtype=self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = Conv(self.out_channels, 1, padding=0, name=self.shortcut, dtype=self.dtype)(x)
    elif self.unused_shortcut:
      UnusedConv(self.out_channels, 1, name=self.shortcut)(x.shape[-1])
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with a residual: GN, q/k/v 1x1 convs, scale c^-0.5, 1x1 ``proj_out``.

  ``separate_qkv=False`` (the VQVAE): one fused ``qkv`` conv and ``dot_product_attention``; ``True`` (the BAE): convs
  ``q``, ``k``, ``v`` and the reference's explicit float32 softmax.
  """
  separate_qkv: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    hn = GroupNorm(name='norm', dtype=self.dtype)(x)
    if self.separate_qkv:
      q, k, v = (Conv(c, 1, padding=0, name=n, dtype=self.dtype)(hn).reshape(b, hh * ww, c) for n in ('q', 'k', 'v'))
      w = jax.nn.softmax(jnp.einsum('bic,bjc->bij', q, k).astype(jnp.float32) * (c ** -0.5), axis=-1)
      o = jnp.einsum('bij,bjc->bic', w.astype(self.dtype), v)
    else:
      qkv = Conv(3 * c, 1, padding=0, name='qkv', dtype=self.dtype)(hn)
      q, k, v = jnp.split(qkv.reshape(b, hh * ww, 1, 3 * c), 3, axis=-1)
      o = jax.nn.dot_product_attention(q, k, v, scale=c ** -0.5)
    return x + Conv(c, 1, padding=0, name='proj_out', dtype=self.dtype)(o.reshape(b, hh, ww, c))


class Downsample2x(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # pad (right, bottom) by one then a stride-2 VALID conv, as the reference
    return Conv(x.shape[-1], 3, stride=2, padding=((0, 1), (0, 1)), name='conv', dtype=self.dtype)(x)


class Upsample2x(nn.Module):
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return Conv(x.shape[-1], 3, name='conv', dtype=self.dtype)(nearest_upsample_2x(x))


class ConvSequence(nn.Module):
  """A reference container module (a resolution level, the middle): the named blocks ``layers`` in order, each
  (kind, name) with kind 'res' (a ``block`` to ``out_channels``), 'attn' (an ``attn``), 'down' or 'up' (a
  resampler). ``block`` / ``attn`` are the block classes (a tokenizer's layout)."""
  out_channels: int
  layers: Tuple[Tuple[str, str], ...]
  dropout: float = 0.0
  block: ModuleDef = ResnetBlock
  attn: ModuleDef = AttnBlock
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, train: bool = False):
    for kind, name in self.layers:
      if kind == 'res':
        h = self.block(self.out_channels, self.dropout, name=name, dtype=self.dtype)(h, train)
      elif kind == 'attn':
        h = self.attn(name=name, dtype=self.dtype)(h)
      else:
        h = {'down': Downsample2x, 'up': Upsample2x}[kind](name=name, dtype=self.dtype)(h)
    return h


class _ConvStack(nn.Module):
  """What ``ConvEncoder`` and ``ConvDecoder`` share: the options, a level, the middle and the output head."""
  ch: int
  ch_mult: Tuple[int, ...]
  num_blocks: int
  out_channels: int
  attn_levels: Tuple[bool, ...]
  mid_attn: bool = True
  dropout: float = 0.0
  out_silu: bool = True
  block: ModuleDef = ResnetBlock
  attn: ModuleDef = AttnBlock
  dtype: Dtype = jnp.float32

  def _level(self, h, i: int, kind: str, last: bool, train: bool):
    """Level ``{kind}_{i}`` (kind 'down' or 'up'): ``block_{j}`` [``attn_{j}``] for each j, then ``{kind}sample``
    unless it is the ``last`` level on the way."""
    layers = []
    for j in range(self.num_blocks):
      layers.append(('res', f'block_{j}'))
      if self.attn_levels[i]:
        layers.append(('attn', f'attn_{j}'))
    if not last:
      layers.append((kind, f'{kind}sample'))
    return self._sequence(f'{kind}_{i}', self.ch * self.ch_mult[i], layers, h, train)

  def _mid(self, h, train: bool):
    """``mid``: ``block_1``, [``attn_1``], ``block_2`` at the input's width."""
    layers = [('res', 'block_1'), ('attn', 'attn_1'), ('res', 'block_2')]
    if not self.mid_attn:
      del layers[1]
    return self._sequence('mid', h.shape[-1], layers, h, train)

  def _sequence(self, name: str, out_channels: int, layers, h, train: bool):
    return ConvSequence(out_channels, tuple(layers), self.dropout, self.block, self.attn, name=name,
                        dtype=self.dtype)(h, train)

  def _out(self, h):
    """``norm_out`` [SiLU] then the 3x3 ``conv_out`` -> (output, the conv's input)."""
    h = GroupNorm(name='norm_out', dtype=self.dtype)(h)
    if self.out_silu:
      h = nn.silu(h)
    return Conv(self.out_channels, 3, name='conv_out', dtype=self.dtype)(h), h


class ConvEncoder(_ConvStack):
  """Image -> features: ``conv_in``, levels ``down_{i}`` (``num_blocks`` res blocks each, attention where
  ``attn_levels[i]``, a downsample after every level but the last), ``mid``, ``norm_out`` [SiLU], ``conv_out``."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    n = len(self.ch_mult)
    h = Conv(self.ch, 3, name='conv_in', dtype=self.dtype)(x)
    for i in range(n):
      h = self._level(h, i, 'down', i == n - 1, train)
    return self._out(self._mid(h, train))[0]


class ConvDecoder(_ConvStack):
  """Features -> image: [``norm_in``], ``conv_in``, ``mid``, levels ``up_{i}`` from the lowest resolution
  (``num_blocks`` res blocks each, attention where ``attn_levels[i]``, an upsample after every level but level 0),
  ``norm_out`` [SiLU], ``conv_out``. ``return_pre_out`` also returns the last conv's input (VQGAN's adaptive GAN
  weight)."""
  norm_in: bool = False

  @nn.compact
  def __call__(self, z, train: bool = False, return_pre_out: bool = False):
    h = z.astype(self.dtype)
    if self.norm_in:
      h = GroupNorm(name='norm_in', dtype=self.dtype)(h)
    h = Conv(self.ch * self.ch_mult[-1], 3, name='conv_in', dtype=self.dtype)(h)
    h = self._mid(h, train)
    for i in reversed(range(len(self.ch_mult))):
      h = self._level(h, i, 'up', i == 0, train)
    out, h = self._out(h)
    return (out, h) if return_pre_out else out
