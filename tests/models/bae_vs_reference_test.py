"""The ELM/BiGR binary autoencoder against the reference PyTorch run (fixture ``bae_k8``)."""
import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED, nchw_to_nhwc, rel_err
from var_jax.interop import bae as ibae
from var_jax.losses.bae import codebook_loss_from_probs
from var_jax.models.bae import UNUSED, BAEConfig, BinaryAutoEncoder, ResBlock

FIX = SHARED / 'fixtures' / 'elm_bigr_reference' / 'bae_k8'
KEY = jax.random.key(3)
FLOATS = ('encoder_out', 'proj_logits', 'probs', 'quant_det', 'recon_det', 'recon_forward', 'codebook_loss',
          'quant_bern', 'recon_bern')


def _all_outputs(mod, x, u, key):
  """Every dumped array, plus the key-driven and training paths, in one program (one compilation)."""
  enc, logits = mod.encode_logits(x)
  bits_det = mod.bits(x)
  quant_bern, bits_bern = mod.encode(x, 'bernoulli', uniforms=u)
  recon_forward, aux = mod(x, train=False)
  recon_det, recon_bern = jnp.split(mod.decode(jnp.concatenate([bits_det, bits_bern])), 2)
  train_recon, train_aux = mod(x, train=True, uniforms=u)
  return dict(encoder_out=enc, proj_logits=logits, probs=mod.probs(x), bits_det=bits_det,
              quant_det=mod.embed_bits(bits_det), recon_det=recon_det, recon_forward=recon_forward,
              codebook_loss=aux['codebook_loss'], bits_bern=bits_bern, quant_bern=quant_bern, recon_bern=recon_bern,
              fwd_bits=aux['bits'], fwd_probs=aux['probs'], train_bits=train_aux['bits'], train_recon=train_recon,
              key_bits=mod.bits(x, 'bernoulli', key))


@pytest.fixture(scope='module')
def bae():
  cfg_json = json.loads((FIX / 'config.json').read_text())
  cfg, variables, extras = ibae.load_bae(FIX / 'binaryae.th', resolution=cfg_json['img_size'])
  io = dict(np.load(FIX / 'io.npz'))
  model = BinaryAutoEncoder(cfg)
  run = jax.jit(lambda v, x, u, key: model.apply(v, x, u, key, method=_all_outputs))
  out = run(variables, nchw_to_nhwc(io['image']), nchw_to_nhwc(io['bernoulli_u']), KEY)
  out = {k: np.asarray(v) for k, v in out.items()}
  return types.SimpleNamespace(cfg_json=cfg_json, cfg=cfg, model=model, variables=variables, extras=extras, io=io,
                               out=out)


def _nchw(a):
  return np.transpose(a, (0, 3, 1, 2)) if a.ndim == 4 else a


def test_config_inferred(bae):
  cj, cfg = bae.cfg_json, bae.cfg
  assert cfg == BAEConfig(in_channels=cj['n_channels'], nf=cj['nf'], ch_mult=cj['ch_mult'],
                          res_blocks=cj['res_blocks'], attn_resolutions=cj['attn_resolutions'],
                          resolution=cj['img_size'], codebook_size=cj['codebook_size'], emb_dim=cj['emb_dim'],
                          norm_first=cj['norm_first'], gen_mul=cj['gen_mul'])
  assert bae.extras == {} and ibae.bae_param_count(cfg) == cj['params']


@pytest.mark.parametrize('name', FLOATS)
def test_float_outputs(bae, name):
  io, out = bae.io, bae.out
  got = _nchw(out[name])
  assert got.shape == io[name].shape and got.dtype == np.float32
  err = rel_err(got, io[name])
  print(f'{name}: max abs err {np.max(np.abs(got - io[name])):.3g}, rel {err:.3g}')
  assert err < 1e-4, (name, err)


@pytest.mark.parametrize('name', ['bits_det', 'bits_bern'])
def test_bits_exact(bae, name):
  io, out = bae.io, bae.out
  assert out[name].dtype == np.uint8
  np.testing.assert_array_equal(_nchw(out[name]), io[name])


def test_forward_internals(bae):
  io, out = bae.io, bae.out
  np.testing.assert_array_equal(_nchw(out['fwd_bits']), io['bits_det'])            # train=False -> threshold
  np.testing.assert_allclose(out['fwd_probs'], out['probs'], rtol=0, atol=0)
  np.testing.assert_array_equal(_nchw(out['train_bits']), io['bits_bern'])         # train=True -> u < p
  assert np.max(np.abs(out['train_recon'] - out['recon_bern'])) < 1e-5
  # quant is an exact 0/1 sum of embedding rows; the straight-through forward equals decode(bits) up to rounding
  assert rel_err(_nchw(out['quant_det']), io['quant_det']) < 1e-6
  assert np.max(np.abs(out['recon_forward'] - out['recon_det'])) < 1e-5
  # code_book_loss applies the sigmoid to the probabilities (a second sigmoid), not to the logits
  s = 1 / (1 + np.exp(-io['probs'].astype(np.float64)))
  np.testing.assert_allclose(float(out['codebook_loss']), np.mean(s * (1 - s)), rtol=1e-6)
  np.testing.assert_allclose(float(codebook_loss_from_probs(jnp.asarray(io['probs']))), io['codebook_loss'], rtol=1e-6)


