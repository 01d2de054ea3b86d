"""PatchGAN discriminator: shapes, taming init, BatchNorm semantics and parity with a torch NLayerDiscriminator."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.core import meta
from torch import nn as tnn

from var_jax.interop.gan import import_taming_discriminator
from var_jax.interop.state_dict import CheckpointMismatchError as DiscriminatorMismatchError
from var_jax.models.discriminator import DiscriminatorConfig, NLayerDiscriminator


class TorchNLayerDiscriminator(tnn.Module):
  """taming-transformers ``NLayerDiscriminator`` (taming/modules/discriminator/model.py), transcribed; ``norm``
  'batch' is taming's ``use_actnorm=False``; 'group' / 'none' put GroupNorm(32) / nothing in the norm slot."""

  def __init__(self, input_nc=3, ndf=64, n_layers=3, norm='batch'):
    super().__init__()
    norm_layer = {'batch': tnn.BatchNorm2d, 'group': lambda c: tnn.GroupNorm(32, c, eps=1e-6), 'none': None}[norm]
    use_bias = norm != 'batch'
    kw, padw = 4, 1
    sequence = [tnn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw), tnn.LeakyReLU(0.2, True)]
    nf_mult = 1
    for n in range(1, n_layers):
      nf_mult_prev = nf_mult
      nf_mult = min(2 ** n, 8)
      sequence += [tnn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=2, padding=padw,
                              bias=use_bias)]
      sequence += [norm_layer(ndf * nf_mult)] if norm_layer else []
      sequence += [tnn.LeakyReLU(0.2, True)]
    nf_mult_prev = nf_mult
    nf_mult = min(2 ** n_layers, 8)
    sequence += [tnn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=1, padding=padw, bias=use_bias)]
    sequence += [norm_layer(ndf * nf_mult)] if norm_layer else []
    sequence += [tnn.LeakyReLU(0.2, True)]
    sequence += [tnn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw)]
    self.main = tnn.Sequential(*sequence)

  def forward(self, x):
    return self.main(x)


