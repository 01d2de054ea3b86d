"""FID Inception-v3 against an independent torch implementation of pytorch-fid's network (its ``InceptionV3(
[3], resize_input=True, normalize_input=True, use_fid_inception=True)`` plus the 1008-way fc) with the same random
weights and BatchNorm statistics; the converted-file round trip, the CLI and the errors for bad keys / shapes.

pytorch-fid itself subclasses torchvision's Inception blocks, and torchvision's PyPI wheels need a CUDA torch (the
CPU-only one does not import beside torch 2.13.0+cpu), so the reference below re-writes the network in plain torch.nn
following torchvision's ``Inception3`` and pytorch-fid's ``FIDInceptionA/C/E_1/E_2`` patches (state_dict keys are
those of the released ``pt_inception-2015-12-05-6726825d.pth``).
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import REPO, rel_err
from var_jax.eval import inception as inc
from var_jax.interop.state_dict import CheckpointMismatchError, load_state_dict, save_state_dict

import torch  # noqa: E402  (the [torch] extra; a missing torch must fail, not skip)
import torch.nn.functional as F  # noqa: E402
tnn = torch.nn

B = 2


# ----------------------------------------------------------------------------- torch reference (pytorch-fid form)
class BasicConv2d(tnn.Module):
  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = tnn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = tnn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg_no_pad(x):   # pytorch-fid's patch: TF's average pool ignores the padding
  return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(tnn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_no_pad(x))], 1)


class InceptionB(tnn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(tnn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_no_pad(x))], 1)


class InceptionD(tnn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(tnn.Module):
  """``max_pool=False``: FIDInceptionE_1 (average pool without padding); True: FIDInceptionE_2 (3x3/1 max pool)."""

  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_no_pad(x)
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class TorchFIDInception(tnn.Module):
  """pytorch-fid ``InceptionV3([3], resize_input, normalize_input)`` over ``fid_inception_v3()``; forward returns
  (pool3 (B, 2048), fc logits (B, 1008)). Attribute names = torchvision Inception3 / the released .pth keys."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = FIDInceptionA(192, 32)
    self.Mixed_5c = FIDInceptionA(256, 64)
    self.Mixed_5d = FIDInceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, 128)
    self.Mixed_6c = FIDInceptionC(768, 160)
    self.Mixed_6d = FIDInceptionC(768, 160)
    self.Mixed_6e = FIDInceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    self.fc = tnn.Linear(2048, 1008)

  def forward(self, x, resize_input=True, normalize_input=True):
    if resize_input:
      x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    if normalize_input:
      x = 2 * x - 1
    x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), kernel_size=3, stride=2)
    x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
    for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
      x = getattr(self, f'Mixed_{name}')(x)
    pool3 = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
    return pool3, self.fc(pool3)


def _to_torch(images_u8):
  """What pytorch-fid feeds its network: ``ToTensor`` (uint8 / 255, CHW) on NHWC uint8 images."""
  return torch.from_numpy(np.ascontiguousarray(np.transpose(images_u8, (0, 3, 1, 2)))).float() / 255


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """(torch model in eval mode, .pth path of its state_dict, that state_dict as numpy). Random weights with
  non-trivial BatchNorm: kaiming-normal convs, scale ~ U(0.5, 1.5), bias ~ N(0, 0.2), running_mean ~ N(0, 0.3),
  running_var ~ U(0.5, 2), num_batches_tracked as torch saves them (the loader must ignore them)."""
  torch.manual_seed(0)
  model = TorchFIDInception()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, tnn.Conv2d):
        tnn.init.kaiming_normal_(m.weight, nonlinearity='relu')
      elif isinstance(m, tnn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.2)
        m.running_mean.normal_(0, 0.3)
        m.running_var.uniform_(0.5, 2.0)
        m.num_batches_tracked.fill_(1000)
    model.fc.weight.normal_(0, 0.05)
    model.fc.bias.normal_(0, 0.5)
  model.eval()
  path = str(tmp_path_factory.mktemp('fid_inception') / 'pt_inception_random.pth')
  torch.save(model.state_dict(), path)
  return model, path, load_state_dict(path)


@pytest.fixture(scope='module')
def params(reference):
  return inc.load_inception_params(reference[1])


def _images(seed, h, w):
  return np.random.default_rng(seed).integers(0, 256, (B, h, w, 3), dtype=np.uint8)