def test_bernoulli_rng_and_errors(bae):
  cfg, model, variables, out = bae.cfg, bae.model, bae.variables, bae.out
  b1 = out['key_bits']
  assert b1.shape == (2, 4, 4, cfg.codebook_size) and b1.dtype == np.uint8
  # the key draws u ~ U[0,1) of the bits' shape: u < p
  u = jax.random.uniform(KEY, b1.shape, jnp.float32)
  np.testing.assert_array_equal(b1, np.asarray(u) < out['probs'])
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)          # errors at trace time: no compute needed
  with pytest.raises(ValueError, match='rng'):
    jax.eval_shape(lambda x: model.apply(variables, x, 'bernoulli', method='bits'), x)
  with pytest.raises(ValueError, match='rng'):
    jax.eval_shape(lambda x: model.apply(variables, x, train=True), x)
  with pytest.raises(ValueError, match='mode'):
    jax.eval_shape(lambda x: model.apply(variables, x, 'round', method='bits'), x)
  with pytest.raises(ValueError, match='uniforms'):
    jax.eval_shape(lambda x: model.apply(variables, x, 'bernoulli', uniforms=jnp.zeros((2, 8)), method='bits'), x)
  with pytest.raises(ValueError, match='tanh'):
    BAEConfig(use_tanh=True)


def test_straight_through_gradient():
  """Reconstruction gradients reach ``proj`` and the encoder through ``p`` (d quant / d p = embed), not the logits.

  A one-level model with random weights (the property is structural; a small model keeps the backward compile short).
  """
  cfg = BAEConfig(nf=32, ch_mult=(1,), res_blocks=1, attn_resolutions=(), resolution=8, codebook_size=6, emb_dim=32)
  model = BinaryAutoEncoder(cfg)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 3)), jnp.float32)
  abstract = jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(0))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(np.float32), nn.unbox(abstract['params']))

  def loss_params(params):
    recon, aux = model.apply({'params': params}, x, train=False)
    return jnp.mean(jnp.abs(recon - x)), aux

  def loss_bits(z):   # the same loss as a function of the (float) bits fed to the generator
    return jnp.mean(jnp.abs(model.apply({'params': params}, z, method='decode') - x))

  @jax.jit
  def run(params):
    grads, aux = jax.grad(loss_params, has_aux=True)(params)
    return grads, aux, jax.grad(loss_bits)(aux['bits'].astype(jnp.float32))

  grads, aux, g_z = run(params)
  p = np.asarray(aux['probs'], np.float64)
  assert 0.1 < np.mean(np.asarray(aux['bits'])) < 0.9
  want = np.sum(np.asarray(g_z) * p * (1 - p), axis=(0, 1, 2))   # chain rule through the sigmoid into proj's bias
  got = np.asarray(grads['quantize']['proj']['bias'])
  assert np.max(np.abs(want)) > 1e-6
  assert rel_err(got, want) < 1e-4, (got, want)
  for path in (('encoder', 'conv_in', 'kernel'), ('encoder', 'down_0', 'block_0', 'conv1', 'kernel'),
               ('quantize', 'embed'), ('generator', 'conv_out', 'kernel')):
    g = grads
    for k in path:
      g = g[k]
    assert np.all(np.isfinite(g)) and np.max(np.abs(g)) > 0, path


def test_resblock_init_keeps_unused_shortcut():
  """Equal widths: the reference's unused 1x1 ``conv_out`` is created (torch-default init) in 'unused', not params."""
  x = jnp.ones((1, 4, 4, 32), jnp.float32)
  v = jax.jit(ResBlock(32).init)(jax.random.key(0), x)
  k = np.asarray(nn.unbox(v[UNUSED])['conv_out']['kernel'])
  assert k.shape == (1, 1, 32, 32) and 0 < np.max(np.abs(k)) <= 32 ** -0.5 and np.std(k) > 0.05
  assert 'conv_out' not in v['params'] and set(v['params']) == {'norm1', 'conv1', 'norm2', 'conv2'}
  # apply needs only the params, and ignores the unused tensors when given
  y1, y2 = jax.jit(lambda v: (ResBlock(32).apply({'params': v['params']}, x), ResBlock(32).apply(v, x)))(v)
  np.testing.assert_array_equal(y1, y2)
  v2 = jax.eval_shape(ResBlock(64).init, jax.random.key(0), x)   # widths differ: a real shortcut in params
  assert UNUSED not in v2 and nn.unbox(v2['params'])['conv_out']['kernel'].shape == (1, 1, 32, 64)