def _randomise(model: tnn.Module, seed: int):
  """Random weights everywhere and random BatchNorm running statistics (so eval mode is a real test)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if name.endswith('num_batches_tracked'):
        t.fill_(7)
      elif name.endswith('running_var'):
        t.copy_(0.5 + torch.rand(t.shape, generator=g))
      elif name.endswith('running_mean'):
        t.copy_(0.3 * torch.randn(t.shape, generator=g))
      elif t.ndim == 1 and name.endswith('weight'):
        t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=g))
      else:
        t.copy_(0.1 * torch.randn(t.shape, generator=g))
  return model


@functools.lru_cache(maxsize=None)
def _pair(ndf, n_layers, norm, seed=0):
  cfg = DiscriminatorConfig(ndf=ndf, n_layers=n_layers, norm=norm)
  tm = _randomise(TorchNLayerDiscriminator(3, ndf, n_layers, norm), seed)
  sd = {k: v.clone() for k, v in tm.state_dict().items()}
  return cfg, tm, sd


def _images(b, s, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (b, s, s, 3)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


@pytest.mark.parametrize('size,ndf,expected', [(32, 64, 2), (64, 64, 6), (256, 64, 30)])
def test_output_shapes_default_config(size, ndf, expected):
  cfg = DiscriminatorConfig(ndf=ndf)
  model = NLayerDiscriminator(cfg)
  x = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(lambda k: model.init(k, x, False), jax.random.key(0))
  out = jax.eval_shape(lambda v: model.apply(v, x, False), variables)
  assert out.shape == (2, expected, expected, 1) and out.dtype == jnp.float32
  assert cfg.output_size(size) == expected
  # parameter count equals taming's default NLayerDiscriminator (no bias before BatchNorm)
  n_ours = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables['params']))
  n_torch = sum(p.numel() for p in TorchNLayerDiscriminator(3, ndf, 3).parameters())
  assert n_ours == n_torch


@pytest.mark.parametrize('norm,ndf,size', [('batch', 8, 256), ('group', 32, 32), ('none', 8, 64)])
def test_output_shapes_run(norm, ndf, size):
  cfg, _, sd = _pair(ndf, 3, norm)
  variables = import_taming_discriminator(sd, cfg)
  assert ('batch_stats' in variables) == (norm == 'batch')
  out, _ = NLayerDiscriminator(cfg).apply(variables, jnp.asarray(_images(2, size)), True, mutable=['batch_stats'])
  s = cfg.output_size(size)
  assert out.shape == (2, s, s, 1) and np.all(np.isfinite(np.asarray(out)))


def test_taming_init():
  cfg = DiscriminatorConfig(ndf=64, n_layers=3)
  model = NLayerDiscriminator(cfg)
  # one compiled init (a cheap-to-compile PRNG: the statistics are what is tested), in train mode
  v = jax.jit(lambda k: model.init(k, jnp.ones((2, 32, 32, 3)), True))(jax.random.key(0, impl='unsafe_rbg'))
  v = jax.tree.map(np.asarray, meta.unbox(v))
  p, st = v['params'], v['batch_stats']
  kernels = np.concatenate([p[f'conv_{l}']['kernel'].ravel() for l in range(5)])
  assert abs(kernels.std() - 0.02) < 1e-3 and abs(kernels.mean()) < 1e-3
  assert set(p['conv_0']) == {'kernel', 'bias'} and set(p['conv_4']) == {'kernel', 'bias'}
  assert all(set(p[f'conv_{l}']) == {'kernel'} for l in (1, 2, 3))     # no bias before BatchNorm
  scales = np.concatenate([p[f'norm_{l}']['scale'] for l in (1, 2, 3)])
  assert abs(scales.mean() - 1) < 5e-3 and abs(scales.std() - 0.02) < 5e-3
  for l in (1, 2, 3):
    np.testing.assert_array_equal(p[f'norm_{l}']['bias'], 0)
    np.testing.assert_array_equal(st[f'norm_{l}']['mean'], 0)           # init in train mode: stats untouched
    np.testing.assert_array_equal(st[f'norm_{l}']['var'], 1)
  bound = 1 / np.sqrt(4 * 4 * 3)                                        # conv biases: torch default U(+-bound)
  assert np.all(np.abs(p['conv_0']['bias']) <= bound) and p['conv_0']['bias'].std() > bound / 4


@pytest.mark.parametrize('ndf,n_layers,norm,size', [(8, 3, 'batch', 64), (8, 2, 'batch', 32), (32, 3, 'group', 32),
                                                    (8, 3, 'none', 32)])
def test_eval_parity_with_torch(ndf, n_layers, norm, size):
  cfg, tm, sd = _pair(ndf, n_layers, norm)
  variables = import_taming_discriminator(sd, cfg)
  x = _images(3, size, seed=1)
  tm.eval()
  with torch.no_grad():
    want = _nhwc(tm(_nchw(x)))
  got = NLayerDiscriminator(cfg).apply(variables, jnp.asarray(x), False)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_train_mode_batchnorm_parity_with_torch():
  """Train mode: outputs, the updated running stats (torch: unbiased variance) and input gradients match."""
  cfg, tm, sd = _pair(8, 3, 'batch', seed=2)
  variables = import_taming_discriminator(sd, cfg)
  x = _images(4, 32, seed=3)
  tm.train()
  xt = _nchw(x).requires_grad_(True)
  out_t = tm(xt)
  (-out_t.mean()).backward()
  model = NLayerDiscriminator(cfg)

  def g_loss(xx):
    out, upd = model.apply(variables, xx, True, mutable=['batch_stats'])
    return -jnp.mean(out), (out, upd)

  (_, (out, upd)), dx = jax.jit(jax.value_and_grad(g_loss, has_aux=True))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(out), _nhwc(out_t), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(dx), _nhwc(xt.grad), atol=1e-6, rtol=1e-4)
  new = import_taming_discriminator(tm.state_dict(), cfg)['batch_stats']
  for l in (1, 2, 3):
    for k in ('mean', 'var'):
      before = variables['batch_stats'][f'norm_{l}'][k]
      after = np.asarray(upd['batch_stats'][f'norm_{l}'][k])
      assert not np.allclose(after, before)
      np.testing.assert_allclose(after, new[f'norm_{l}'][k], atol=1e-5, rtol=1e-5)
  # params are untouched and train-mode output differs from eval-mode output
  assert not np.allclose(np.asarray(model.apply(variables, jnp.asarray(x), False)), np.asarray(out))


def test_train_mode_under_jit_updates_stats_each_call():
  cfg, _, sd = _pair(8, 2, 'batch')
  model = NLayerDiscriminator(cfg)
  x = jnp.asarray(_images(2, 32))
  v = import_taming_discriminator(sd, cfg)
  step = jax.jit(lambda v, x: model.apply(v, x, True, mutable=['batch_stats']))
  _, s1 = step(v, x)
  _, s2 = step({'params': v['params'], **s1}, x)
  m0, m1, m2 = (np.asarray(s['batch_stats']['norm_1']['mean']) for s in (v, s1, s2))
  np.testing.assert_allclose(m2 - m1, 0.9 * (m1 - m0), rtol=1e-4, atol=1e-7)   # same batch: geometric approach
  with pytest.raises(Exception):                          # train mode without a mutable batch_stats collection
    model.apply(v, x, True)


def test_bf16_compute_close_to_f32():
  cfg, _, sd = _pair(8, 3, 'batch')
  v = import_taming_discriminator(sd, cfg)
  x = jnp.asarray(_images(2, 32))
  f32 = NLayerDiscriminator(cfg).apply(v, x, False)
  bf16 = NLayerDiscriminator(cfg, dtype=jnp.bfloat16).apply(v, x, False)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), atol=0.05 * float(jnp.max(jnp.abs(f32))))


def test_import_errors_name_keys():
  cfg, _, sd = _pair(8, 3, 'batch')
  bad = dict(sd)
  del bad['main.5.weight']
  bad['main.3.running_var'] = torch.zeros(5)
  bad['main.99.weight'] = torch.zeros(2)
  with pytest.raises(DiscriminatorMismatchError) as e:
    import_taming_discriminator(bad, cfg)
  msg = str(e.value)
  assert "'main.5.weight'" in msg and '(32, 16, 4, 4)' in msg
  assert "'main.3.running_var'" in msg and '(16,)' in msg and '(5,)' in msg
  assert "'main.99.weight'" in msg
  # a GroupNorm config does not accept the BatchNorm checkpoint (conv biases missing, running stats unexpected)
  with pytest.raises(DiscriminatorMismatchError, match='main.2.bias'):
    import_taming_discriminator(sd, DiscriminatorConfig(ndf=8, n_layers=3, norm='none'))


def test_import_prefix_and_optional_num_batches_tracked():
  cfg, _, sd = _pair(8, 2, 'batch')
  full = {f'loss.discriminator.{k}': v for k, v in sd.items() if not k.endswith('num_batches_tracked')}
  full['encoder.conv_in.weight'] = torch.zeros(1)
  v = import_taming_discriminator(full, cfg, strip_prefix='loss.discriminator.')
  np.testing.assert_array_equal(v['params']['conv_0']['kernel'],
                                np.transpose(sd['main.0.weight'].numpy(), (2, 3, 1, 0)))
  np.testing.assert_array_equal(v['batch_stats']['norm_2']['var'], sd['main.6.running_var'].numpy())


def test_config_validation():
  with pytest.raises(ValueError, match='norm'):
    DiscriminatorConfig(norm='actnorm')
  with pytest.raises(ValueError, match='divisible by 32'):
    DiscriminatorConfig(ndf=8, norm='group')
