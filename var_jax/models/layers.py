"""Small building blocks shared by the models (VQVAE, BAE, VAR, ELM, BiGR).

The taming-style conv blocks of the two tokenizers (``ResnetBlock``, ``AttnBlock``, ``ConvLevel``, ``ConvMid``,
``Downsample2x``, ``Upsample2x``) are here once; the VQVAE and the BAE differ only in the layout options they set.

Initialisers reproduce PyTorch's defaults (so a model trained from scratch here starts where the reference does),
and every parameter carries logical axis names for ``var_jax.sharding``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from var_jax.ops.resize import nearest_upsample_2x

Dtype = Any
Axes = Tuple[Optional[str], ...]
ModuleDef = Any
UNUSED = 'unused'   # the collection of tensors a reference stores but never reads (kept for exact round trips)


def _fan_in(shape) -> int:
  # Dense kernels are (in, out); conv kernels are (kh, kw, in, out): fan_in is every dim but the last.
  return int(math.prod(shape[:-1])) if len(shape) > 1 else int(shape[0])


def torch_default_kernel_init(key, shape, dtype=jnp.float32):
  """``nn.Linear`` / ``nn.Conv2d`` default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(_fan_in(shape))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_default_bias_init(fan_in: int):
  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_trunc_normal(std: float, a: float = -2.0, b: float = 2.0, scale: float = 1.0):
  """``torch.nn.init.trunc_normal_(std=std)`` — note torch truncates at the *absolute* values a, b (not at ±2 std),
  which for VAR's small std is effectively a plain normal. ``scale`` multiplies the result (the reference's
  post-init rescaling of particular weights)."""
  def init(key, shape, dtype=jnp.float32):
    x = jax.random.truncated_normal(key, a / std, b / std, shape, jnp.float32) * std
    return (x * scale).astype(dtype)
  return init


def scaled_rows_init(base: Callable, row_scales: Sequence[Tuple[int, int, float]], axis: int = -1):
  """Apply ``base`` then multiply slices [start, stop) along ``axis`` by a factor (e.g. AdaLN gamma rows x1e-5)."""
  def init(key, shape, dtype=jnp.float32):
    x = base(key, shape, jnp.float32)
    ax = axis % len(shape)
    factors = jnp.ones((shape[ax],), jnp.float32)
    for start, stop, f in row_scales:
      factors = factors.at[start:stop].set(f)
    x = x * factors.reshape([-1 if i == ax else 1 for i in range(len(shape))])
    return x.astype(dtype)
  return init


def logical(init: Callable, axes: Axes):
  return nn.with_logical_partitioning(init, axes)


