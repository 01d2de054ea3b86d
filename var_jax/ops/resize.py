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
inputs use an exact float64 matrix, as torch does. Bilinear (float32) goes
further: torch's float32 weights and its ``fma(x0, w0, x1 * w1)`` combination,
W then H, as two gathers per axis, so it is bit-identical to torch's generic
CPU kernel (see :func:`bilinear_resize`). The sizes are static Python ints, so
every function is ``jax.jit`` compatible.

Every resizer takes ``x``, a (batch, height, width, channels) array whose
dtype it keeps, and ``size``, an int (square) or an ``(height, width)`` tuple.

``tf1_legacy_bilinear_resize`` is the other bilinear: TF1's
``tf.image.resize_bilinear`` without half-pixel centres, the resize inside the
TF Inception graph of OpenAI's evaluator and TF-FID.
"""

from __future__ import annotations

import functools
from typing import Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Size = Union[int, Tuple[int, int]]

__all__ = ['area_resize', 'bicubic_resize', 'bilinear_resize', 'nearest_upsample_2x', 'tf1_legacy_bilinear_resize']

_CUBIC_A = -0.75  # torch's upsample_bicubic2d coefficient


def _out_size(x: jax.Array, size: Size) -> Tuple[int, int]:
  """``(out_h, out_w)`` of ``size`` (an int is square), after checking that ``x`` is NHWC."""
  if x.ndim != 4:
    raise ValueError(f'expected NHWC array, got shape {x.shape}')
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


def _readonly(*arrays: np.ndarray):
  """Mark cached tables read-only (one array, or a tuple of them)."""
  for a in arrays:
    a.setflags(write=False)
  return arrays[0] if len(arrays) == 1 else arrays


@functools.lru_cache(maxsize=None)
def _area_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float64 matrix of torch ``adaptive_avg_pool`` along one axis."""
  m = np.zeros((out_size, in_size), dtype=np.float64)
  for i in range(out_size):
    start = (i * in_size) // out_size  # floor(i * in / out)
    end = -((-(i + 1) * in_size) // out_size)  # ceil((i + 1) * in / out)
    m[i, start:end] = 1.0 / (end - start)
  return _readonly(m)


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
  return _readonly(m)


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
  return _readonly(m)


@functools.lru_cache(maxsize=None)
def _area_matrix_f32(in_size: int, out_size: int) -> np.ndarray:
  return _readonly(_area_matrix(in_size, out_size).astype(np.float32))


@functools.lru_cache(maxsize=None)
def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float64 matrix of torch bilinear (align_corners=False, no antialias): src = (dst + 0.5) * in / out
  - 0.5 clamped at 0 (torch's linear path clamps, unlike cubic), taps floor(src) and min(floor(src) + 1, in - 1).
  This is what torch computes for float64 inputs."""
  m = np.zeros((out_size, in_size), dtype=np.float64)
  scale = in_size / out_size
  for o in range(out_size):
    src = max(scale * (o + 0.5) - 0.5, 0.0)
    i0 = min(int(np.floor(src)), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    lam = src - i0
    m[o, i0] += 1.0 - lam
    m[o, i1] += lam
  return _readonly(m)


@functools.lru_cache(maxsize=None)
def _bilinear_taps_f32(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """``(i0, i1, lambda0, lambda1)`` along one axis with torch's float32 rounding (float32/bf16/fp16 inputs).

  torch's ``compute_source_index_and_lambda`` works in ``opmath_t`` = float32: scale = float(in) / out,
  src = fma(scale, dst + 0.5, -0.5) (its CPU kernels are compiled with FMA contraction), clamped at 0,
  i0 = min(floor(src), in - 1), i1 = i0 + (i0 < in - 1), lambda1 = clamp(src - i0, 0, 1), lambda0 = 1 - lambda1,
  all rounded to float32. Exact float64 weights are off by up to ~3e-5 for 300 -> 299 (~9e-6 for 256 -> 299);
  these reproduced torch 2.13's weights (CPU, AVX512) bit for bit for every in/out pair in 1..64 and for
  256/300/512 -> 299.
  """
  scale = _F32(in_size) / _F32(out_size)
  i0s, i1s, l0s, l1s = [], [], [], []
  for o in range(out_size):
    src = max(_fma_f32(scale, _F32(o) + _F32(0.5), _F32(-0.5)), _F32(0))
    i0 = min(int(np.floor(src)), in_size - 1)
    lam1 = min(max(src - _F32(i0), _F32(0)), _F32(1))
    i0s.append(i0)
    i1s.append(i0 + (1 if i0 < in_size - 1 else 0))
    l0s.append(_F32(1) - lam1)
    l1s.append(lam1)
  return _readonly(np.asarray(i0s, np.int32), np.asarray(i1s, np.int32), np.asarray(l0s, np.float32),
                   np.asarray(l1s, np.float32))


@functools.lru_cache(maxsize=None)
def _bilinear_matrix_f32(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float32 matrix of :func:`_bilinear_taps_f32` (equal sizes: the identity, torch copies)."""
  m = np.zeros((out_size, in_size), dtype=np.float32)
  if in_size == out_size:
    m[np.arange(out_size), np.arange(out_size)] = 1
  else:
    i0, i1, l0, l1 = _bilinear_taps_f32(in_size, out_size)
    np.add.at(m, (np.arange(out_size), i0), l0)
    np.add.at(m, (np.arange(out_size), i1), l1)
  return _readonly(m)


def _bilinear_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  """One axis of torch's generic bilinear kernel: ``x[i0] * lambda0 + x[i1] * lambda1`` per output index.

  Written as two gathers and that expression (not a matmul) so that the rounding is torch's: its kernel evaluates
  ``t0 * w0 + t1 * w1`` (as ``fma(t0, w0, t1 * w1)`` on FMA CPUs; XLA's CPU backend contracts the same expression
  the same way), W first, then H on the W results. When the last tap is clamped (i1 == i0) the two products are
  still added separately, as torch does.
  """
  i0, i1, l0, l1 = _bilinear_taps_f32(x.shape[axis], out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  l0 = jnp.asarray(l0, x.dtype).reshape(shape)
  l1 = jnp.asarray(l1, x.dtype).reshape(shape)
  return jnp.take(x, jnp.asarray(i0), axis=axis) * l0 + jnp.take(x, jnp.asarray(i1), axis=axis) * l1


@functools.partial(jax.jit, static_argnums=(1, 2))
def _bilinear_f32_taps_resize(x: jax.Array, out_h: int, out_w: int) -> jax.Array:
  # jitted also when called eagerly: op-by-op dispatch would round the products separately (no FMA contraction),
  # 1 ulp off torch in ~40% of the outputs; inside an outer jit it is inlined.
  if x.shape[2] != out_w:
    x = _bilinear_axis(x, 2, out_w)
  if x.shape[1] != out_h:
    x = _bilinear_axis(x, 1, out_h)
  return x


def _matrix(kind: str, in_size: int, out_size: int, dtype) -> jax.Array:
  """Interpolation matrix cast to ``dtype``.

  float64 inputs get the float64 matrices (torch's opmath is double there);
  every other dtype goes through the float32 matrices, as torch computes and
  then stores its weights in the input dtype.
  """
  if jnp.dtype(dtype) == jnp.float64:
    f = {'area': _area_matrix, 'bicubic': _bicubic_matrix, 'bilinear': _bilinear_matrix}[kind]
  else:
    f = {'area': _area_matrix_f32, 'bicubic': _bicubic_matrix_f32}[kind]
  return jnp.asarray(f(in_size, out_size), dtype=dtype)


def _separable_resize(x: jax.Array, size: Size, kind: str) -> jax.Array:
  out_h, out_w = _out_size(x, size)
  _, in_h, in_w, _ = x.shape
  dtype = x.dtype
  if kind == 'bilinear' and jnp.dtype(dtype) != jnp.float64:
    # torch's generic bilinear kernel, W then H (see _bilinear_axis); float64 keeps the exact float64 matrix.
    return _bilinear_f32_taps_resize(x, out_h, out_w)
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
  """
  return _separable_resize(x, size, 'area')


def bicubic_resize(x: jax.Array, size: Size) -> jax.Array:
  """``F.interpolate(x, size=size, mode='bicubic', align_corners=False)``.

  Keys cubic convolution with ``A = -0.75``, source coordinate
  ``(dst + 0.5) * in / out - 0.5`` and border-clamped taps, exactly as torch's
  ``upsample_bicubic2d``; no antialiasing, also when downsampling. Not
  ``jax.image.resize(..., 'cubic')``, which uses ``A = -0.5`` and antialiases
  on downsampling. Equal sizes are an identity and return ``x`` unchanged.
  """
  return _separable_resize(x, size, 'bicubic')


def bilinear_resize(x: jax.Array, size: Size) -> jax.Array:
  """``F.interpolate(x, size=size, mode='bilinear', align_corners=False)`` (no antialias) for an NHWC array.

  Source coordinate ``(dst + 0.5) * in / out - 0.5`` clamped at 0, taps ``floor`` and ``floor + 1`` (clamped to the
  border). float32 (and bf16/fp16) inputs replay torch's float32 arithmetic: the source index, lambdas and the
  ``fma(x0, lambda0, x1 * lambda1)`` combination per axis, W first, then H (see ``_bilinear_taps_f32``). This is bit
  for bit ``F.interpolate`` of torch 2.13's generic CPU kernel (the one it runs for NCHW float with more than one
  thread, or C != 3, and output h + w > 128, e.g. every resize to 299x299), verified to the last ulp for
  256/64/32x48/512/300 -> 299 and 100x80 -> 150x120; torch's single-threaded C = 3 path and its small-output
  separable kernel round differently (up to a few ulps, ~5e-7 on unit-scale data). Exact float64 weights (the
  previous implementation) were up to 2e-4 off on unit-normal data (up to 5e-5 on [0, 1] images, 300 -> 299).
  float64 inputs use the exact float64 matrix (torch's double path). Equal sizes are an identity.

  Used by the FID Inception's pytorch-fid preprocessing (256 -> 299) and VAR's zero-shot edit masks (the reference
  demo's ``replace_embedding``, thresholded at 0.5).
  """
  return _separable_resize(x, size, 'bilinear')


@functools.lru_cache(maxsize=None)
def _tf1_legacy_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """TF's ``compute_interpolation_weights`` with ``LegacyScaler``: scale = float(in) / out, src = float(dst) * scale
  (float32, no half-pixel offset), lower = floor(src), upper = min(ceil(src), in - 1), lerp = src - floor(src)."""
  scale = _F32(in_size) / _F32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lower = np.floor(src)
  return _readonly(lower.astype(np.int32), np.minimum(np.ceil(src), in_size - 1).astype(np.int32),
                   (src - lower).astype(np.float32))


@functools.partial(jax.jit, static_argnums=1)
def tf1_legacy_bilinear_resize(x: jax.Array, size: Size) -> jax.Array:
  """TF1's ``tf.image.resize_bilinear(x, size)`` (``align_corners=False, half_pixel_centers=False``), NHWC, float32.

  The resize inside the ``inception-2015-12-05`` graph that OpenAI's guided-diffusion evaluator and TF-FID run:
  output index ``d`` samples source coordinate ``d * in / out`` (no half-pixel offset, so the image shifts by half a
  pixel against :func:`bilinear_resize`), taps ``floor`` / ``min(ceil, in - 1)``, and TF's lerp form
  ``top = tl + (tr - tl) * x_lerp``, ``bottom = bl + (br - bl) * x_lerp``, ``out = top + (bottom - top) * y_lerp``
  (W first, then H) in float32. No antialiasing. Integer inputs are converted to float32 (TF's op outputs float32).
  TF's own rounding depends on its build (its GPU kernel contracts to FMA, its CPU wheels usually do not), so
  expect agreement to ~1 ulp, not bit for bit.
  """
  out_h, out_w = _out_size(x, size)
  x = jnp.asarray(x).astype(jnp.float32)
  lo, hi, lerp = (jnp.asarray(a) for a in _tf1_legacy_taps(x.shape[2], out_w))
  left, right = jnp.take(x, lo, axis=2), jnp.take(x, hi, axis=2)
  x = left + (right - left) * lerp[None, None, :, None]
  lo, hi, lerp = (jnp.asarray(a) for a in _tf1_legacy_taps(x.shape[1], out_h))
  top, bottom = jnp.take(x, lo, axis=1), jnp.take(x, hi, axis=1)
  return top + (bottom - top) * lerp[None, :, None, None]


def nearest_upsample_2x(x: jax.Array) -> jax.Array:
  """``F.interpolate(x, scale_factor=2, mode='nearest')`` for an NHWC array.

  Output pixel ``(i, j)`` copies input ``(i // 2, j // 2)``: every pixel is
  repeated twice along height and width.
  """
  if x.ndim != 4:
    raise ValueError(f'expected NHWC array, got shape {x.shape}')
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
