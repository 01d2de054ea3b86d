"""BiGR (backbone, transcoder, Bernoulli diffusion, training loss, probe features) against the reference fixtures.

The fixture ``bigr_k8`` comes from the official haoosz/BiGR code (float32, CPU) with every parameter re-drawn at
random and all randomness made explicit (see ../shared/fixtures/elm_bigr_reference/README.md).
"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util
from flax.core import meta

from conftest import SHARED
from var_jax.interop import bigr as ib
from var_jax.losses.bigr import sample_training_inputs, training_loss, training_mask_count
from var_jax.losses.diffusion import loss_terms
from var_jax.models import bernoulli_diffusion as bd
from var_jax.models.bigr import BiGR, BiGRConfig, bigr_config

FIX = SHARED / 'fixtures' / 'elm_bigr_reference' / 'bigr_k8'
TOL = 1e-4


@pytest.fixture(scope='module')
def ref():
  io = dict(np.load(FIX / 'io.npz'))
  cj = json.loads((FIX / 'config.json').read_text())
  cfg, variables = ib.load_bigr(FIX / 'bigr.pt', **cj['model_args'])
  return cfg, BiGR(cfg), jax.tree.map(jnp.asarray, variables), io


def _maxerr(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_config_from_model_args():
  cj = json.loads((FIX / 'config.json').read_text())
  cfg = BiGRConfig.from_model_args(**cj['model_args'])
  assert cfg.model_args() == cj['model_args']
  assert cfg.ffn_hidden_dim == 192 and cfg.num_class_rows == 11 and cfg.null_class == 10
  with pytest.raises(ValueError, match='bogus, other'):
    BiGRConfig.from_model_args(dim=64, n_head=4, other=1, bogus=2)
  assert BiGRConfig() == BiGRConfig.from_model_args()   # defaults are the reference's
  with pytest.raises(ValueError, match='cls_token_num'):
    BiGRConfig(dim=64, n_head=4, use_adaLN=True, cls_token_num=2)
  assert bigr_config('BiGR-XL', binary_size=24).ffn_hidden_dim == 3584


def test_schedule_buffers(ref):
  cfg, _, _, io = ref
  s = bd.make_schedule(cfg.n_sample_steps)
  for name in ('k_final', 'b_final', 'beta'):
    np.testing.assert_array_equal(s[name], io[f'sched_{name}'], err_msg=name)
  sd = ib.load_bigr_state_dict(FIX / 'bigr.pt')
  for name in ib.SCHED_NAMES:
    np.testing.assert_array_equal(s[name], sd[ib.SCHED_PREFIX + name], err_msg=name)
  # closed forms of the 'linear' schedule: beta_t = 1 - 1/(T-t+1), k_t = prod beta, b_t = (1 - k_t)/2
  T = cfg.n_sample_steps
  t = np.arange(1, T + 1)
  np.testing.assert_allclose(s['beta'][1:], 1 - 1 / (T - t + 1), atol=1e-7)
  np.testing.assert_allclose(s['k_final'][1:], np.cumprod(1 - 1 / (T - t + 1)), atol=1e-6)
  np.testing.assert_allclose(s['b_final'], (1 - s['k_final']) / 2, atol=1e-6)
  assert s['k_final'][T] == 0 and s['b_final'][T] == 0.5
  # the other schedules the reference defines: x_T is pure noise too
  for bt in ('cos', 'sigmoid'):
    o = bd.make_schedule(64, bt)
    assert o['k_final'][0] == 1 and abs(o['k_final'][-1]) < 1e-6 and o['beta'][-1] == 0
    np.testing.assert_allclose(o['cumbeta'], o['k_final'], atol=1e-5)
  np.testing.assert_array_equal(bd.sampling_steps(256, 10), [256, 227, 199, 171, 142, 114, 86, 57, 29, 1])
  np.testing.assert_array_equal(bd.sampling_steps(8, 8), np.arange(8, 0, -1))


def test_backbone_intermediates(ref):
  cfg, model, variables, io = ref
  z, inter = model.apply(variables, io['inp'], io['labels'], io['token_all_mask'], return_intermediates=True,
                         method=BiGR.backbone)
  assert _maxerr(inter['embedded_input'], io['embedded_input']) < TOL
  assert _maxerr(inter['adaln_cond'], io['adaln_cond']) < TOL
  assert len(inter['hidden']) == cfg.n_layer
  for l, h in enumerate(inter['hidden']):
    assert _maxerr(h, io[f'hidden_layer{l}']) < TOL, l
  assert _maxerr(z, io['backbone_out']) < TOL
  # the masked rows are exactly mask_tok
  m = io['token_all_mask'].astype(bool)
  mask_tok = variables['params']['mask_tok']
  np.testing.assert_array_equal(np.asarray(inter['embedded_input'])[:, 1:][m], np.broadcast_to(mask_tok, (m.sum(), 64)))


def test_transcoder(ref):
  cfg, model, variables, io = ref
  zf = io['backbone_out'].reshape(-1, cfg.dim)
  out = model.apply(variables, io['transcoder_xt'], io['transcoder_t'], zf, method=BiGR.transcoder)
  assert _maxerr(out, io['transcoder_logits']) < TOL
  out = model.apply(variables, io['train_xt_in'], io['train_t'], zf, method=BiGR.transcoder)
  assert _maxerr(out, io['transcoder_train_out']) < TOL
  # __call__ runs backbone + transcoder teacher-forced
  b, n, k = io['inp'].shape
  z, logits = model.apply(variables, io['inp'], io['labels'], io['token_all_mask'], io['train_xt_in'].reshape(b, n, k),
                          io['train_t'].reshape(b, n))
  assert _maxerr(logits.reshape(-1, k), io['transcoder_train_out']) < TOL


def test_training_loss(ref):
  cfg, model, variables, io = ref
  args = (io['inp'], io['labels'], io['token_all_mask'], io['train_t'], io['train_u'])
  loss, st = model.apply(variables, *args, force_drop_ids=jnp.zeros((2,), jnp.int32), method=BiGR.loss)
  np.testing.assert_array_equal(st['x_t'], io['train_xt_in'])
  assert _maxerr(st['logits'], io['transcoder_train_out']) < TOL
  assert _maxerr(st['loss_all'], io['train_loss_all']) < TOL
  assert abs(float(loss) - float(io['train_loss'])) < TOL
  assert abs(float(st['bce_loss']) - float(io['train_bce_loss'])) < TOL
  assert float(st['acc']) == float(io['train_acc'])
  # without dropping no label is dropped (eval-mode embedding), so force_drop_ids=None is the same forward
  loss0, _ = model.apply(variables, *args, method=BiGR.loss)
  assert float(loss0) == float(loss)
  loss_drop, _ = model.apply(variables, *args, force_drop_ids=jnp.asarray(io['train_drop_ids']), method=BiGR.loss)
  assert abs(float(loss_drop) - float(io['train_loss_drop'])) < TOL
  # the same with the null class given directly
  lab = np.where(io['train_drop_ids'] == 1, cfg.null_class, io['labels'])
  loss_null, _ = model.apply(variables, io['inp'], lab, *args[2:], method=BiGR.loss)
  assert float(loss_null) == float(loss_drop)


@pytest.mark.parametrize('cond', ['null', 'label'])
def test_probe_features(ref, cond):
  cfg, model, variables, io = ref
  labels = np.full_like(io['labels'], cfg.null_class) if cond == 'null' else io['labels']
  for l in range(cfg.n_layer):
    pooled, tokens = model.apply(variables, io['inp'], labels, l, method=BiGR.features)
    assert _maxerr(pooled, io[f'probe_{cond}_layer{l}']) < TOL, l
    if cond == 'null' and l == cfg.n_layer // 2:
      assert _maxerr(tokens, io[f'probe_null_tokens_layer{l}']) < TOL
  # an out-of-range layer index runs every block (the reference loop never breaks)
  pooled_all, _ = model.apply(variables, io['inp'], labels, -1, method=BiGR.features)
  assert _maxerr(pooled_all, io[f'probe_{cond}_layer{cfg.n_layer - 1}']) < TOL


# ----------------------------------------------------------------------------- loss variants vs torch
def _torch_loss_terms(logits, x0, x_t, t, sched, p_flip, focal, alpha, aux):
  """The per-bit loss of the reference's diffusion module, written out with torch primitives."""
  logits, x0, x_t = (torch.tensor(np.asarray(a)) for a in (logits, x0, x_t))
  t = torch.from_numpy(t).long()
  k_f, b_f, beta = (torch.from_numpy(sched[n]) for n in ('k_final', 'b_final', 'beta'))

  def focal_fn(l, y, a, g):
    p = torch.sigmoid(l)
    ce = F.binary_cross_entropy_with_logits(l, y, reduction='none')
    pt = (1 - (p * y + (1 - p) * (1 - y))).clamp(1e-6, 1 - 1e-6)
    out = ce * pt ** g
    if a == -1:
      w = (y.sum(-1) / y.shape[-1]).view(-1, 1)
      out = ((1 - w) * y + w * (1 - y) + 1.0 / y.shape[-1]) * out
    elif a > 0:
      out = (a * y + (1 - a) * (1 - y)) * out
    return out

  if p_flip:
    flipped = x_t * -logits + (1 - x_t) * logits
    if focal >= 0:
      bce = focal_fn(logits, torch.logical_xor(x0 > 0.5, x_t > 0.5).float(), alpha, focal)
    else:
      bce = F.binary_cross_entropy_with_logits(flipped, x0, reduction='none')
    logits = flipped
  else:
    bce = focal_fn(logits, x0, 0, focal) if focal >= 0 else F.binary_cross_entropy_with_logits(
        logits, x0, reduction='none')
  acc = ((logits > 0).float() == x0).float().mean()
  loss_all = bce
  if aux > 0:
    p0 = torch.sigmoid(logits)
    two = lambda a: torch.stack([a, 1 - a], -1)
    pe = k_f[t - 1].view(-1, 1, 1) * two(p0) + b_f[t - 1].view(-1, 1, 1)
    bt = beta[t].view(-1, 1, 1)
    q1 = two(x_t) * bt + 0.5 * (1 - bt)
    un = pe * q1
    un = (un / (un.sum(-1, keepdim=True) + 1e-6))[..., 0]
    ftr = (t == 1).float().view(-1, 1)
    pred = un * (1 - ftr) + p0 * ftr
    gt = (k_f[t - 1].view(-1, 1, 1) * two(x0) + b_f[t - 1].view(-1, 1, 1)) * q1
    gt = (gt / (gt.sum(-1, keepdim=True) + 1e-6))[..., 0]
    pred, gt = pred.clamp(1e-6, 1 - 1e-6), gt.clamp(0, 1)
    loss_all = aux * -(pred.log() * gt + (1 - gt) * (1 - pred).log()) + loss_all
  return loss_all.numpy(), bce.numpy(), float(acc)