class Dense(nn.Module):
  """A Linear layer with the reference's parameter layout semantics: kernel (in, out), optional bias."""
  features: int
  use_bias: bool = True
  kernel_axes: Axes = (None, None)
  kernel_init: Optional[Callable] = None     # None -> torch default
  bias_init: Optional[Callable] = None       # None -> torch default (zeros where the reference re-inits)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[-1]
    kinit = self.kernel_init or torch_default_kernel_init
    kernel = self.param('kernel', logical(kinit, self.kernel_axes), (in_features, self.features), jnp.float32)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      binit = self.bias_init or torch_default_bias_init(in_features)
      bias = self.param('bias', logical(binit, self.kernel_axes[-1:]), (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class Conv(nn.Module):
  """NHWC conv with torch's padding semantics (symmetric ``padding`` or explicit ((top, bottom), (left, right)))."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: Any = None                       # None -> kernel_size // 2 on every side
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    in_ch = x.shape[-1]
    kernel = self.param('kernel', logical(torch_default_kernel_init, (None, None, 'conv_in', 'conv_out')),
                        (k, k, in_ch, self.features), jnp.float32)
    bias = self.param('bias', logical(torch_default_bias_init(k * k * in_ch), ('conv_out',)),
                      (self.features,), jnp.float32)
    pad = self.padding
    if pad is None:
      pad = ((k // 2, k // 2), (k // 2, k // 2))
    elif isinstance(pad, int):
      pad = ((pad, pad), (pad, pad))
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(self.stride, self.stride), padding=pad,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + bias.astype(self.dtype)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm(32, C, eps=1e-6, affine=True) on NHWC, statistics in float32 (two-pass variance)."""
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f'GroupNorm: {c} channels are not divisible into {self.num_groups} groups')
    scale = self.param('scale', logical(nn.initializers.ones, ('norm',)), (c,), jnp.float32)
    bias = self.param('bias', logical(nn.initializers.zeros, ('norm',)), (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    g = xf.reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
    red = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
    mean = g.mean(axis=red, keepdims=True)
    var = jnp.square(g - mean).mean(axis=red, keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = g.reshape(x.shape) * scale + bias
    return y.astype(self.dtype)


def layer_norm_no_affine(x, eps: float):
  """torch LayerNorm(elementwise_affine=False): two-pass variance, computed in float32."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def l2_normalize(x, eps: float = 1e-12):
  """``F.normalize(x, dim=-1)`` = x / max(||x||, eps), in float32, with a finite gradient at x = 0 (torch's norm has
  a zero subgradient there; ELM's class slot has zero q and k)."""
  xf = x.astype(jnp.float32)
  n = jnp.sqrt(jnp.maximum(jnp.sum(xf * xf, axis=-1, keepdims=True), eps * eps))
  return (xf / n).astype(x.dtype)


def drop_path(module: nn.Module, x, rate: float, deterministic: bool):
  """Stochastic depth per sample (timm ``drop_path``, scale_by_keep); draws from ``module``'s rng stream 'dropout'."""
  if deterministic or rate <= 0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


def drop_labels(labels, rate: float, null_class: int, rng=None, force_drop_ids=None):
  """Classifier-free-guidance label dropout: dropped labels become ``null_class``.

  ``force_drop_ids`` (B,) (1 = drop) wins; else with ``rng`` each label drops with probability ``rate``
  (uniform < rate); else nothing is dropped. -> int32 labels.
  """
  labels = jnp.asarray(labels, jnp.int32)
  if force_drop_ids is not None:
    drop = jnp.asarray(force_drop_ids) == 1
  elif rng is not None and rate > 0:
    drop = jax.random.uniform(rng, labels.shape) < rate
  else:
    return labels
  return jnp.where(drop, null_class, labels)


# ----------------------------------------------------------------------------- taming conv blocks
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
    h = Conv(self.out_channels, 3, name='conv1', dtype=self.dtype)(nn.silu(GroupNorm(name='norm1', dtype=self.dtype)(x)))
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


class ConvLevel(nn.Module):
  """One resolution level: ``num_blocks`` res blocks ``block_{j}`` (each followed by ``attn_{j}`` when
  ``with_attn``) and an optional resampler (``'down'``, ``'up'`` or ``''``). ``block`` / ``attn`` are the block
  classes (a tokenizer's layout)."""
  out_channels: int
  num_blocks: int
  dropout: float
  with_attn: bool
  resample: str
  block: ModuleDef = ResnetBlock
  attn: ModuleDef = AttnBlock
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, train: bool = False):
    for j in range(self.num_blocks):
      h = self.block(self.out_channels, self.dropout, name=f'block_{j}', dtype=self.dtype)(h, train)
      if self.with_attn:
        h = self.attn(name=f'attn_{j}', dtype=self.dtype)(h)
    if self.resample == 'down':
      h = Downsample2x(name='downsample', dtype=self.dtype)(h)
    elif self.resample == 'up':
      h = Upsample2x(name='upsample', dtype=self.dtype)(h)
    return h


class ConvMid(nn.Module):
  """The middle of a taming encoder/decoder: ``block_1``, [``attn_1``], ``block_2`` at the input's width."""
  dropout: float
  with_attn: bool
  block: ModuleDef = ResnetBlock
  attn: ModuleDef = AttnBlock
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, train: bool = False):
    c = h.shape[-1]
    h = self.block(c, self.dropout, name='block_1', dtype=self.dtype)(h, train)
    if self.with_attn:
      h = self.attn(name='attn_1', dtype=self.dtype)(h)
    return self.block(c, self.dropout, name='block_2', dtype=self.dtype)(h, train)
