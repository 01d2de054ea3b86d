"""Properties that must hold for any configuration (not only the fixtures'): causality, KV cache == teacher
forcing, decode == encode-time f_hat, straight-through gradients, init statistics, interop round trips."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from var_jax import VAR, VQVAE, VARConfig, VQVAEConfig, VARPipeline
from var_jax.models.quantizer import phi_index_per_scale

CONFIGS = {
    # name: (vae overrides, var overrides)
    'phi_K4_l2': (dict(share_quant_resi=4), dict(num_heads=2, attn_l2_norm=True)),
    'phi_nonshared_nol2': (dict(share_quant_resi=0), dict(num_heads=4, attn_l2_norm=False)),
    'phi_shared_saln': (dict(share_quant_resi=1), dict(num_heads=1, shared_aln=True)),
    'phi_K3_counts_saln_nol2': (dict(share_quant_resi=3), dict(num_heads=8, shared_aln=True, attn_l2_norm=False)),
    'phi_nonshared_counts3': (dict(share_quant_resi=0, default_qresi_counts=3), dict(num_heads=2)),
}
PATCH_NUMS = {'phi_K4_l2': (1, 2, 3, 5, 8), 'phi_nonshared_nol2': (1, 2, 4, 6), 'phi_shared_saln': (2, 3, 5),
              'phi_K3_counts_saln_nol2': (1, 3, 4, 7), 'phi_nonshared_counts3': (1, 2, 3, 4)}


@functools.lru_cache(maxsize=None)
def make(name):
  vo, to = CONFIGS[name]
  pn = PATCH_NUMS[name]
  vae = VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=pn, **vo)
  var = VARConfig(vocab_size=32, z_channels=8, num_classes=5, depth=3, embed_dim=64, patch_nums=pn, **to)
  pipe = VARPipeline.init_random(vae, var, jax.random.key(0))
  # the reference's init makes every block ~identity (gamma ~ 1e-5): randomise so every block matters
  leaves, tdef = jax.tree.flatten(pipe.var_variables)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  pipe.var_variables = jax.tree.unflatten(tdef, [l + 0.05 * jax.random.normal(k, l.shape) for l, k in
                                                 zip(leaves, keys)])
  return pipe


def _images(pipe, b=2, seed=0):
  s = pipe.vae_config.image_size
  return jax.random.uniform(jax.random.key(seed), (b, s, s, 3), minval=-1, maxval=1)


@pytest.mark.parametrize('name', ['phi_K4_l2', 'phi_K3_counts_saln_nol2', 'phi_shared_saln'])
def test_kv_cache_decoding_equals_teacher_forcing(name):
  pipe = make(name)
  cfg = pipe.var_config
  toks = pipe.encode(_images(pipe))
  labels = jnp.array([1, cfg.num_classes])
  full = pipe.logits(labels, toks)
  x_in = pipe.var_input(toks)
  var = VAR(cfg)
  v = pipe.var_variables

  @jax.jit
  def run(v, labels, x_in):
    cond = var.apply(v, labels, method=VAR.class_cond)
    x = var.apply(v, cond, method=VAR.first_scale_input)
    caches = var.apply(v, labels.shape[0], method=VAR.init_cache)
    outs = []
    for si in range(len(cfg.patch_nums)):
      if si > 0:
        b, e = cfg.begin_ends[si]
        x = var.apply(v, si, x_in[:, b - cfg.first_l:e - cfg.first_l], method=VAR.next_scale_input)
      lg, caches = var.apply(v, si, x, cond, caches, method=VAR.decode_scale)
      outs.append(lg)
    return jnp.concatenate(outs, axis=1)

  np.testing.assert_allclose(run(v, labels, x_in), full, atol=2e-5 * float(jnp.max(jnp.abs(full))))


@pytest.mark.parametrize('name', ['phi_K4_l2', 'phi_shared_saln'])
def test_block_causality(name):
  """Changing the input tokens of scales > k leaves the logits of scales <= k unchanged."""
  pipe = make(name)
  cfg = pipe.var_config
  x_in = pipe.var_input(pipe.encode(_images(pipe)))
  labels = jnp.array([0, 3])
  logits_of = jax.jit(lambda x: pipe.var.apply(pipe.var_variables, labels, x))   # teacher-forced, from the input
  base = logits_of(x_in)
  for k in range(len(cfg.patch_nums) - 1):
    end = cfg.begin_ends[k][1]
    pert = x_in.at[:, end - cfg.first_l:].add(1.0)
    out = logits_of(pert)
    np.testing.assert_allclose(out[:, :end], base[:, :end], atol=1e-5)
    assert float(jnp.max(jnp.abs(out[:, end:] - base[:, end:]))) > 1e-3   # later scales do see it


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_decode_matches_encode_time_fhat(name):
  pipe = make(name)
  x = _images(pipe)
  toks = pipe.encode(x)
  fhats = pipe.fhats(x)
  vae = VQVAE(pipe.vae_config)
  decoded = vae.apply(pipe.vae_variables, toks, False, method=lambda m, t, l: m.quantize.idx_to_fhat(t, l))
  for a, b in zip(decoded, fhats):
    np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_allclose(pipe.decode(toks), pipe.reconstruct(x), atol=1e-5)
  for t, p in zip(toks, pipe.vae_config.patch_nums):
    chex.assert_shape(t, (2, p * p))
    assert t.dtype == jnp.int32 and int(t.min()) >= 0 and int(t.max()) < pipe.vae_config.vocab_size


def test_phi_selection_follows_reference_ticks():
  # K=4: ticks linspace(1/12, 11/12, 4); 10 scales at si/9 -> the reference's nearest-tick choice (scale 2 sits
  # on a near-tie, 0.1389 from ticks 0 and 1, which float64 breaks towards tick 1 in the reference too)
  c = VQVAEConfig(share_quant_resi=4)
  assert phi_index_per_scale(c) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
  assert phi_index_per_scale(VQVAEConfig(share_quant_resi=1)) == (0,) * 10
  assert phi_index_per_scale(VQVAEConfig(share_quant_resi=0)) == tuple(range(10))
  assert phi_index_per_scale(VQVAEConfig(quant_resi=0.0)) == (None,) * 10


def test_quantizer_training_forward_straight_through():
  pipe = make('phi_K4_l2')
  vae = VQVAE(pipe.vae_config)
  x = _images(pipe)
  f = vae.apply(pipe.vae_variables, x, method=VQVAE.encode_features)

  def fwd(f):
    return vae.apply(pipe.vae_variables, f, method=lambda m, f: m.quantize(f))

  f_hat, aux = fwd(f)
  fhats = pipe.fhats(x)
  np.testing.assert_allclose(f_hat, fhats[-1], atol=1e-5)              # forward value is the quantized f_hat
  for a, b in zip(aux['indices'], pipe.encode(x)):
    np.testing.assert_array_equal(a, b)
  beta = pipe.vae_config.beta
  want = np.mean([(1 + beta) * np.mean((np.asarray(fh) - np.asarray(f)) ** 2) for fh in fhats])
  np.testing.assert_allclose(aux['vq_loss'], want, rtol=1e-5)
  np.testing.assert_array_equal(aux['hits'].sum(1), [2 * p * p for p in pipe.vae_config.patch_nums])
  # straight-through: d(sum f_hat)/df == 1 everywhere
  g = jax.grad(lambda f: jnp.sum(fwd(f)[0]))(f)
  np.testing.assert_allclose(g, np.ones_like(g))
  # the VQ loss trains the codebook and the phis, and the commitment term reaches f
  gp = jax.grad(lambda v: vae.apply(v, f, method=lambda m, f: m.quantize(f))[1]['vq_loss'])(pipe.vae_variables)
  assert float(jnp.abs(gp['params']['quantize']['embedding']).sum()) > 0
  assert float(jnp.abs(gp['params']['quantize']['phi_0']['conv']['kernel']).sum()) > 0


def test_reference_initialisation_statistics():
  cfg = VARConfig(vocab_size=512, z_channels=8, num_classes=100, depth=4, embed_dim=256, num_heads=4,
                  patch_nums=(1, 2, 3))
  v = jax.jit(VAR(cfg).init)(jax.random.key(0), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 13, 8)))
  from flax.core import meta
  p = meta.unbox(v)['params']
  std = (1 / 256 / 3) ** 0.5
  np.testing.assert_allclose(np.std(p['class_emb']), std, rtol=0.05)
  np.testing.assert_allclose(np.std(p['head']['kernel']), 0.02 * std, rtol=0.05)
  np.testing.assert_allclose(np.std(p['blocks_0']['attn']['proj']['kernel']), std / np.sqrt(8), rtol=0.05)
  np.testing.assert_allclose(np.std(p['blocks_0']['ffn']['fc2']['kernel']), std / np.sqrt(8), rtol=0.05)
  ada = p['blocks_0']['ada_lin']['kernel']        # (C, 6C): gamma columns x1e-5, the rest x0.5
  np.testing.assert_allclose(np.std(ada[:, :512]), 1e-5 * std, rtol=0.05)
  np.testing.assert_allclose(np.std(ada[:, 512:]), 0.5 * std, rtol=0.05)
  np.testing.assert_allclose(np.std(p['head_nm']['kernel']), 0.5 * std, rtol=0.05)
  assert not np.any(p['head']['bias']) and not np.any(p['blocks_0']['attn']['q_bias'])
  np.testing.assert_allclose(p['blocks_0']['attn']['scale_mul'], np.log(4.0))


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_interop_roundtrip_and_config_inference(tmp_path, name):
  pipe = make(name)
  pipe.save_torch(tmp_path / 'vae.safetensors', tmp_path / 'var.safetensors')
  heads = None if pipe.var_config.attn_l2_norm else pipe.var_config.num_heads
  back = VARPipeline.from_torch(tmp_path / 'vae.safetensors', tmp_path / 'var.safetensors', num_heads=heads)
  assert back.vae_config == pipe.vae_config
  want = dict(depth=3, embed_dim=64, num_heads=pipe.var_config.num_heads, patch_nums=PATCH_NUMS[name],
              shared_aln=pipe.var_config.shared_aln, attn_l2_norm=pipe.var_config.attn_l2_norm, num_classes=5)
  assert {k: getattr(back.var_config, k) for k in want} == want
  for a, b in [(pipe.vae_variables, back.vae_variables), (pipe.var_variables, back.var_variables)]:
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
      np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


def test_training_mode_uses_rngs():
  cfg = VARConfig(vocab_size=32, z_channels=8, num_classes=5, depth=2, embed_dim=64, num_heads=1,
                  patch_nums=(1, 2), drop_path_rate=0.5, cond_drop_rate=0.5)
  model = VAR(cfg)
  labels, x = jnp.arange(4) % 5, jax.random.normal(jax.random.key(0), (4, 4, 8))
  v = model.init(jax.random.key(0), labels, x)
  ev = model.apply(v, labels, x)
  np.testing.assert_array_equal(ev, model.apply(v, labels, x))       # eval: deterministic
  t1 = model.apply(v, labels, x, deterministic=False, rngs={'dropout': jax.random.key(1)})
  t2 = model.apply(v, labels, x, deterministic=False, rngs={'dropout': jax.random.key(2)})
  t1b = model.apply(v, labels, x, deterministic=False, rngs={'dropout': jax.random.key(1)})
  np.testing.assert_array_equal(t1, t1b)                             # same key, same result
  assert float(jnp.max(jnp.abs(t1 - t2))) > 0