@pytest.mark.parametrize('p_flip,focal,alpha,aux', [
    (True, 0.0, -1, 0.0), (True, -1.0, -1, 0.0), (False, -1.0, -1, 0.0), (False, 0.0, -1, 0.0),
    (True, 2.0, 0.25, 0.0), (False, 1.5, -1, 0.0), (True, 0.0, -1, 0.5), (False, -1.0, -1, 0.01)])
def test_loss_variants(p_flip, focal, alpha, aux):
  rng = np.random.default_rng(0)
  m, k, T = 40, 8, 32
  sched = bd.make_schedule(T)
  x0 = (rng.random((m, k)) < 0.5).astype(np.float32)
  t = rng.integers(1, T + 1, m).astype(np.int32)
  t[:3] = 1
  x_t = np.asarray(bd.q_sample(x0, t, rng.random((m, k)).astype(np.float32), sched))
  logits = (rng.standard_normal((m, k)) * 3).astype(np.float32)
  got = loss_terms(logits, x0, x_t, t, sched, p_flip=p_flip, focal=focal, alpha=alpha, aux=aux)
  want_all, want_bce, want_acc = _torch_loss_terms(logits, x0, x_t, t, sched, p_flip, focal, alpha, aux)
  np.testing.assert_allclose(got['loss_all'], want_all, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['bce_loss_all'], want_bce, rtol=1e-5, atol=1e-6)
  assert float(got['acc']) == want_acc
  assert ('aux_loss' in got) == (aux > 0)


