"""BAE training with the tokenizer trainer: one step against a direct computation (Bernoulli key from (seed, step),
code-book weight, adaptive GAN weight), bit statistics, export -> ``load_bae`` -> the same reconstructions,
``init_from`` with partial discriminator import, LPIPS from ``perceptual.*``, end to end on digits, exact resume."""
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax.core import meta

from tests_helpers import load_config
from var_jax import sharding as shd
from var_jax.interop import bae as ibae
from var_jax.interop import gan as gan_io
from var_jax.models.bae import UNUSED, BinaryAutoEncoder
from var_jax.models.discriminator import DiscriminatorConfig, NLayerDiscriminator
from var_jax.losses import gan as gan_losses
from var_jax.train import loop
from var_jax.train import rng as rng_lib
from var_jax.train.tasks import tokenizer as vt


def tiny_config(**kw):
  """8px digits (their native size), a 2-level BAE (4x4 x 8 bits; attention only in the middle blocks)."""
  c = load_config('bae_quickstart')
  c.data.update(image_size=8, mid_reso=1.0)
  c.bae.update(nf=32, ch_mult=(1, 1), res_blocks=1, attn_resolutions=(), resolution=8, codebook_size=8,
               emb_dim=32)
  c.disc.update(ndf=16, n_layers=1, norm='batch')
  c.global_batch_size = 32
  c.total_steps = 40
  c.loss.update(disc_start=20, code=0.1)
  c.optim_g.update(lr=1e-3, warmup_steps=5)
  c.ema.update(decay=0.9, every=2)
  c.log_every = 1
  c.ckpt_every = 20
  c.sample_every = 40
  for k, v in kw.items():
    c[k] = v
  return c


def _train(c, workdir):
  return loop.train(c.copy_and_resolve_references(), str(workdir))[1]


def _metrics(workdir):
  out = {}
  for line in open(os.path.join(workdir, 'metrics.jsonl')):
    r = json.loads(line)
    out[r['step']] = r
  return out


def _single_mesh():
  return shd.make_mesh({'data': 1}, devices=jax.devices()[:1])


def _batch(seed=0, n=32, s=8):
  return {'image': np.random.default_rng(seed).uniform(-1, 1, (n, s, s, 3)).astype(np.float32)}


def test_bit_statistics_closed_form():
  bits = jnp.array([[1, 0, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]], jnp.uint8)    # channel means 1, 0.5, 0.25
  probs = jnp.array([[0.55, 0.9, 0.45], [0.2, 0.5, 1.0], [0.7, 0.0, 0.62], [0.5, 0.5, 0.5]])
  s = vt.bit_statistics(bits, probs)
  np.testing.assert_allclose(s['bit_mean_per_channel'], [1.0, 0.5, 0.25])
  assert float(s['bits_used']) == 2.0                                          # channel 0 is constant
  h = -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))
  np.testing.assert_allclose(s['bit_entropy'], (0 + 1 + h) / 3, rtol=1e-6)
  np.testing.assert_allclose(s['probs_near_half'], 6 / 12)                     # |p - .5| < .1
  np.testing.assert_allclose(s['prob_confidence'], np.mean(np.abs(2 * np.asarray(probs) - 1)), rtol=1e-6)


@pytest.fixture(scope='module')
def one_step():
  """One jitted trainer step (GAN on with weight 0.7, code weight 0.5, SGD(1) so the update is the gradient)."""
  c = tiny_config(global_batch_size=8)
  c.loss.update(disc_start=0, code=0.5, gan=0.7)
  gcfg, dcfg = vt.tokenizer_configs(c)
  gen = vt.build_generator(c, gcfg)
  disc = NLayerDiscriminator(dcfg)
  tx_g, tx_d = optax.sgd(1.0), vt.make_optimizers(c, 10)[1]
  mesh = _single_mesh()
  init_fn, _, shardings = vt.init_fn(gen, disc, tx_g, tx_d, c, mesh, shd.LOGICAL_AXIS_RULES)
  with shd.mesh_context(mesh):
    init = jax.jit(init_fn, out_shardings=shardings)
    state0, other_seed = jax.device_get(init(jax.random.key(0))), init(jax.random.key(7))
    step = jax.jit(vt.make_step(gen, disc, tx_g, tx_d, c, False))
    batch = _batch(n=8)
    state1, m = step(state0, batch, {})
  return dict(c=c, gen=gen, disc=disc, dcfg=dcfg, state0=state0, state1=jax.device_get(state1),
              m=jax.device_get(m), batch=batch, other_seed=other_seed, shardings=shardings, mesh=mesh)


