r"""LPIPS perceptual distance (Zhang et al. 2018) with the VGG16 backbone, as VQGAN/taming tokenizers train with.

Numerically the ``lpips`` package's ``LPIPS(net='vgg', lpips=True, version='0.1')`` in ``eval()`` mode (the form
taming's ``VQLPIPSWithDiscriminator`` uses; its dropout is off):

  d(x0, x1) = sum_k mean_hw( w_k . (n(f_k(s(x0))) - n(f_k(s(x1))))^2 )

with s the ScalingLayer ((x - shift) / scale, inputs in [-1, 1]), f_k the five taps relu1_2 ... relu5_3 of
torchvision's ``vgg16().features``, n the unit normalisation over channels (``x / (||x|| + 1e-10)``) and w_k the
non-negative 1x1 ``lin{k}`` weights. Output: ``(B, 1, 1, 1)`` float32 like the reference (it broadcasts against an
NHWC per-pixel loss exactly as the reference's does against NCHW), or ``(B,)`` with ``keepdims=False``.

Params layout (the ``params`` collection; ``var_jax.interop.lpips`` reads the released weights into exactly this
dict)::

  net/conv_{i}/kernel (3, 3, in, out), net/conv_{i}/bias (out,)   <- features.{i}.weight (OIHW) / .bias
  lin{k}/kernel (1, 1, C_k, 1)                                       <- lin{k}.model.1.weight (1, C_k, 1, 1)

where ``i`` is torchvision's index into ``vgg16().features`` (0, 2, 5, 7, 10, ..., 28). The network is frozen: a
training step applies it with the params behind ``stop_gradient`` (``lpips_distance``); gradients flow to the images.

Convert the released weights once with ``python -m var_jax.interop.lpips`` (see there).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from var_jax.models.layers import Conv, logical, torch_default_kernel_init

Dtype = Any
Params = Dict[str, Any]

# torchvision's vgg16 cfg 'D' without the final pool (the lpips taps stop at relu5_3 = features[29]).
VGG16_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
TAP_NAMES = ('relu1_2', 'relu2_2', 'relu3_3', 'relu4_3', 'relu5_3')
TAP_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-.030, -.088, -.188)     # lpips ScalingLayer
SCALE = (.458, .448, .450)
NORM_EPS = 1e-10                  # lpips normalize_tensor
MIN_SIZE = 16                     # four 2x2 pools before relu5_3


def vgg16_convs() -> List[Tuple[int, int, int]]:
  """(torchvision ``features`` index, in channels, out channels) of each conv, in order."""
  out, idx, cin = [], 0, 3
  for v in VGG16_CFG:
    if v == 'M':
      idx += 1
    else:
      out.append((idx, cin, v))
      idx, cin = idx + 2, v          # conv, ReLU
  return out


# ----------------------------------------------------------------------------- model
class VGG16Features(nn.Module):
  """torchvision ``vgg16().features`` up to relu5_3 on NHWC; returns the five lpips taps (relu1_2 ... relu5_3)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x) -> Tuple[jax.Array, ...]:
    taps = []
    idx = 0
    for j, v in enumerate(VGG16_CFG):
      if v == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')     # MaxPool2d(2, 2): floor, no padding
        idx += 1
        continue
      x = jax.nn.relu(Conv(v, kernel_size=3, padding=1, dtype=self.dtype, name=f'conv_{idx}')(x))
      idx += 2
      if j + 1 == len(VGG16_CFG) or VGG16_CFG[j + 1] == 'M':
        taps.append(x)
    return tuple(taps)


class NetLinLayer(nn.Module):
  """lpips NetLinLayer in eval mode: 1x1 conv to one channel, no bias (kernel (1, 1, C, 1), HWIO)."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param('kernel', logical(torch_default_kernel_init, (None, None, 'conv_in', None)),
                        (1, 1, c, 1), jnp.float32)
    return jnp.einsum('bhwc,c->bhw', x, kernel[0, 0, :, 0].astype(x.dtype))[..., None]


def _at_least_f32(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def normalize_tensor(x, eps: float = NORM_EPS):
  """lpips ``normalize_tensor`` over the channel (last) axis: x / (sqrt(sum x^2) + eps), in (at least) float32.

  Same forward; the backward is finite where a position's channels are all zero (the reference's is NaN there:
  d sqrt(s)/ds at s = 0); its value there is 0, the same as the reference's subgradient limit."""
  x = _at_least_f32(x)
  s = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  pos = s > 0
  n = jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)
  return x / (n + eps)


def scale_inputs(x):
  """lpips ScalingLayer on NHWC images in [-1, 1]."""
  x = _at_least_f32(x)
  return (x - jnp.asarray(SHIFT, x.dtype)) / jnp.asarray(SCALE, x.dtype)


class LPIPS(nn.Module):
  """LPIPS-VGG distance between NHWC images in [-1, 1] (``normalize=True``: in [0, 1]).

  ``__call__(x0, x1)`` -> ``(B, 1, 1, 1)`` float32 (``keepdims=False``: ``(B,)``). ``dtype`` is the VGG compute dtype
  (e.g. bfloat16); input scaling, normalisation, differences, lin layers and the sums run in float32 (float64 if
  given float64 inputs and ``dtype``). Both inputs go through one VGG pass (batch 2B)."""
  dtype: Dtype = jnp.float32
  keepdims: bool = True
  normalize: bool = False

  def setup(self):
    self.net = VGG16Features(dtype=self.dtype)
    self.lins = [NetLinLayer(name=f'lin{k}') for k in range(len(TAP_CHANNELS))]

  def per_layer(self, x0, x1) -> Tuple[jax.Array, ...]:
    """The five per-tap terms, each (B,) float32 (their sum is the distance)."""
    if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
      raise ValueError(f'LPIPS expects two NHWC RGB batches of one shape, got {x0.shape} and {x1.shape}')
    if min(x0.shape[1:3]) < MIN_SIZE:
      raise ValueError(f'LPIPS needs images of at least {MIN_SIZE}x{MIN_SIZE} (relu5_3 follows four 2x2 pools), '
                       f'got {x0.shape[1]}x{x0.shape[2]}')
    if self.normalize:
      x0, x1 = 2 * x0 - 1, 2 * x1 - 1
    b = x0.shape[0]
    x = scale_inputs(jnp.concatenate([x0, x1], axis=0)).astype(self.dtype)
    terms = []
    for f, lin in zip(self.net(x), self.lins):
      f = normalize_tensor(f)
      d = jnp.square(f[:b] - f[b:])
      terms.append(jnp.mean(lin(d), axis=(1, 2, 3)))
    return tuple(terms)

  def __call__(self, x0, x1):
    terms = self.per_layer(x0, x1)
    val = terms[0]
    for t in terms[1:]:
      val = val + t
    return val[:, None, None, None] if self.keepdims else val


def lpips_distance(params: Params, x0, x1, dtype: Dtype = jnp.float32, keepdims: bool = True,
                   normalize: bool = False):
  """Frozen LPIPS: ``LPIPS(...).apply`` with the params behind ``stop_gradient`` (gradients reach only the images).

  Pass ``params`` as an argument of the jitted step (part of the train state or a separate argument), not as a
  closure constant: a closure would embed the 59 MB of VGG weights in the compiled program."""
  model = LPIPS(dtype=dtype, keepdims=keepdims, normalize=normalize)
  return model.apply({'params': jax.lax.stop_gradient(params)}, x0, x1)