def test_features_and_logits_match_reference(reference, params):
  model, _, _ = reference
  fn = inc.make_feature_fn(params)
  fn_bias = inc.make_feature_fn(params, fc_bias=True)
  fc_w = model.fc.weight.detach().numpy().astype(np.float64)
  for seed, (h, w) in enumerate([(64, 64), (32, 48)]):
    u8 = _images(seed, h, w)
    with torch.no_grad():
      ref_pool, ref_logits = (t.numpy() for t in model(_to_torch(u8)))
    pool3, logits_unbiased = fn(u8)
    _, logits = fn_bias(u8)
    assert pool3.shape == (B, 2048) and logits.shape == logits_unbiased.shape == (B, 1008)
    assert pool3.dtype == logits.dtype == jnp.float32
    e_pool, e_log = rel_err(pool3, ref_pool), rel_err(logits, ref_logits)
    e_unb = rel_err(logits_unbiased, ref_pool.astype(np.float64) @ fc_w.T)
    print(f'\n{h}x{w}: pool3 in [{ref_pool.min():.3g}, {ref_pool.max():.3g}], logits std {ref_logits.std():.3g}; '
          f'rel err pool3 {e_pool:.1e}, logits {e_log:.1e}, unbiased logits {e_unb:.1e}')
    assert e_pool < 1e-4 and e_log < 1e-4 and e_unb < 1e-4
    assert ref_pool.std() > 0.1 and ref_logits.std() > 0.1   # not a degenerate (all-zero / saturated) network
    # float input in [0, 1] is the same as the uint8 path
    assert rel_err(fn(u8.astype(np.float32) / 255)[0], pool3) < 1e-6
  # the BatchNorm statistics are used: identity statistics give other features (same compiled network)
  flat = traverse_util.flatten_dict(params)
  no_stats = traverse_util.unflatten_dict({k: (np.zeros_like(v) if k[-1] == 'mean' else np.ones_like(v)
                                                if k[-1] == 'var' else v) for k, v in flat.items()})
  assert rel_err(inc.make_feature_fn(no_stats)(u8)[0], pool3) > 0.1


@pytest.mark.slow   # a second compile (~8 s on a loaded box) for the odd-size path
def test_no_resize_path(reference, params):
  """resize_input=False at the network's own size (80x96: odd feature maps in every pool and stride-2 conv)."""
  model, _, _ = reference
  u8 = _images(5, 80, 96)
  with torch.no_grad():
    ref_pool, ref_logits = (t.numpy() for t in model(_to_torch(u8), resize_input=False))
  out = jax.jit(lambda p, x: inc.apply(p, x, resize_input=False))(params, u8)
  e_pool, e_log = rel_err(out['pool3'], ref_pool), rel_err(out['logits'], ref_logits)
  print(f'\n80x96 without resize: rel err pool3 {e_pool:.1e}, logits {e_log:.1e}')
  assert e_pool < 1e-4 and e_log < 1e-4


def test_input_checks(params):
  u8 = _images(5, 64, 64)
  with pytest.raises(ValueError, match='at least 75x75'):
    jax.eval_shape(lambda p, x: inc.apply(p, x, resize_input=False), params, u8)
  with pytest.raises(ValueError, match='NHWC RGB'):
    jax.eval_shape(inc.apply, params, u8[..., :1])


def test_extract_features_batching(params):
  """Arrays and iterables of uneven batches, padded to the batch size: same features as one call per batch."""
  images = np.random.default_rng(7).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
  fn = inc.make_feature_fn(params)
  want_pool = np.concatenate([np.asarray(fn(images[:2])[0]), np.asarray(fn(np.concatenate([images[2:]] * 2))[0][:1])])
  pool, logits = inc.extract_features(params, images, batch_size=2)
  assert isinstance(pool, np.ndarray) and pool.shape == (3, 2048) and logits.shape == (3, 1008)
  np.testing.assert_allclose(pool, want_pool, rtol=1e-5, atol=1e-6)
  pool_it, logits_it = inc.extract_features(params, iter([images[:1], images[1:3]]), batch_size=2)
  np.testing.assert_allclose(pool_it, pool, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits_it, logits, rtol=1e-5, atol=1e-6)
  empty_pool, empty_logits = inc.extract_features(params, iter([]), batch_size=2)
  assert empty_pool.shape == (0, 2048) and empty_logits.shape == (0, 1008)