def test_step_matches_direct_computation(one_step):
  """The step's update equals d/dp [L1 + 0.5 code_book_loss + 0.7 d_weight (-E[D(x')])] on [0, 1] images, with the
  Bernoulli bits drawn from fold_in(fold_in(key(seed), step), 2) and d_weight recomputed by re-running the model
  with only the last kernel varying (``gan_losses.last_layer_grad_norm``)."""
  o = one_step
  c, bae, disc, s0 = o['c'], o['gen'].model, o['disc'], o['state0']
  x01 = (jnp.asarray(o['batch']['image']) + 1) / 2
  key = rng_lib.stream(rng_lib.step_key(c.seed, 0), 'bernoulli_bits')
  d_vars = {'params': s0.d_params, **s0.d_stats}

  def run(p):
    return bae.apply({'params': p}, x01, True, key)

  def with_kernel(k):
    gp = s0.g_params['generator']
    return {**s0.g_params, 'generator': {**gp, 'conv_out': {**gp['conv_out'], 'kernel': k}}}

  def nll_of(k):
    return jnp.mean(jnp.abs(x01 - run(with_kernel(k))[0]))

  def g_of(k):
    logits, _ = disc.apply(d_vars, run(with_kernel(k))[0], True, mutable=['batch_stats'])
    return gan_losses.generator_loss(logits)

  kernel = s0.g_params['generator']['conv_out']['kernel']
  d_weight = min(float(gan_losses.adaptive_generator_weight(gan_losses.last_layer_grad_norm(nll_of, kernel),
                                                            gan_losses.last_layer_grad_norm(g_of, kernel))), 1.0)
  np.testing.assert_allclose(o['m']['d_weight'], d_weight, rtol=1e-4)
  assert 0 < d_weight < 1                                       # not at the clip: the value is tested

  def total(p):
    rec, aux = run(p)
    logits, _ = disc.apply(d_vars, rec, True, mutable=['batch_stats'])
    return (jnp.mean(jnp.abs(x01 - rec)) + 0.5 * aux['codebook_loss']
            + 0.7 * d_weight * gan_losses.generator_loss(logits)), aux

  grads, aux = jax.grad(total, has_aux=True)(s0.g_params)
  upd = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), s0.g_params, o['state1'].g_params)
  for (path, g), u in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(upd)):
    np.testing.assert_allclose(u, np.asarray(g), rtol=2e-3, atol=2e-6, err_msg=jax.tree_util.keystr(path))
  # the bits were drawn with that key: the logged bit statistics are those of u < p
  want = vt.bit_statistics(aux['bits'], aux['probs'])
  np.testing.assert_array_equal(o['m']['bit_mean_per_channel'], np.asarray(want['bit_mean_per_channel']))
  np.testing.assert_allclose(o['m']['codebook_loss'], aux['codebook_loss'], rtol=1e-6)
  np.testing.assert_allclose(o['m']['l1'], jnp.mean(jnp.abs(x01 - run(s0.g_params)[0])), rtol=1e-5)
  # EMA: step 0 is not an EMA step (the reference updates at step % every == 0, step > 0)
  for a, b in zip(jax.tree.leaves(o['state1'].g_ema), jax.tree.leaves(s0.g_params)):
    np.testing.assert_array_equal(a, b)