def test_posterior_step():
  """posterior_probs against the two-state Bayes rule written out with float64 one-step products."""
  T = 50
  s = bd.make_schedule(T)
  rng = np.random.default_rng(1)
  p = rng.random((6, 5)).astype(np.float32)
  x_t = (rng.random((6, 5)) < 0.5).astype(np.float32)
  for t, tp in [(50, 41), (10, 9), (2, 1), (30, 5)]:
    got = np.asarray(bd.posterior_probs(p, x_t, t, tp, s))
    prod = np.prod(s['beta'][tp + 1:t + 1].astype(np.float64))
    like1 = prod * x_t + 0.5 * (1 - prod)          # P(x_t | x_tp = 1)
    like0 = prod * (1 - x_t) + 0.5 * (1 - prod)    # P(x_t | x_tp = 0) written as the [.,1] component
    prior1 = s['k_final'][tp] * p + s['b_final'][tp]
    prior0 = s['k_final'][tp] * (1 - p) + s['b_final'][tp]
    want = prior1 * like1 / (prior1 * like1 + prior0 * like0)
    np.testing.assert_allclose(got, want, atol=1e-5)
  # q(x_t | x0) probabilities
  np.testing.assert_allclose(bd.q_probs(np.ones((3, 2)), np.array([0, 25, 50]), s)[:, 0],
                             s['k_final'][[0, 25, 50]] + s['b_final'][[0, 25, 50]])


