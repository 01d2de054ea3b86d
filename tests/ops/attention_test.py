"""var_jax.ops.attention: the splash kernel (Pallas interpret mode) equals the XLA path; dispatch rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from var_jax import sharding as shd
from var_jax.ops import attention as A

PN = (1, 2, 3, 4, 5, 6, 8, 10, 13)   # L = 424: not a multiple of the 128 block, 4 x 4 blocks, 2 of them empty
L = 424


def _qkv(b=1, h=2, dh=8):
  ks = jax.random.split(jax.random.key(0), 3)
  return [jax.random.normal(k, (b, L, h, dh), jnp.float32) for k in ks]


def test_splash_interpret_matches_xla_block_causal():
  q, k, v = _qkv()
  mask = A.BlockCausal(PN)
  ref = A.attention(q, k, v, scale=0.3, mask=mask, implementation='xla')
  out = A.attention(q, k, v, scale=0.3, mask=mask, implementation='splash', interpret=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_splash_interpret_under_mesh_matches_xla():
  q, k, v = _qkv(b=2, h=2)
  mesh = jax.make_mesh((2, 1, 2), shd.MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[:4])
  mask = A.BlockCausal(PN)
  ref = A.attention(q, k, v, scale=1.0, mask=mask, implementation='xla')
  with shd.mesh_context(mesh):
    assert A._mesh_specs(2, 2)[0] == jax.sharding.PartitionSpec('data', None, 'tensor', None)
    out = jax.jit(lambda q, k, v: A.attention(q, k, v, scale=1.0, mask=mask, implementation='splash',
                                              interpret=True))(q, k, v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_splash_interpret_gradients_match_xla():
  q, k, v = _qkv()
  mask = A.BlockCausal(PN)

  def loss(impl):
    return lambda q, k, v: jnp.sum(A.attention(q, k, v, scale=0.3, mask=mask, implementation=impl,
                                               interpret=True) * v[..., :1])
  g_ref = jax.grad(loss('xla'), argnums=(0, 1, 2))(q, k, v)
  g = jax.grad(loss('splash'), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_block_mask_skips_fully_masked_blocks():
  pm = A.padded_mask(A.BlockCausal(PN).dense(L, L), L, L, 128, 128)
  assert pm.shape == (512, 512)
  assert not pm[:L, L:].any() and pm[L:, :L].all()          # padded keys masked; padded queries see real keys
  counts = A.block_mask_counts(pm, 128, 128)
  # rows 0..127 reach at most key 154 (scale 6 ends there): kv blocks 2 and 3 of q block 0 are empty
  assert counts == {'empty': 2, 'partial': 7, 'full': 7}
  kernel = A.make_splash_kernel(pm, 2, 128, 128, interpret=True)
  bm = np.asarray(kernel.fwd_mask_info.block_mask)
  assert (bm == 0).sum() == counts['empty'] and (bm == 1).sum() == counts['partial']
  assert (bm == 2).sum() == counts['full']


def test_dispatch():
  assert A.resolve('auto', True, 'cpu') == 'xla'
  assert A.resolve('auto', True) == 'xla'                    # the tests' CPU backend
  assert A.resolve('auto', True, 'gpu') == 'cudnn'
  assert A.resolve('auto', True, 'tpu') == 'splash'
  assert A.resolve('auto', False, 'tpu') == 'xla'            # KV-cache decode stays on XLA
  with pytest.raises(ValueError, match="'cudnn' needs a GPU, but the platform is 'cpu'"):
    A.resolve('cudnn', True, 'cpu')
  with pytest.raises(ValueError, match="'splash' needs a TPU"):
    A.resolve('splash', True, 'cpu')
  with pytest.raises(ValueError, match='must be one of'):
    A.resolve('flash', True, 'cpu')
  assert A._cudnn_unsupported(jnp.zeros((1, 4, 1, 8), jnp.float32), None).startswith('dtype float32')
  assert A._cudnn_unsupported(jnp.zeros((1, 4, 1, 12), jnp.bfloat16), None).startswith('head_dim 12')
  assert A._cudnn_unsupported(jnp.zeros((1, 4, 1, 64), jnp.bfloat16), np.ones((4, 4), bool)) is None


def test_var_config_validates_attn_impl():
  from var_jax.models.var_config import VARConfig
  with pytest.raises(ValueError, match='attn_impl must be one of'):
    VARConfig(depth=1, embed_dim=32, num_heads=2, attn_impl='flash')