def test_export_reloads_and_init_from(one_step, tmp_path, caplog):
  """binaryae.{safetensors,th}: ae.* + disc.* keys, ``load_bae`` reproduces the trained params' reconstructions;
  init_from loads them back (discriminator partially when its config differs, skipped keys named in the log)."""
  o = one_step
  gen, s1, dcfg = o['gen'], o['state1'], o['dcfg']
  paths = vt.export_tokenizer(gen, s1, dcfg, str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == ['binaryae.safetensors', 'binaryae.th',
                                                        'binaryae_ema.safetensors', 'binaryae_ema.th']
  th = torch.load(tmp_path / 'binaryae.th', map_location='cpu', weights_only=True)
  assert all(k.startswith(('ae.', 'disc.')) for k in th) and any(k.startswith('disc.') for k in th)
  x = jnp.asarray(o['batch']['image'][:4])
  want = gen.reconstruct_signed(s1.g_params, x)
  for name in ('binaryae.safetensors', 'binaryae.th'):
    cfg, variables, extras = ibae.load_bae(tmp_path / name, resolution=8)
    assert cfg == gen.config
    rec = BinaryAutoEncoder(cfg).apply(variables, (x + 1) / 2, train=False)[0]
    np.testing.assert_array_equal(np.asarray(rec) * 2 - 1, np.asarray(want))
    for a, b in zip(jax.tree.leaves(variables['params']), jax.tree.leaves(s1.g_params)):
      np.testing.assert_array_equal(a, b)
    assert sorted(extras) == sorted(k for k in th if k.startswith('disc.'))
  _, ema_vars, _ = ibae.load_bae(tmp_path / 'binaryae_ema.th', resolution=8)
  for a, b in zip(jax.tree.leaves(ema_vars['params']), jax.tree.leaves(s1.g_ema)):
    np.testing.assert_array_equal(a, b)

  # init_from: a fresh state (another seed) takes the file's BAE, 'unused' tensors and discriminator
  c = o['c'].copy_and_resolve_references()
  c.init_from = str(tmp_path / 'binaryae.th')
  fresh = o['other_seed']
  st = vt.init_from(gen, fresh, o['shardings'], dcfg, c)
  for a, b in zip(jax.tree.leaves((st.g_params, st.vq_stats, st.d_params, st.d_stats, st.g_ema)),
                  jax.tree.leaves((s1.g_params, s1.vq_stats, s1.d_params, s1.d_stats, s1.g_params))):
    np.testing.assert_array_equal(a, b)
  # a discriminator of another shape: what fits is imported, the rest is named in a warning
  other = DiscriminatorConfig(ndf=16, n_layers=2, norm='batch')
  c2 = c.copy_and_resolve_references()
  c2.disc.update(n_layers=2)
  dv = meta.unbox(NLayerDiscriminator(other).init(jax.random.key(1), jnp.zeros((2, 8, 8, 3)), False))
  rep = shd.replicated(o['mesh'])
  fresh2 = fresh.replace(d_params=dv['params'], d_stats={'batch_stats': dv['batch_stats']})
  sh2 = o['shardings'].replace(d_params=jax.tree.map(lambda _: rep, dv['params']),
                               d_stats={'batch_stats': jax.tree.map(lambda _: rep, dv['batch_stats'])})
  with caplog.at_level(logging.INFO, logger='var_jax.train'):
    st2 = vt.init_from(gen, fresh2, sh2, other, c2)
  np.testing.assert_array_equal(st2.d_params['conv_0']['kernel'], s1.d_params['conv_0']['kernel'])   # fits
  np.testing.assert_array_equal(st2.d_params['conv_3']['kernel'], fresh2.d_params['conv_3']['kernel'])  # not
  warn = ' '.join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert 'disc.main.5.weight (file (1, 32, 4, 4), model (64, 32, 4, 4))' in warn, warn
  assert 'disc.main.8.weight (missing from the file' in warn, warn


def test_lpips_from_perceptual_keys():
  """The reference BinaryGAN's ``perceptual.*`` (bae/lpips.py: net.slice{s}.{i}, lin{k}.model.1) -> LPIPS params."""
  from var_jax.interop import lpips as lpips_io
  from var_jax.models import lpips as lpips_lib
  slices = [(1, 0, 4), (2, 4, 9), (3, 9, 16), (4, 16, 23), (5, 23, 30)]
  vgg, sd = {}, {}
  for n, (key, shape, _) in enumerate(lpips_io.param_table()):
    a = np.broadcast_to(np.float32(n), shape)
    if key.startswith('features.'):
      vgg[key] = a
      i = int(key.split('.')[1])
      s = next(s for s, lo, hi in slices if lo <= i < hi)
      sd[f'perceptual.net.slice{s}.{i}.{key.split(".")[2]}'] = a
    else:
      sd[f'perceptual.{key}'] = a
  sd['perceptual.scaling_layer.shift'] = np.array(lpips_lib.SHIFT, np.float32).reshape(1, 3, 1, 1)
  sd['perceptual.scaling_layer.scale'] = np.array(lpips_lib.SCALE, np.float32).reshape(1, 3, 1, 1)
  got = gan_io.lpips_from_perceptual(sd)
  want = lpips_io.params_from_state_dicts(
      vgg, {k[len('perceptual.'):]: v for k, v in sd.items() if k.startswith('perceptual.lin')})
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(p))
  c = tiny_config()
  c.loss.update(lpips=1.0, lpips_path='')
  assert vt.load_lpips(c, sd) is not None
  with pytest.raises(ValueError, match='lpips_path'):
    vt.load_lpips(c, {})


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """The 40-step run (about a minute on a loaded 2-core CPU, most of it compiling): the slow tests share it."""
  wd = tmp_path_factory.mktemp('bae_straight')
  _train(tiny_config(), wd)
  return wd


