"""Torch-exact image resizing for NHWC arrays.

VAR's multi-scale residual quantiser moves feature maps between the patch
resolutions of its schedule (e.g. 1, 2, 3, 4, 5, 6, 8, 10, 13, 16) with
``torch.nn.functional.interpolate``: ``mode='area'`` to go down to a scale and
``mode='bicubic'`` to come back up. Reproducing the PyTorch model therefore
needs those exact operators.

Why not ``jax.image.resize``?

* Its ``'linear'``/``'cubic'`` methods antialias when downsampling
  (``antialias=True`` by default) and its ``'cubic'`` kernel is Keys with
  ``A = -0.5``, while torch uses ``A = -0.75`` and never antialiases.
* JAX has no ``'area'`` method; the closest thing, TF-style area resizing,
  weights input pixels by their *fractional* overlap with each output pixel.
  torch's ``mode='area'`` is ``adaptive_avg_pool2d``: output index ``i``
  takes the plain mean of the whole input pixels
  ``[floor(i * in / out), ceil((i + 1) * in / out))``. For non-integer ratios
  (16 -> 13, 16 -> 10, 13 -> 6, ...) the bins overlap and the two differ.

Every resize here is separable and linear, so it is written as two small
matmuls with interpolation matrices precomputed in numpy and cached per
``(in_size, out_size)``. Area weights are computed in float64 and cast. The
bicubic matrix used for float32 (and bf16/fp16) inputs replays torch's own
float32 coordinate/coefficient arithmetic, because torch's rounding of the
source coordinate alone moves outputs by up to ~7e-6 from exact math; float64
inputs use an exact float64 matrix, as torch does. The sizes are static Python
ints, so every function is ``jax.jit`` compatible.
"""

from __future__ import annotations

import functools
from typing import Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Size = Union[int, Tuple[int, int]]

__all__ = ['area_resize', 'bicubic_resize', 'bilinear_resize', 'nearest_upsample_2x']

_CUBIC_A = -0.75  # torch's upsample_bicubic2d coefficient


def _normalize_size(size: Size) -> Tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


@functools.lru_cache(maxsize=None)
def _area_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float64 matrix of torch ``adaptive_avg_pool`` along one axis."""
  m = np.zeros((out_size, in_size), dtype=np.float64)
  for i in range(out_size):
    start = (i * in_size) // out_size  # floor(i * in / out)
    end = -((-(i + 1) * in_size) // out_size)  # ceil((i + 1) * in / out)
    m[i, start:end] = 1.0 / (end - start)
  m.setflags(write=False)
  return m


def _cubic_weights_f64(t: float) -> Tuple[float, float, float, float]:
  """torch ``get_cubic_upsample_coefficients`` (taps i0-1 .. i0+2), float64."""
  a = _CUBIC_A

  def conv1(x):  # cubic_convolution1, |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def conv2(x):  # cubic_convolution2, 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  x2 = 1.0 - t
  return conv2(t + 1.0), conv1(t), conv1(x2), conv2(x2 + 1.0)


_F32 = np.float32


def _fma_f32(a, b, c) -> np.float32:
  """float32 fused multiply-add: a * b is exact in float64, one final rounding."""
  return _F32(np.float64(a) * np.float64(b) + np.float64(c))


def _cubic_weights_f32(t: np.float32) -> Tuple[np.float32, ...]:
  """The same coefficients rounded exactly as torch's float32 CPU kernel.

  torch's vectorised CPU kernels are compiled with FMA contraction; this
  pattern reproduced the weights of torch 2.13 (CPU, AVX512 dispatch) bit for
  bit for every in/out size pair in 1..40. Other builds (CUDA, non-FMA CPUs)
  may round differently, but only at the ~1e-7 level.
  """
  a = _F32(_CUBIC_A)
  one = _F32(1.0)

  def conv1(x):
    return _fma_f32(a + _F32(2), x, -(a + _F32(3))) * x * x + one

  def conv2(x):
    inner = _fma_f32(_fma_f32(a, x, -(_F32(5) * a)), x, _F32(8) * a)
    return inner * x - _F32(4) * a

  x2 = one - t
  return conv2(t + one), conv1(t), conv1(x2), conv2(x2 + one)


@functools.lru_cache(maxsize=None)
def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float64 matrix of torch bicubic (align_corners=False), exact math.

  src = (dst + 0.5) * in / out - 0.5, not clamped at 0 (torch's cubic path);
  i0 = floor(src), t = src - i0; out-of-range taps are clamped to
  [0, in - 1] like ``upsample_get_value_bounded``, so their weights pile
  onto the border row. This is what torch computes for float64 inputs.
  """
  m = np.zeros((out_size, in_size), dtype=np.float64)
  scale = in_size / out_size
  for o in range(out_size):
    src = scale * (o + 0.5) - 0.5
    i0 = int(np.floor(src))
    for k, w in enumerate(_cubic_weights_f64(src - i0)):
      m[o, min(max(i0 - 1 + k, 0), in_size - 1)] += w
  m.setflags(write=False)
  return m