def test_layout_matches_module(params):
  v = jax.eval_shape(inc.InceptionV3().init, jax.random.key(0), jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.uint8))
  assert jax.tree.map(lambda a: a.shape, v['params']) == jax.tree.map(np.shape, params)
  assert len(inc.param_table()) == 94 * 5 + 2      # 94 BasicConv2d (conv + 4 BN tensors) and the fc


def test_converted_round_trip(reference, params, tmp_path):
  _, path, sd = reference
  # export gives back the torch state_dict exactly (num_batches_tracked is not part of the model here)
  back = inc.params_to_state_dict(params)
  assert list(back) == [k for k in sd if not k.endswith('num_batches_tracked')]
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  for name in ('fid_inception.safetensors', 'fid_inception.npz'):
    out = tmp_path / name
    converted = inc.convert_inception(path, out)
    loaded = inc.load_inception_params(out)
    for a, b, c in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), jax.tree.leaves(converted)):
      assert a.dtype == np.float32
      np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(c, b)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
  # the torch state_dict re-saved as .safetensors (torch keys) is read too
  save_state_dict(sd, str(tmp_path / 'torch_keys.safetensors'))
  for a, b in zip(jax.tree.leaves(inc.load_inception_params(tmp_path / 'torch_keys.safetensors')),
                  jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow   # ~20 s on a loaded 2-core box, mostly the subprocess importing jax and torch
def test_cli(reference, params, tmp_path):
  _, path, _ = reference
  cli_out = tmp_path / 'cli.safetensors'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-m', 'var_jax.eval.inception', f'--pth={path}', f'--out={cli_out}'],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert 'wrote' in r.stdout
  for a, b in zip(jax.tree.leaves(inc.load_inception_params(cli_out)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_errors_name_file_and_key(reference, tmp_path):
  _, _, sd = reference
  renamed = dict(sd)
  renamed['Mixed_6b.branch7x7_2.conv.weigth'] = renamed.pop('Mixed_6b.branch7x7_2.conv.weight')
  bad = str(tmp_path / 'renamed.pth')
  save_state_dict(renamed, bad)
  with pytest.raises(CheckpointMismatchError) as e:
    inc.load_inception_params(bad)
  msg = str(e.value)
  assert bad in msg and "missing key 'Mixed_6b.branch7x7_2.conv.weight'" in msg
  assert "unexpected key 'Mixed_6b.branch7x7_2.conv.weigth'" in msg
  # a (7, 1) kernel where a (1, 7) one belongs
  transposed = dict(sd)
  transposed['Mixed_6b.branch7x7_2.conv.weight'] = np.swapaxes(sd['Mixed_6b.branch7x7_2.conv.weight'], 2, 3)
  bad = str(tmp_path / 'shape.pth')
  save_state_dict(transposed, bad)
  with pytest.raises(CheckpointMismatchError, match=r"shape.pth.*\n.*'Mixed_6b.branch7x7_2.conv.weight': expected "
                     r'shape \(128, 128, 1, 7\), found \(128, 128, 7, 1\)'):
    inc.load_inception_params(bad)
  # torchvision's ImageNet Inception is not the FID one
  tv = dict(sd, **{'fc.weight': np.zeros((1000, 2048), np.float32), 'fc.bias': np.zeros(1000, np.float32)})
  with pytest.raises(CheckpointMismatchError, match='torchvision'):
    inc.params_from_state_dict(tv, 'tv.pth')
  # converted files are checked too
  flat = traverse_util.flatten_dict(inc.params_from_state_dict(sd), sep='/')
  flat['fc/kernel'] = flat['fc/kernel'][:, :1000]
  np.savez(tmp_path / 'bad.npz', **flat)
  with pytest.raises(CheckpointMismatchError, match=r"bad.npz.*\n.*'fc/kernel': expected shape \(2048, 1008\)"):
    inc.load_inception_params(tmp_path / 'bad.npz')
  # no weights: an error that says where to get them (never a download)
  for missing in (None, str(tmp_path / 'nope.pth')):
    with pytest.raises(FileNotFoundError, match='pt_inception-2015-12-05-6726825d.pth'):
      inc.load_inception_params(missing)