@pytest.mark.slow
def test_train_end_to_end(straight):
  m = _metrics(straight)
  assert sorted(m) == list(range(1, 41))
  for r in m.values():
    assert all(np.isfinite(v) for k, v in r.items() if isinstance(v, float)), r
  first5 = np.mean([m[s]['l1'] for s in range(1, 6)])
  last5 = np.mean([m[s]['l1'] for s in range(36, 41)])
  assert last5 < 0.8 * first5, (first5, last5)                          # reconstruction error falls
  assert m[19]['gan_weight'] == 0 and m[25]['gan_weight'] > 0           # GAN loss from disc_start on
  assert m[19]['d_loss'] == 0 and m[25]['d_loss'] > 0
  assert {f'bit_mean_{k}' for k in range(8)} <= set(m[40]) and m[40]['bits_used'] >= 1
  for k in ('codebook_loss', 'bit_entropy', 'probs_near_half', 'prob_confidence'):
    assert k in m[40]
  assert os.path.exists(straight / 'reconstructions' / 'step_00000040.png')
  cfg, variables, extras = ibae.load_bae(straight / 'binaryae.th', resolution=8)
  assert (cfg.codebook_size, cfg.emb_dim, cfg.ch_mult, cfg.norm_first) == (8, 32, (1, 1), True)
  assert set(variables) == {'params', UNUSED} and any(k.startswith('disc.') for k in extras)
  assert os.path.exists(straight / 'binaryae_ema.safetensors')


@pytest.mark.slow
def test_exact_resume(straight, tmp_path):
  """20 steps, then the same run continued to 40 from its checkpoint, equals the straight 40-step run."""
  m = _metrics(straight)
  _train(tiny_config(total_steps=20), tmp_path / 'resumed')
  _train(tiny_config(), tmp_path / 'resumed')
  r = _metrics(tmp_path / 'resumed')
  for s in range(21, 41):
    for k in ('l1', 'codebook_loss', 'd_loss', 'g_loss', 'bit_mean_0', 'bits_used'):
      assert r[s][k] == m[s][k], (s, k)
  a = ibae.load_bae(straight / 'binaryae_ema.safetensors', resolution=8)[1]
  b = ibae.load_bae(tmp_path / 'resumed' / 'binaryae_ema.safetensors', resolution=8)[1]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_bae_step_sharded_equals_single_device():
  """The BAE step on data=2 x fsdp=2 x tensor=2 (8 fake devices) equals one device (same Bernoulli bits)."""
  c = tiny_config()
  c.loss.disc_start = 0
  gcfg, dcfg = vt.tokenizer_configs(c)
  gen, disc = vt.build_generator(c, gcfg), NLayerDiscriminator(dcfg)
  tx_g, tx_d = vt.make_optimizers(c, 10)
  batches = [_batch(i) for i in range(3)]

  def run(mesh):
    init_fn, _, shardings = vt.init_fn(gen, disc, tx_g, tx_d, c, mesh, shd.LOGICAL_AXIS_RULES)
    step = jax.jit(vt.make_step(gen, disc, tx_g, tx_d, c, False),
                   in_shardings=(shardings, shd.batch_sharding(mesh), shd.replicated(mesh)),
                   out_shardings=(shardings, shd.replicated(mesh)))
    with shd.mesh_context(mesh):
      state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(0))
      out = []
      for b in batches:
        state, m = step(state, shd.host_local_to_global(b, mesh), {})
        out.append(jax.device_get(m))
    return out, state

  single, s1 = run(_single_mesh())
  sharded, s8 = run(shd.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2}))
  for a, b in zip(single, sharded):
    np.testing.assert_array_equal(b['bit_mean_per_channel'], a['bit_mean_per_channel'])
    for k in ('l1', 'codebook_loss', 'g_loss', 'd_loss', 'd_weight'):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(s1.g_params), jax.tree.leaves(s8.g_params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4)