@functools.lru_cache(maxsize=None)
def _bicubic_matrix_f32(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float32 bicubic matrix with torch's float32 rounding.

  For float32/bf16/fp16 inputs torch evaluates the source coordinate and the
  cubic coefficients in float32 (``opmath_t``): scale = float(in) / out,
  src = scale * (dst + 0.5) - 0.5. For ratios float32 cannot represent
  (16/13, 5/11, ...) with src up to ~40, rounding of src alone moves the
  weights by up to ~3e-6 (outputs by up to ~7e-6) away from the float64
  matrix, so we replay torch's float32 arithmetic instead. Same formula as
  :func:`_bicubic_matrix`; differences are pure float32 rounding.
  """
  m = np.zeros((out_size, in_size), dtype=np.float32)
  scale = _F32(in_size) / _F32(out_size)
  for o in range(out_size):
    src = _fma_f32(scale, _F32(o) + _F32(0.5), _F32(-0.5))
    i0 = min(int(np.floor(src)), in_size - 1)  # guard_index_and_lambda
    t = min(max(src - _F32(i0), _F32(0)), _F32(1))
    for k, w in enumerate(_cubic_weights_f32(t)):
      m[o, min(max(i0 - 1 + k, 0), in_size - 1)] += w
  m.setflags(write=False)
  return m


@functools.lru_cache(maxsize=None)
def _area_matrix_f32(in_size: int, out_size: int) -> np.ndarray:
  m = _area_matrix(in_size, out_size).astype(np.float32)
  m.setflags(write=False)
  return m


@functools.lru_cache(maxsize=None)
def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float64 matrix of torch bilinear (align_corners=False, no antialias): src = (dst + 0.5) * in / out
  - 0.5 clamped at 0 (torch's linear path clamps, unlike cubic), taps floor(src) and min(floor(src) + 1, in - 1)."""
  m = np.zeros((out_size, in_size), dtype=np.float64)
  scale = in_size / out_size
  for o in range(out_size):
    src = max(scale * (o + 0.5) - 0.5, 0.0)
    i0 = min(int(np.floor(src)), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    lam = src - i0
    m[o, i0] += 1.0 - lam
    m[o, i1] += lam
  m.setflags(write=False)
  return m


def _matrix(kind: str, in_size: int, out_size: int, dtype) -> jax.Array:
  """Interpolation matrix cast to ``dtype``.

  float64 inputs get the float64 matrices (torch's opmath is double there);
  every other dtype goes through the float32 matrices, as torch computes and
  then stores its weights in the input dtype.
  """
  if kind == 'bilinear':
    return jnp.asarray(_bilinear_matrix(in_size, out_size), dtype=dtype)
  if jnp.dtype(dtype) == jnp.float64:
    f = _area_matrix if kind == 'area' else _bicubic_matrix
  else:
    f = _area_matrix_f32 if kind == 'area' else _bicubic_matrix_f32
  return jnp.asarray(f(in_size, out_size), dtype=dtype)


def _separable_resize(x: jax.Array, size: Size, kind: str) -> jax.Array:
  if x.ndim != 4:
    raise ValueError(f'expected NHWC array, got shape {x.shape}')
  out_h, out_w = _normalize_size(size)
  _, in_h, in_w, _ = x.shape
  dtype = x.dtype
  # W first, then H: torch's 2-D kernel interpolates along W inside and
  # combines the H taps outside, so this also matches its summation order.
  if in_w != out_w:
    mw = _matrix(kind, in_w, out_w, dtype)
    x = jnp.einsum('ow,bhwc->bhoc', mw, x, precision=jax.lax.Precision.HIGHEST)
  if in_h != out_h:
    mh = _matrix(kind, in_h, out_h, dtype)
    x = jnp.einsum('oh,bhwc->bowc', mh, x, precision=jax.lax.Precision.HIGHEST)
  return x.astype(dtype)


def area_resize(x: jax.Array, size: Size) -> jax.Array:
  """``F.interpolate(x, size=size, mode='area')`` for an NHWC array.

  torch implements ``mode='area'`` as ``adaptive_avg_pool2d``: output index
  ``i`` is the mean of input indices ``[floor(i*in/out), ceil((i+1)*in/out))``
  along each axis. This is *not* ``jax.image.resize``/TF area resizing, which
  weights pixels by fractional overlap; the two disagree whenever the ratio
  is not an integer. Works for down- and upsampling. Equal sizes are an
  identity (as in torch) and return ``x`` unchanged.

  Args:
    x: (batch, height, width, channels) array; its dtype is kept.
    size: output size, an int (square) or an ``(height, width)`` tuple.
  """
  return _separable_resize(x, size, 'area')


def bicubic_resize(x: jax.Array, size: Size) -> jax.Array:
  """``F.interpolate(x, size=size, mode='bicubic', align_corners=False)``.

  Keys cubic convolution with ``A = -0.75``, source coordinate
  ``(dst + 0.5) * in / out - 0.5`` and border-clamped taps, exactly as torch's
  ``upsample_bicubic2d``; no antialiasing, also when downsampling. Not
  ``jax.image.resize(..., 'cubic')``, which uses ``A = -0.5`` and antialiases
  on downsampling. Equal sizes are an identity and return ``x`` unchanged.

  Args:
    x: (batch, height, width, channels) array; its dtype is kept.
    size: output size, an int (square) or an ``(height, width)`` tuple.
  """
  return _separable_resize(x, size, 'bicubic')


def bilinear_resize(x: jax.Array, size: Size) -> jax.Array:
  """``F.interpolate(x, size=size, mode='bilinear', align_corners=False)`` (no antialias) for an NHWC array.

  VAR uses it only to resample zero-shot edit masks to each token-map size (the reference demo's
  ``replace_embedding``), where the result is thresholded at 0.5.
  """
  return _separable_resize(x, size, 'bilinear')


def nearest_upsample_2x(x: jax.Array) -> jax.Array:
  """``F.interpolate(x, scale_factor=2, mode='nearest')`` for an NHWC array.

  Output pixel ``(i, j)`` copies input ``(i // 2, j // 2)``: every pixel is
  repeated twice along height and width.
  """
  if x.ndim != 4:
    raise ValueError(f'expected NHWC array, got shape {x.shape}')
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
