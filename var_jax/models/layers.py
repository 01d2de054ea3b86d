"""Small building blocks shared by the models (VQVAE, BAE, VAR, ELM, BiGR).

Initialisers reproduce PyTorch's defaults (so a model trained from scratch here starts where the reference does),
and every parameter carries logical axis names for ``var_jax.sharding``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class ConfigModule(nn.Module):
  """A module built from one config dataclass (``config``), computing in ``dtype`` (params stay float32)."""
  config: Any
  dtype: Dtype = jnp.float32
Axes = Tuple[Optional[str], ...]


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


# activations: (batch, features) rows and (batch, length, features) sequences
BATCH_EMBED = ('activation_batch', 'activation_embed')
BATCH_LENGTH_EMBED = ('activation_batch', 'activation_length', 'activation_embed')


class Dense(nn.Module):
  """A Linear layer with the reference's parameter layout semantics: kernel (in, out), optional bias.

  ``out_axes``: logical names the output is constrained to (e.g. ``BATCH_EMBED``): for a kernel whose output axis
  is sharded ('embed' -> fsdp) on inputs whose rows are sharded over the same mesh axis, without it the partitioner
  may shard the output like the kernel and gather every row of the global batch instead of the small kernel."""
  features: int
  use_bias: bool = True
  kernel_axes: Axes = (None, None)
  kernel_init: Optional[Callable] = None     # None -> torch default
  bias_init: Optional[Callable] = None       # None -> torch default (zeros where the reference re-inits)
  dtype: Dtype = jnp.float32
  out_axes: Optional[Axes] = None

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
    return y if self.out_axes is None else nn.with_logical_constraint(y, self.out_axes)


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


def lookup(table, ids, axes: Axes):
  """``table[ids]`` (rows of an embedding table) laid out like the activations: ``axes`` names the result's axes
  (batch first). Without it the partitioner may keep the table's sharding (its embedding axis over fsdp) for the
  result and gather the global batch onto every device instead of the small table (seen in the AOT HLO of ELM-2B:
  a 446 MiB all-gather of the (256, 255, 2 x 1792) token embeddings per step, repeated in the backward pass)."""
  return nn.with_logical_constraint(jnp.take(table, ids, axis=0), axes)


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

