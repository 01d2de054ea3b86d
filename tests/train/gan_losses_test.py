"""GAN losses of tokenizer training against closed forms; adopt_weight and the adaptive weight under jit."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.losses import gan as gl

REAL = np.array([[2.0, 0.5], [-1.0, 0.0]], np.float32)
FAKE = np.array([[-2.0, 0.0], [0.5, -0.25]], np.float32)


def _softplus(v):
  return math.log1p(math.exp(v))


def test_hinge_d_loss():
  # relu(1 - real) = [0, .5, 2, 1] -> mean .875; relu(1 + fake) = [0, 1, 1.5, .75] -> mean .8125
  got = gl.hinge_d_loss(jnp.asarray(REAL), jnp.asarray(FAKE))
  np.testing.assert_allclose(got, 0.5 * (0.875 + 0.8125), rtol=1e-6)
  assert got.dtype == jnp.float32
  # a perfect discriminator (margin >= 1) has zero loss
  assert float(gl.hinge_d_loss(jnp.full((3,), 1.5), jnp.full((3,), -1.0))) == 0.0


def test_vanilla_d_loss():
  want = 0.5 * (np.mean([_softplus(-v) for v in REAL.ravel()]) + np.mean([_softplus(v) for v in FAKE.ravel()]))
  np.testing.assert_allclose(gl.vanilla_d_loss(jnp.asarray(REAL), jnp.asarray(FAKE)), want, rtol=1e-6)
  np.testing.assert_allclose(gl.vanilla_d_loss(jnp.zeros(4), jnp.zeros(4)), math.log(2), rtol=1e-6)
  # stable for large logits (softplus, not log(sigmoid))
  assert np.isfinite(float(gl.vanilla_d_loss(jnp.array([-200.0]), jnp.array([200.0]))))


def test_generator_loss():
  np.testing.assert_allclose(gl.generator_loss(jnp.asarray(FAKE)), -np.mean(FAKE), rtol=1e-6)
  np.testing.assert_allclose(gl.generator_loss(jnp.asarray(FAKE, jnp.bfloat16)), -np.mean(FAKE), rtol=1e-2)
  assert gl.generator_loss(jnp.asarray(FAKE, jnp.bfloat16)).dtype == jnp.float32


def test_adopt_weight_under_jit():
  f = jax.jit(lambda step: gl.adopt_weight(0.8, step, 5))
  assert float(f(jnp.int32(0))) == 0.0 and float(f(jnp.int32(4))) == 0.0
  np.testing.assert_allclose(f(jnp.int32(5)), 0.8)
  np.testing.assert_allclose(f(jnp.int32(1000)), 0.8)
  np.testing.assert_allclose(jax.vmap(f)(jnp.arange(8)), [0, 0, 0, 0, 0, 0.8, 0.8, 0.8], rtol=1e-6)
  # traced threshold and weight too; threshold 0 means active from the first step
  g = jax.jit(gl.adopt_weight)
  np.testing.assert_allclose(g(jnp.float32(2.0), jnp.int32(0), jnp.int32(0)), 2.0)
  assert float(g(jnp.float32(2.0), jnp.int32(9), jnp.int32(10))) == 0.0


def test_adaptive_weight_on_toy_quadratic():
  """nll(W) = 0.5 ||W - A||^2 (grad W - A), g(W) = 0.5 c ||W||^2 + <B, W> (grad c W + B): known norms."""
  rng = np.random.RandomState(0)
  w, a, b = (rng.randn(3, 3, 4, 2).astype(np.float32) for _ in range(3))
  c = 0.7
  nll = lambda k: 0.5 * jnp.sum(jnp.square(k - a))
  g = lambda k: 0.5 * c * jnp.sum(jnp.square(k)) + jnp.sum(b * k)
  n_nll, n_g = np.linalg.norm(w - a), np.linalg.norm(c * w + b)

  @jax.jit
  def weight(k):
    gn_nll = gl.last_layer_grad_norm(nll, k)
    gn_g = gl.last_layer_grad_norm(g, k)
    return gn_nll, gn_g, gl.adaptive_generator_weight(gn_nll, gn_g)

  gn_nll, gn_g, dw = weight(jnp.asarray(w))
  np.testing.assert_allclose(gn_nll, n_nll, rtol=1e-5)
  np.testing.assert_allclose(gn_g, n_g, rtol=1e-5)
  np.testing.assert_allclose(dw, n_nll / (n_g + 1e-4), rtol=1e-5)
  # a pytree "last layer" (kernel + bias) gives the global norm
  tree_norm = gl.last_layer_grad_norm(lambda p: nll(p['k']) + jnp.sum(p['b'] ** 2), {'k': w, 'b': np.ones(2)})
  np.testing.assert_allclose(tree_norm, math.sqrt(n_nll ** 2 + 2 * 2 ** 2), rtol=1e-5)


def test_adaptive_weight_clip_and_stop_gradient():
  np.testing.assert_allclose(gl.adaptive_generator_weight(3.0, 0.0), 1e4)           # 3 / 1e-4 clipped
  np.testing.assert_allclose(gl.adaptive_generator_weight(3.0, 0.0, max_weight=50.0), 50.0)
  np.testing.assert_allclose(gl.adaptive_generator_weight(0.0, 2.0), 0.0)
  np.testing.assert_allclose(gl.adaptive_generator_weight(1.0, 2.0), 1.0 / 2.0001, rtol=1e-6)
  grads = jax.grad(lambda a, b: gl.adaptive_generator_weight(a, b), argnums=(0, 1))(2.0, 3.0)
  assert grads == (0.0, 0.0)


@pytest.mark.parametrize('fn', [gl.hinge_d_loss, gl.vanilla_d_loss])
def test_d_loss_gradients_push_the_right_way(fn):
  """d loss / d real < 0 and d loss / d fake > 0 where the margin is not met (discriminator learns to separate)."""
  dr, df = jax.grad(fn, argnums=(0, 1))(jnp.zeros(4), jnp.zeros(4))
  assert np.all(np.asarray(dr) < 0) and np.all(np.asarray(df) > 0)
