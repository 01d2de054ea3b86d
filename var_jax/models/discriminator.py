"""The PatchGAN discriminator of VQGAN tokenizer training (taming-transformers ``NLayerDiscriminator``), NHWC.

Architecture (``n_layers = 3``, ``ndf = 64`` is taming's default; every conv is 4x4 with padding 1)::

  conv_0  in -> ndf,           stride 2, bias                  LeakyReLU(0.2)
  conv_n  -> ndf*min(2^n, 8),   stride 2, norm_n  (n = 1 .. n_layers-1)  LeakyReLU(0.2)
  conv_N  -> ndf*min(2^N, 8),   stride 1, norm_N  (N = n_layers)          LeakyReLU(0.2)
  conv_N+1 -> 1,                stride 1, bias                             (patch logits)

so a 256px image gives (B, 30, 30, 1) logits, 64px (B, 6, 6, 1), 32px (B, 2, 2, 1). As in taming, the convs
followed by a norm carry a bias unless the norm is BatchNorm (``use_bias = norm_layer != BatchNorm2d``).

Norms (``DiscriminatorConfig.norm``): ``'batch'`` (taming's default, ``use_actnorm=False``) is ``torch.nn.BatchNorm2d``
exactly — momentum 0.1, eps 1e-5, statistics over (B, H, W) in float32, running variance updated with the *unbiased*
batch variance as torch does — with its running statistics in the ``batch_stats`` collection (``mean``, ``var``);
``'group'`` is GroupNorm(32) (``layers.GroupNorm``, eps 1e-6 as the VQVAE's), ``'none'`` no norm. taming's ActNorm
(``use_actnorm=True``) is not provided.

Use ``model.apply(variables, x, train)``: ``train=True`` normalises with the batch statistics and updates
``batch_stats`` (pass ``mutable=['batch_stats']``), ``train=False`` uses the running statistics. taming calls the
discriminator in train mode throughout training, once on the real and once on the fake batch (separate statistics
and two running-stat updates). Under ``jit`` over a sharded batch the statistics are those of the global batch
(torch DDP without SyncBatchNorm uses each device's local batch).

Init is taming's ``weights_init``: conv kernels N(0, 0.02), BatchNorm scale N(1, 0.02) and bias 0; conv biases keep
torch's default U(+-1/sqrt(fan_in)) (``weights_init`` does not touch them). Every parameter carries logical axis
names for ``var_jax.sharding``.

``var_jax.interop.gan`` maps a taming ``NLayerDiscriminator.state_dict()`` (``main.{i}.weight`` ...) to and from
our variables.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from var_jax.models.layers import ConfigModule, GroupNorm, logical, torch_default_bias_init

Dtype = Any
NORMS = ('batch', 'group', 'none')


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
  """taming ``NLayerDiscriminator(input_nc=in_channels, ndf, n_layers)``; ``norm='batch'`` is ``use_actnorm=False``."""
  ndf: int = 64
  n_layers: int = 3
  norm: str = 'batch'                       # 'batch' | 'group' | 'none'
  in_channels: int = 3

  def __post_init__(self):
    if self.norm not in NORMS:
      raise ValueError(f'DiscriminatorConfig.norm must be one of {NORMS}, got {self.norm!r}')
    if self.n_layers < 0 or self.ndf < 1 or self.in_channels < 1:
      raise ValueError(f'DiscriminatorConfig: need n_layers >= 0, ndf >= 1, in_channels >= 1, got {self}')
    if self.norm == 'group':
      bad = [c for c, _, _, has_norm in self.layers() if has_norm and c % 32]
      if bad:
        raise ValueError(f'DiscriminatorConfig: norm=\'group\' needs channels divisible by 32 (GroupNorm(32)); '
                         f'ndf={self.ndf} gives {bad}')

  @property
  def conv_bias(self) -> bool:
    """Whether the convs followed by a norm have a bias (taming: all but BatchNorm's)."""
    return self.norm != 'batch'

  def layers(self) -> List[Tuple[int, int, int, bool]]:
    """(out_channels, stride, bias, followed by norm + LeakyReLU) per conv, in order."""
    out = [(self.ndf, 2, True, False)]
    for n in range(1, self.n_layers):
      out.append((self.ndf * min(2 ** n, 8), 2, self.conv_bias, True))
    out.append((self.ndf * min(2 ** self.n_layers, 8), 1, self.conv_bias, True))
    out.append((1, 1, True, False))
    return out

  def output_size(self, size: int) -> int:
    """Spatial size of the logits for a ``size`` x ``size`` input."""
    for _, stride, _, _ in self.layers():
      size = (size + 2 - 4) // stride + 1
    return size


def normal_init(mean: float, std: float):
  def init(key, shape, dtype=jnp.float32):
    return (mean + std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
  return init


class PatchConv(nn.Module):
  """4x4 NHWC conv, torch padding 1, taming init (kernel N(0, 0.02), bias torch default); optional bias."""
  features: int
  stride: int
  use_bias: bool = True
  kernel_size: int = 4
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, in_ch = self.kernel_size, x.shape[-1]
    kernel = self.param('kernel', logical(normal_init(0.0, 0.02), (None, None, 'conv_in', 'conv_out')),
                        (k, k, in_ch, self.features), jnp.float32)
    p = self.padding
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(self.stride, self.stride),
        padding=((p, p), (p, p)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      bias = self.param('bias', logical(torch_default_bias_init(k * k * in_ch), ('conv_out',)),
                        (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class BatchNorm(nn.Module):
  """``torch.nn.BatchNorm2d(C)`` on NHWC (taming init: scale N(1, 0.02), bias 0).

  ``momentum`` is torch's (new = (1 - m) * running + m * batch; flax's ``momentum`` would be 1 - m). Statistics in
  float32 with a two-pass variance; the running variance takes the unbiased batch variance, as torch's. Running
  stats are not updated while initialising (so ``init`` in train mode still gives mean 0, var 1).
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    scale = self.param('scale', logical(normal_init(1.0, 0.02), ('norm',)), (c,), jnp.float32)
    bias = self.param('bias', logical(nn.initializers.zeros, ('norm',)), (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)
    if train:
      n = math.prod(x.shape[:-1])
      if n < 2:
        raise ValueError(f'BatchNorm in train mode needs more than one value per channel, got input {x.shape}')
      red = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axis=red)
      var = jnp.mean(jnp.square(xf - mean), axis=red)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * var * (n / (n - 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype)


class NLayerDiscriminator(ConfigModule):
  """PatchGAN discriminator: images (B, H, W, C) in [-1, 1] -> float32 patch logits (B, h, w, 1).

  Parameters: ``conv_{l}`` (``kernel``, maybe ``bias``) for l = 0 .. n_layers + 1 and ``norm_{l}`` for
  l = 1 .. n_layers (BatchNorm: ``scale``/``bias`` params + ``batch_stats`` ``mean``/``var``; GroupNorm:
  ``scale``/``bias``). ``dtype`` is the compute dtype of the convs (norm statistics stay float32).
  """

  @nn.compact
  def __call__(self, x, train: bool = True):
    cfg = self.config
    if x.shape[-1] != cfg.in_channels:
      raise ValueError(f'NLayerDiscriminator: expected {cfg.in_channels} input channels (NHWC), got {x.shape}')
    h = x
    for l, (features, stride, bias, has_norm) in enumerate(cfg.layers()):
      h = PatchConv(features, stride, bias, dtype=self.dtype, name=f'conv_{l}')(h)
      last = l == cfg.n_layers + 1
      if has_norm and cfg.norm == 'batch':
        h = BatchNorm(dtype=self.dtype, name=f'norm_{l}')(h, train)
      elif has_norm and cfg.norm == 'group':
        h = GroupNorm(32, dtype=self.dtype, name=f'norm_{l}')(h)
      if not last:
        h = nn.leaky_relu(h, 0.2)
    return h.astype(jnp.float32)

