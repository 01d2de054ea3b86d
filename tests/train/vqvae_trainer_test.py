"""Tokenizer training: codebook-health pieces, end to end on digits (loss falls, usage above a floor, exports a
reference-layout tokenizer that VAR training loads), and exact resume."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests_helpers import load_config
from var_jax.models.var_config import VQVAEConfig
from var_jax.train import loop
from var_jax.train.tasks import tokenizer as vt


def tiny_config(**kw):
  """8px digits (their native size), patch_nums 1,2,4: compiles in seconds."""
  c = load_config('vqvae_quickstart')
  c.data.update(image_size=8, mid_reso=1.0)
  c.vae.update(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4))
  c.disc.update(ndf=16, n_layers=1, norm='none')
  c.global_batch_size = 32
  c.total_steps = 40
  c.loss.update(disc_start=20, gan=0.1)
  c.optim_g.update(lr=1e-3, warmup_steps=5)
  c.codebook.restart_every = 10
  c.log_every = 1
  c.ckpt_every = 20
  c.sample_every = 40
  for k, v in kw.items():
    c[k] = v
  return c


def _train(c, workdir):
  c = c.copy_and_resolve_references()
  return loop.train(c, str(workdir))[1]


def _metrics(workdir):
  out = {}
  for line in open(os.path.join(workdir, 'metrics.jsonl')):
    r = json.loads(line)
    out[r['step']] = r
  return out


def test_code_ema_schedule_and_margins():
  hits = jnp.ones((2, 4))
  ema = vt.update_code_ema(jnp.full((2, 4), 7.0), hits * 3, 0)
  np.testing.assert_allclose(ema, 3.0)                       # first step: copy
  np.testing.assert_allclose(vt.update_code_ema(ema, hits, 50), 0.9 * 3 + 0.1, rtol=1e-6)
  np.testing.assert_allclose(vt.update_code_ema(ema, hits, 500), 0.99 * 3 + 0.01, rtol=1e-6)
  m = vt.usage_margins(VQVAEConfig(vocab_size=100, patch_nums=(1, 2)), 50)
  np.testing.assert_allclose(m, [50 / 100 * 0.08, 200 / 100 * 0.08])
  x = jnp.zeros((1, 4, 4, 3))
  np.testing.assert_allclose(vt.psnr(x, x + 0.2), 10 * np.log10(1 / 0.01), rtol=1e-5)   # mse on [0,1]: 0.1^2


def test_dead_code_restart():
  emb = jnp.arange(12.0).reshape(4, 3)
  params = {'quantize': {'embedding': emb}}
  ema = jnp.array([[5.0, 0.0, 5.0, 0.0], [0.0, 0.0, 5.0, 0.0]])   # code 1 and 3 dead at every scale
  margins = np.array([1.0, 1.0], np.float32)
  feats = jnp.full((2, 2, 2, 3), 100.0)
  p2, e2 = vt._restart_dead_codes(params, ema, feats, margins, jnp.int32(9), 10, jax.random.key(0))
  new = np.asarray(p2['quantize']['embedding'])
  np.testing.assert_array_equal(new[[0, 2]], np.asarray(emb)[[0, 2]])
  np.testing.assert_allclose(new[[1, 3]], 100.0, rtol=1e-3)
  np.testing.assert_allclose(np.asarray(e2)[:, [1, 3]], 1.0)
  p3, _ = vt._restart_dead_codes(params, ema, feats, margins, jnp.int32(3), 10, jax.random.key(0))
  np.testing.assert_array_equal(p3['quantize']['embedding'], emb)      # not a restart step


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  wd = tmp_path_factory.mktemp('straight')
  _train(tiny_config(), wd)
  return wd


def test_train_end_to_end(straight):
  m = _metrics(straight)
  assert sorted(m) == list(range(1, 41))
  first5 = np.mean([m[s]['l1'] for s in range(1, 6)])
  last5 = np.mean([m[s]['l1'] for s in range(36, 41)])
  assert last5 < 0.8 * first5                                            # reconstruction error falls
  assert m[40]['usage_scale2'] >= 20.0                                   # codes stay in use at the finest scale
  assert m[19]['gan_weight'] == 0 and m[25]['gan_weight'] > 0            # GAN loss from disc_start on
  assert os.path.exists(straight / 'reconstructions' / 'step_00000040.png')
  # the exported tokenizer is reference layout and loads where VAR training needs it
  from var_jax.interop import state_dict as sd_io
  from var_jax.interop import var as ref
  sd = sd_io.load_state_dict(straight / 'vqvae.safetensors')
  cfg = ref.vae_config_from_state_dict(sd, patch_nums=(1, 2, 4))
  assert (cfg.vocab_size, cfg.z_channels, cfg.ch_mult) == (64, 8, (1, 2))


@pytest.mark.slow
def test_exact_resume(straight, tmp_path):
  """20 steps, then the same run continued to 40 from its checkpoint, equals the straight 40-step run."""
  m = _metrics(straight)
  c20 = tiny_config(total_steps=20)
  _train(c20, tmp_path / 'resumed')
  _train(tiny_config(), tmp_path / 'resumed')
  r = _metrics(tmp_path / 'resumed')
  for s in range(21, 41):
    for k in ('l1', 'vq_loss', 'd_loss', 'g_loss', 'usage_scale2'):
      assert r[s][k] == m[s][k], (s, k)


@pytest.mark.slow
def test_tokenizer_step_sharded_equals_single_device():
  """The tokenizer step on data=2 x fsdp=2 x tensor=2 (8 fake devices) equals one device (BatchNorm included)."""
  from var_jax import sharding as shd
  from var_jax.models.discriminator import NLayerDiscriminator
  from var_jax.models.vqvae import VQVAE
  c = tiny_config()
  c.disc.update(norm='batch', n_layers=1)
  c.loss.disc_start = 0
  vae_cfg, disc_cfg = vt.tokenizer_configs(c)
  vae, disc = VQVAE(vae_cfg), NLayerDiscriminator(disc_cfg)
  tx_g, tx_d = vt.make_optimizers(c, 10)
  margins = vt.usage_margins(vae_cfg, c.global_batch_size)
  batches = [{'image': np.random.default_rng(i).uniform(-1, 1, (32, 8, 8, 3)).astype(np.float32)} for i in range(3)]

  def run(mesh):
    init_fn, _, shardings = vt.init_fn(vae, disc, tx_g, tx_d, c, mesh, shd.LOGICAL_AXIS_RULES)
    step = jax.jit(vt.make_step(vae, disc, tx_g, tx_d, c, False, margins),
                   in_shardings=(shardings, shd.batch_sharding(mesh), shd.replicated(mesh)),
                   out_shardings=(shardings, shd.replicated(mesh)))
    with shd.mesh_context(mesh):
      state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(0))
      out = []
      for b in batches:
        state, m = step(state, shd.host_local_to_global(b, mesh), {})
        out.append({k: float(m[k]) for k in ('l1', 'vq_loss', 'g_loss', 'd_loss', 'd_weight')})
    return out, state

  single, s1 = run(shd.make_mesh({'data': 1}, devices=jax.devices()[:1]))
  sharded, s8 = run(shd.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2}))
  for a, b in zip(single, sharded):
    for k in a:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
  # Adam's first steps are ~lr * sign(g): float-noise gradients near zero can flip, so params agree to ~lr/10
  for a, b in zip(jax.tree.leaves(s1.g_params), jax.tree.leaves(s8.g_params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4)
  assert s8.g_params['decoder']['conv_in']['kernel'].sharding.spec == jax.sharding.PartitionSpec(
      None, None, None, None)   # conv kernels are replicated by the default rules ('conv_in'/'conv_out' -> None)
