"""LPIPS-VGG against an independent torch implementation of the lpips package's forward (random weights written in
torchvision's and lpips's key layouts), input gradients included; the converted .safetensors round trip; bad keys."""
import copy
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from conftest import REPO, nchw_to_nhwc, rel_err
from var_jax.interop import lpips as lpips_io
from var_jax.models import lpips as lp

import torch  # noqa: E402  (the [torch] extra; a missing torch must fail, not skip)
tnn = torch.nn

B = 2


# ----------------------------------------------------------------------------- torch reference (lpips package form)
class TorchVGG16(tnn.Module):
  """torchvision vgg16: ``features`` (cfg 'D') plus a stand-in ``classifier`` whose keys the loader must ignore."""

  def __init__(self):
    super().__init__()
    layers, cin = [], 3
    for v in [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M']:
      if v == 'M':
        layers.append(tnn.MaxPool2d(kernel_size=2, stride=2))
      else:
        layers += [tnn.Conv2d(cin, v, kernel_size=3, padding=1), tnn.ReLU(inplace=False)]
        cin = v
    self.features = tnn.Sequential(*layers)
    self.classifier = tnn.Sequential(tnn.Linear(8, 4), tnn.ReLU(), tnn.Linear(4, 2))


class NetLinLayer(tnn.Module):
  def __init__(self, c):
    super().__init__()
    self.model = tnn.Sequential(tnn.Dropout(), tnn.Conv2d(c, 1, 1, stride=1, padding=0, bias=False))

  def forward(self, x):
    return self.model(x)


class TorchLPIPS(tnn.Module):
  """lpips.LPIPS(net='vgg', lpips=True, version='0.1').forward(in0, in1) in eval mode."""

  def __init__(self, vgg):
    super().__init__()
    f = vgg.features
    self.slices = tnn.ModuleList([f[0:4], f[4:9], f[9:16], f[16:23], f[23:30]])
    self.register_buffer('shift', torch.tensor([-.030, -.088, -.188])[None, :, None, None])
    self.register_buffer('scale', torch.tensor([.458, .448, .450])[None, :, None, None])
    self.lins = tnn.ModuleList([NetLinLayer(c) for c in (64, 128, 256, 512, 512)])

  def feats(self, x):
    out = []
    for s in self.slices:
      x = s(x)
      out.append(x)
    return out

  def forward(self, in0, in1):
    f0 = self.feats((in0 - self.shift) / self.scale)
    f1 = self.feats((in1 - self.shift) / self.scale)
    val = 0
    for k in range(5):
      n0 = f0[k] / (torch.sqrt(torch.sum(f0[k] ** 2, dim=1, keepdim=True)) + 1e-10)
      n1 = f1[k] / (torch.sqrt(torch.sum(f1[k] ** 2, dim=1, keepdim=True)) + 1e-10)
      val = val + self.lins[k]((n0 - n1) ** 2).mean([2, 3], keepdim=True)
    return val


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """(torch model, vgg .pth path, lin .pth path): VGG-like statistics (kaiming-normal convs), lin weights >= 0."""
  torch.manual_seed(0)
  vgg = TorchVGG16()
  with torch.no_grad():
    for m in vgg.features:
      if isinstance(m, tnn.Conv2d):
        tnn.init.kaiming_normal_(m.weight, nonlinearity='relu')
        m.bias.normal_(0, 0.05)
  model = TorchLPIPS(vgg)
  with torch.no_grad():
    for lin in model.lins:
      lin.model[1].weight.uniform_(0, 0.1)
  model.eval()
  d = tmp_path_factory.mktemp('lpips')
  vgg_path, lin_path = str(d / 'vgg16.pth'), str(d / 'vgg_lin.pth')
  torch.save(vgg.state_dict(), vgg_path)
  lin_sd = {f'lin{k}.{n}': t for k, lin in enumerate(model.lins) for n, t in lin.state_dict().items()}
  torch.save(lin_sd, lin_path)
  return model, vgg_path, lin_path


@pytest.fixture(scope='module')
def params(reference):
  _, vgg_path, lin_path = reference
  return lpips_io.load_lpips_params(vgg_path, lin_path)


def _images(seed, size=32):
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-1, 1, (B, 3, size, size)).astype(np.float32)
  x1 = np.clip(x0 + 0.3 * rng.standard_normal(x0.shape), -1, 1).astype(np.float32)   # related images, like recon
  return x0, x1