# ----------------------------------------------------------------------------- training randomness
def test_training_mask_count():
  for n in (16, 256, 1024):
    steps = np.arange(n)
    want = np.maximum(1, np.floor(n * np.cos(math.pi / 2 * steps / n)))
    got = np.asarray(training_mask_count(steps, n))
    assert np.abs(got - want).max() <= 1 and (got == want).mean() > 0.99
    assert got[0] == n and got.min() >= 1


def test_training_inputs_and_loss(ref):
  cfg, model, variables, io = ref

  def f(p, key):
    loss, stats = training_loss(model, p, key, io['inp'], io['labels'])
    draws = sample_training_inputs(jax.random.split(key, 3)[0], 2, 16, 8, cfg.n_sample_steps)   # the same draw
    return loss, (stats, draws)

  (loss, (stats, r)), g = jax.jit(jax.value_and_grad(f, has_aux=True))(variables, jax.random.key(3))
  assert np.isfinite(float(loss)) and 0 <= float(stats['acc']) <= 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
  assert float(np.abs(np.asarray(g['params']['mask_tok'])).sum()) > 0   # masked tokens feed the loss
  per_row = np.asarray(r['token_all_mask']).sum(1)
  assert per_row[0] == per_row[1] and 1 <= per_row[0] <= 16             # one count per batch
  t = np.asarray(r['t'])
  assert t.shape == (32,) and t.min() >= 1 and t.max() <= cfg.n_sample_steps and r['u'].shape == (32, 8)
  # the loss is the masked mean of the per-bit losses
  m = np.asarray(r['token_all_mask'], np.float64)[..., None] * np.ones(8)
  np.testing.assert_allclose(float(loss), (np.asarray(stats['loss_all']) * m).sum() / m.sum(), rtol=1e-5)


def _shapes(tree):
  return {k: v.shape for k, v in traverse_util.flatten_dict(meta.unbox(tree)).items()}


def test_init_matches_reference_layout(ref):
  cfg, model, variables, io = ref
  abstract = jax.eval_shape(model.init, jax.random.key(0), io['inp'], io['labels'])
  assert _shapes(abstract['params']) == _shapes(variables['params'])
  # initial values (a small model keeps this cheap): the reference's N(0, 0.02) Linear/Embedding weights, zero
  # biases, N(0, 1) mask_tok, N(0, 1/D) ada_gss, and zeros for the shared adaLN, the transcoder's modulations and its
  # output layer (so the initial logits are 0)
  small = BiGRConfig(dim=32, n_head=2, n_layer=1, multiple_of=32, num_classes=10, binary_size=4, block_size=4,
                     seq_len=4, denoise_hidden_dim=32, num_block_mlp=1, use_adaLN=True, n_sample_steps=8)
  x, y = np.zeros((1, 4, 4), np.float32), np.zeros((1,), np.int32)
  fresh = jax.jit(BiGR(small).init)(jax.random.key(0), x, y)
  p = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(meta.unbox(fresh['params'])).items()}
  for key, v in p.items():
    zero = key[0] == 'adaLN' or 'adaLN_modulation' in key or key[:2] == ('denoise_mlp', 'final_layer') or \
        key[-1] == 'bias'
    assert (not np.any(v)) == zero, key
  assert abs(p[('tok_embeddings', 'kernel')].std() - 0.02) < 0.01
  assert abs(p[('cls_embedding',)].std() - 0.02) < 0.005
  assert abs(p[('mask_tok',)].std() - 1.0) < 0.5
  assert abs(p[('layers_0', 'ada_gss')].std() - 1 / math.sqrt(32)) < 0.07
  np.testing.assert_array_equal(p[('norm', 'weight')], np.ones(32))
