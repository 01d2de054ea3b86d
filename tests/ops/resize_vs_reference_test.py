"""var_jax.ops.resize against torch.nn.functional.interpolate (float32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.ops.resize import area_resize, bicubic_resize, nearest_upsample_2x

import torch  # noqa: E402  (the [torch] extra; a missing torch must fail, not skip)
F = torch.nn.functional

ATOL = 1e-5

# VAR patch-number schedules (256px / 16x16 and 512px / 32x32 token maps).
PATCH_NUMS_16 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_32 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def _pairs(patch_nums, kind):
  full = patch_nums[-1]
  if kind == 'down':  # full map down to every scale, and each scale to the next smaller
    return {(full, pn) for pn in patch_nums if pn < full} | set(zip(patch_nums[1:], patch_nums[:-1]))
  assert kind == 'up_to_full'
  return {(pn, full) for pn in patch_nums if pn < full}


AREA_DOWN = sorted(_pairs(PATCH_NUMS_16, 'down') | _pairs(PATCH_NUMS_32, 'down') | {(7, 3), (4, 3), (16, 7)})
UP_TO_FULL = _pairs(PATCH_NUMS_16, 'up_to_full') | _pairs(PATCH_NUMS_32, 'up_to_full')
AREA_UP = sorted(UP_TO_FULL | {(5, 11), (3, 8), (2, 7), (13, 16)})
BICUBIC_UP = sorted(UP_TO_FULL | {(5, 11), (3, 8), (2, 7), (1, 5)})
BICUBIC_DOWN = [(7, 3), (16, 13), (16, 10), (13, 6), (32, 9), (4, 3), (11, 5)]
NON_SQUARE = [((4, 6), (8, 3)), ((5, 3), (2, 7)), ((13, 16), (6, 10))]


def _random_nchw(in_hw, seed, batch=2, channels=3):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((batch, channels) + tuple(in_hw)).astype(np.float32)


def _check(fn, x_nchw, size, mode):
  kw = {'align_corners': False} if mode == 'bicubic' else {}
  ref = F.interpolate(torch.from_numpy(x_nchw), size=size, mode=mode, **kw).numpy()
  out = fn(jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), size)
  assert out.dtype == jnp.float32
  out = np.asarray(out).transpose(0, 3, 1, 2)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize('in_size,out_size', AREA_DOWN + AREA_UP)
def test_area_matches_torch(in_size, out_size):
  _check(area_resize, _random_nchw((in_size, in_size), in_size * 100 + out_size), (out_size, out_size), 'area')


@pytest.mark.parametrize('in_size,out_size', BICUBIC_UP + BICUBIC_DOWN)
def test_bicubic_matches_torch(in_size, out_size):
  _check(bicubic_resize, _random_nchw((in_size, in_size), in_size * 100 + out_size), (out_size, out_size), 'bicubic')


@pytest.mark.parametrize('in_hw,out_hw', NON_SQUARE)
@pytest.mark.parametrize('mode', ['area', 'bicubic'])
def test_non_square_matches_torch(in_hw, out_hw, mode):
  fn = area_resize if mode == 'area' else bicubic_resize
  _check(fn, _random_nchw(in_hw, 7), out_hw, mode)


@pytest.mark.parametrize('mode', ['area', 'bicubic'])
@pytest.mark.parametrize('n', [1, 5, 16])
def test_same_size_is_identity_like_torch(mode, n):
  x = _random_nchw((n, n), n)
  kw = {'align_corners': False} if mode == 'bicubic' else {}
  ref = F.interpolate(torch.from_numpy(x), size=n, mode=mode, **kw).numpy()
  np.testing.assert_array_equal(ref, x)  # torch is an exact identity too
  fn = area_resize if mode == 'area' else bicubic_resize
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  assert fn(xj, n) is xj  # short-circuit
  assert fn(xj, (n, n)) is xj


def test_int_size_equals_tuple_size():
  x = jnp.asarray(_random_nchw((6, 6), 3).transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(area_resize(x, 4), area_resize(x, (4, 4)))
  np.testing.assert_array_equal(bicubic_resize(x, 9), bicubic_resize(x, (9, 9)))


@pytest.mark.parametrize('n', [1, 3, 8])
def test_nearest_upsample_2x_matches_torch(n):
  x = _random_nchw((n, n + 1), n)
  ref = F.interpolate(torch.from_numpy(x), scale_factor=2, mode='nearest').numpy()
  out = np.asarray(nearest_upsample_2x(jnp.asarray(x.transpose(0, 2, 3, 1))))
  np.testing.assert_array_equal(out.transpose(0, 3, 1, 2), ref)


def test_jit_and_bfloat16_dtype():
  x32 = jnp.asarray(_random_nchw((13, 13), 0).transpose(0, 2, 3, 1))
  x16 = x32.astype(jnp.bfloat16)

  area = jax.jit(area_resize, static_argnums=1)
  bicubic = jax.jit(bicubic_resize, static_argnums=1)
  nearest = jax.jit(nearest_upsample_2x)

  for x in (x32, x16):
    a, b, c = area(x, 6), bicubic(x, (16, 10)), nearest(x)
    assert a.shape == (2, 6, 6, 3) and a.dtype == x.dtype
    assert b.shape == (2, 16, 10, 3) and b.dtype == x.dtype
    assert c.shape == (2, 26, 26, 3) and c.dtype == x.dtype
    assert area(x, 13).dtype == x.dtype and bicubic(x, 13).dtype == x.dtype

  # jitted float32 agrees with eager; bfloat16 stays close to float32.
  np.testing.assert_allclose(np.asarray(area(x32, 6)), np.asarray(area_resize(x32, 6)), rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(area(x16, 6), dtype=np.float32), np.asarray(area(x32, 6)), rtol=0, atol=5e-2)
  np.testing.assert_allclose(np.asarray(bicubic(x16, (16, 10)), dtype=np.float32), np.asarray(bicubic(x32, (16, 10))),
                             rtol=0, atol=1e-1)


@pytest.mark.parametrize('in_hw,out_hw', [((16, 16), (1, 1)), ((16, 16), (3, 3)), ((16, 16), (13, 13)),
                                          ((32, 32), (9, 9)), ((4, 4), (10, 10)), ((5, 7), (3, 11))])
def test_bilinear_matches_torch(in_hw, out_hw):
  from var_jax.ops.resize import bilinear_resize
  x = np.random.default_rng(0).standard_normal((2, 3) + in_hw).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.from_numpy(x), size=out_hw, mode='bilinear',
                                         align_corners=False).numpy()
  got = np.asarray(bilinear_resize(jnp.asarray(x.transpose(0, 2, 3, 1)), out_hw)).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(got, want, atol=1e-5)