def _torch_value_and_grads(model, x0, x1, dtype):
  m = copy.deepcopy(model).to(dtype)
  t0, t1 = (torch.from_numpy(x).to(dtype).requires_grad_(True) for x in (x0, x1))
  out = m(t0, t1)
  out.sum().backward()
  return out.detach().numpy(), nchw_to_nhwc(t0.grad.numpy()), nchw_to_nhwc(t1.grad.numpy())


def _jax_value_and_grads(params, j0, j1, dtype):
  def loss(p, a, b):
    out = lp.lpips_distance(p, a, b, dtype=dtype)
    return out.sum(), out

  @jax.jit
  def run(p, a, b):
    (_, out), grads = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(p, a, b)
    return out, grads
  out, (g0, g1) = run(params, j0.astype(dtype), j1.astype(dtype))
  return out, g0, g1


def test_forward_and_input_grads_match_reference(reference, params):
  model, _, _ = reference

  # float32, as training runs it (2 x 32x32): forward within 1e-4, input gradients within 1e-3 (max-abs relative).
  # Gradients are compared on 32x32 images: a pre-activation within float32 rounding of 0 (~1e-7 of the layer's
  # scale) can land on the other side of a ReLU in two float32 implementations (XLA:CPU's conv sums in a different
  # order from oneDNN's); such a kink moves the gradient by up to ~1e-2 (max-abs relative) although both are right.
  # At 64x64 that happened for 4 of 6 seeds, at 32x32 for none. The exact-math check is the float64 run below.
  x0, x1 = _images(1, 32)
  ref, r0, r1 = _torch_value_and_grads(model, x0, x1, torch.float32)
  assert ref.shape == (B, 1, 1, 1)
  out, g0, g1 = _jax_value_and_grads(params, nchw_to_nhwc(x0), nchw_to_nhwc(x1), jnp.float32)
  assert out.shape == (B, 1, 1, 1) and out.dtype == jnp.float32
  e_fwd, e_g = rel_err(out, ref), max(rel_err(g0, r0), rel_err(g1, r1))
  print(f'\nlpips {np.ravel(ref)}; float32 32x32: forward rel err {e_fwd:.1e}, input grads rel err {e_g:.1e}')
  assert e_fwd < 1e-4 and e_g < 1e-3

  # float64 on both sides (2 x 64x64): no ReLU near-ties, so forward and input gradients agree to ~1e-7 (bounded by
  # the reference's float32 shift/scale buffers).
  x0, x1 = _images(1, 64)
  ref, r0, r1 = _torch_value_and_grads(model, x0, x1, torch.float64)
  with jax.enable_x64(True):
    out, g0, g1 = _jax_value_and_grads(params, nchw_to_nhwc(x0), nchw_to_nhwc(x1), jnp.float64)
    assert out.dtype == jnp.float64
  e_fwd, e_g = rel_err(out, ref), max(rel_err(g0, r0), rel_err(g1, r1))
  print(f'lpips {np.ravel(ref)}; float64 64x64: forward rel err {e_fwd:.1e}, input grads rel err {e_g:.1e}')
  assert e_fwd < 1e-6 and e_g < 1e-6


def test_output_variants(params):
  x0, x1 = _images(3)
  j0, j1 = nchw_to_nhwc(x0[:, :, :16, :24]), nchw_to_nhwc(x1[:, :, :16, :24])   # smallest height; odd pools in W

  @jax.jit
  def run(p, a, b):
    return (lp.LPIPS().apply({'params': p}, a, b),
            lp.LPIPS(keepdims=False).apply({'params': p}, a, b),
            lp.LPIPS().apply({'params': p}, a, b, method=lp.LPIPS.per_layer),
            lp.LPIPS(keepdims=False, normalize=True).apply({'params': p}, (a + 1) / 2, (b + 1) / 2),
            lp.lpips_distance(p, a, a, keepdims=False),
            jax.grad(lambda q: lp.lpips_distance(q, a, b).sum())(p))
  out, flat, terms, half, same, pgrad = run(params, j0, j1)
  assert out.shape == (B, 1, 1, 1) and flat.shape == (B,)
  np.testing.assert_allclose(flat, np.ravel(out), rtol=1e-6)
  assert len(terms) == 5 and all(t.shape == (B,) for t in terms)
  np.testing.assert_allclose(sum(terms), flat, rtol=1e-5)
  np.testing.assert_allclose(half, flat, rtol=1e-5)
  np.testing.assert_allclose(same, np.zeros(B, np.float32), atol=1e-12)   # batch positions may round apart
  assert all(float(jnp.abs(l).max()) == 0.0 for l in jax.tree.leaves(pgrad))   # lpips_distance: params are frozen


def test_init_matches_converted_layout(params):
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  v = jax.eval_shape(lp.LPIPS().init, jax.random.key(0), x, x)
  assert jax.tree.map(lambda a: a.shape, meta.unbox(v['params'])) == jax.tree.map(np.shape, params)
  assert [i for i, _, _ in lp.vgg16_convs()] == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
  assert sorted(params['net']) == sorted(f'conv_{i}' for i, _, _ in lp.vgg16_convs())
  small = jax.ShapeDtypeStruct((1, 8, 32, 3), jnp.float32)
  with pytest.raises(ValueError, match='at least 16x16'):
    jax.eval_shape(lp.LPIPS().init, jax.random.key(0), small, small)


def test_safetensors_round_trip_and_cli(reference, params, tmp_path):
  _, vgg_path, lin_path = reference
  out = tmp_path / 'lpips_vgg.safetensors'
  lpips_io.save_lpips_params(params, out)
  back = lpips_io.load_converted(out)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  from safetensors.numpy import load_file
  assert set(load_file(str(out))) == {'/'.join(p) for _, _, p in lpips_io.param_table()}
  assert 'net/conv_28/kernel' in load_file(str(out))

  cli_out = tmp_path / 'cli.safetensors'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-m', 'var_jax.interop.lpips', f'--vgg={vgg_path}', f'--lin={lin_path}',
                      f'--out={cli_out}'], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  jax.tree.map(np.testing.assert_array_equal, lpips_io.load_converted(cli_out), params)


def test_bad_keys_raise(reference, tmp_path):
  _, vgg_path, lin_path = reference
  vgg_sd = torch.load(vgg_path, weights_only=True)
  lin_sd = torch.load(lin_path, weights_only=True)

  bad = dict(vgg_sd)
  del bad['features.17.weight']
  p = tmp_path / 'missing.pth'
  torch.save(bad, p)
  with pytest.raises(ValueError, match=r"missing keys \['features\.17\.weight'\]"):
    lpips_io.load_lpips_params(str(p), lin_path)

  bad = dict(lin_sd)
  bad['lin3.model.1.weight'] = torch.zeros(1, 256, 1, 1)
  p = tmp_path / 'shape.pth'
  torch.save(bad, p)
  with pytest.raises(ValueError, match=r"'lin3\.model\.1\.weight' has shape \(1, 256, 1, 1\), expected \(1, 512, "):
    lpips_io.load_lpips_params(vgg_path, str(p))

  bad = {k.replace('model.1', 'model.0'): v for k, v in lin_sd.items()}
  p = tmp_path / 'renamed.pth'
  torch.save(bad, p)
  with pytest.raises(ValueError, match='missing keys'):
    lpips_io.load_lpips_params(vgg_path, str(p))

  st = tmp_path / 'bad.safetensors'
  from safetensors.numpy import save_file
  save_file({'net/conv_0/kernel': np.zeros((3, 3, 3, 64), np.float32)}, str(st))
  with pytest.raises(ValueError, match='missing'):
    lpips_io.load_converted(st)
