"""ELM AR and MLM transformers against the reference fixtures (Pepper-lll/LMforImageGeneration, run in torch).

Teacher-forced logits (true and null class), every block's output, the training losses (plain CE, the Hamming
soft labels, the smoothed masked loss), the bit -> token packing, label dropout, and KV-cache decoding.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from conftest import SHARED, nchw_to_nhwc
from var_jax.interop import elm as ie
from var_jax.interop.state_dict import load_state_dict
from var_jax.losses import tokens as token_losses
from var_jax.models import elm as E

FIX = SHARED / 'fixtures' / 'elm_bigr_reference'
AR = ('elm_ar_1x8', 'elm_ar_2x4')
MLM = ('elm_mlm_1x8', 'elm_mlm_2x4')
TOL = 1e-4


def _load(name):
  d = FIX / name
  if not d.is_dir():
    raise FileNotFoundError(f'ELM fixtures not found at {d}')
  model_args = json.loads((d / 'config.json').read_text())['model_args']
  sd = load_state_dict(d / 'model.pth')
  cfg = ie.infer_elm_config(sd, **model_args)
  return cfg, ie.import_elm(sd, cfg), dict(np.load(d / 'io.npz'))


_CACHE = {}


def fixture_model(name):
  """(cfg, model, variables, io, run, out): ``run(tokens, labels, force_drop_ids, token_all_mask)`` is one compiled
  forward (batch [true labels; null class] in one call); ``out`` its result on the fixture (logits, hidden)."""
  if name not in _CACHE:
    cfg, variables, io = _load(name)
    model = ie.elm_model(cfg)

    @jax.jit
    def run(tokens, labels, force, mask):
      kw = {} if cfg.modeling == 'ar' else {'token_all_mask': mask}
      return model.apply(variables, tokens, labels, force_drop_ids=force, return_hidden=True, **kw)

    x = io['tokens'] if cfg.modeling == 'ar' else io['masked_input_ids']
    labels2 = np.concatenate([io['labels'], np.full_like(io['labels'], cfg.num_classes)])
    x2 = np.concatenate([x, x])
    mask0 = np.zeros((x2.shape[0], x2.shape[1]), np.uint8)
    out = run(x2, labels2, np.zeros_like(labels2), mask0)
    _CACHE[name] = cfg, model, variables, io, run, out
  return _CACHE[name]


def _maxdiff(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a.astype(np.float64) - b)))


@pytest.mark.parametrize('name', AR + MLM)
def test_config_matches_fixture(name):
  cfg = fixture_model(name)[0]
  ma = json.loads((FIX / name / 'config.json').read_text())['model_args']
  for k, v in ma.items():
    assert getattr(cfg, k) == v, k
  assert cfg.modeling == ('ar' if name in AR else 'mlm')


@pytest.mark.parametrize('name', AR + MLM)
def test_tokens_from_bits(name):
  cfg, _, _, io, _, _ = fixture_model(name)
  bits = nchw_to_nhwc(io['bits'])
  tokens = E.bits_to_tokens(bits, cfg.token_each)
  assert tokens.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(tokens), io['tokens'])
  back = E.tokens_to_bits(io['tokens'], cfg.code_dim)
  assert back.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(back), bits)


def _split(out, b):
  """The batch [true labels; null class] -> (logits, logits_null, hidden of the true-label half)."""
  logits, hidden = out
  return np.asarray(logits[:b]), np.asarray(logits[b:]), [np.asarray(h[:b]) for h in hidden]


@pytest.mark.parametrize('name', AR + MLM)
def test_logits_hidden(name):
  cfg, _, _, io, run, out = fixture_model(name)
  b = io['labels'].shape[0]
  assert out[0].dtype == jnp.float32
  logits, logits_null, hidden = _split(out, b)
  assert _maxdiff(logits, io['logits']) < TOL
  assert _maxdiff(logits_null, io['logits_null']) < TOL
  assert len(hidden) == cfg.n_layer
  for l, h in enumerate(hidden):
    assert _maxdiff(h, io[f'hidden_layer{l}']) < TOL, l
  # force_drop_ids (the reference LabelEmbedder argument) selects the null class
  x = io['tokens'] if cfg.modeling == 'ar' else io['masked_input_ids']
  labels = np.concatenate([io['labels'], io['labels']])
  forced = run(np.concatenate([x, x]), labels, np.array([0] * b + [1] * b), np.zeros((2 * b, x.shape[1]), np.uint8))
  assert _maxdiff(forced[0][b:], io['logits_null']) < TOL
  assert _maxdiff(forced[0][:b], io['logits']) < TOL


@pytest.mark.parametrize('name', AR)
def test_ar_losses(name):
  cfg, _, _, io, _, out = fixture_model(name)
  logits = _split(out, io['labels'].shape[0])[0]
  np.testing.assert_allclose(float(token_losses.ar_loss(logits, io['tokens'])), io['train_loss'], rtol=1e-5)
  # the Hamming soft labels (train_ddp.py get_softlabels, hm_dist=1) from the bit chunks
  bits = nchw_to_nhwc(io['bits'])
  chunks = bits.reshape(bits.shape[0], -1, cfg.token_each, cfg.code_dim)
  w = token_losses.softlabel_weights(chunks, 1)
  assert w.shape == io['softlabel_weights_hm1'].shape
  assert _maxdiff(w, io['softlabel_weights_hm1']) < 1e-6
  np.testing.assert_allclose(float(token_losses.soft_label_loss(logits, w)), io['train_loss_hm1'], rtol=1e-5)
  # ... and the gather form (no dense 2^cd weights) gives the same loss
  np.testing.assert_allclose(float(token_losses.ar_loss(logits, io['tokens'], hm_dist=1)), io['train_loss_hm1'], rtol=1e-5)
  # on the reference's own logits: float precision
  np.testing.assert_allclose(float(token_losses.ar_loss(io['logits'], io['tokens'])), io['train_loss'], rtol=1e-6)
  np.testing.assert_allclose(float(token_losses.ar_loss(io['logits'], io['tokens'], hm_dist=1)), io['train_loss_hm1'],
                             rtol=1e-6)
  # hm_dist 2: gather form == dense form
  w2 = token_losses.softlabel_weights(chunks, 2)
  np.testing.assert_allclose(float(token_losses.ar_loss(io['logits'], io['tokens'], hm_dist=2)),
                             float(token_losses.soft_label_loss(io['logits'], w2)), rtol=1e-6)


@pytest.mark.parametrize('name', MLM)
def test_mlm_masking_and_loss(name):
  cfg, _, _, io, run, out = fixture_model(name)
  b = io['labels'].shape[0]
  masked = np.where(io['token_all_mask'][..., None] == 1, cfg.mask_token_id, io['tokens'])
  np.testing.assert_array_equal(masked, io['masked_input_ids'])
  # clean tokens + token_all_mask: the model writes the mask id itself
  x2 = np.concatenate([io['tokens'], io['tokens']])
  m2 = np.concatenate([io['token_all_mask'], io['token_all_mask']])
  labels2 = np.concatenate([io['labels'], np.full_like(io['labels'], cfg.num_classes)])
  logits2 = run(x2, labels2, np.zeros_like(labels2), m2)[0]
  assert _maxdiff(logits2[:b], io['logits']) < TOL
  logits = _split(out, b)[0]
  loss = token_losses.mlm_loss(logits, io['tokens'], io['token_all_mask'], cfg.smoothing)
  np.testing.assert_allclose(float(loss), io['train_loss'], rtol=1e-5)
  np.testing.assert_allclose(float(token_losses.mlm_loss(io['logits'], io['tokens'], io['token_all_mask'], cfg.smoothing)),
                             io['train_loss'], rtol=1e-6)


@pytest.mark.parametrize('name', ['elm_ar_2x4'])
def test_label_dropout_in_training(name):
  """train=True drops labels with probability class_dropout_prob (rng 'dropout'): p ~ 1 -> null, p ~ 0 -> kept."""
  cfg, _, v, io, _, _ = fixture_model(name)
  x = io['tokens'] if cfg.modeling == 'ar' else io['masked_input_ids']
  for p, want in ((1.0 - 1e-7, io['logits_null']), (1e-7, io['logits'])):
    model = ie.elm_model(dataclasses.replace(cfg, class_dropout_prob=p))
    out = model.apply(v, x, io['labels'], train=True, rngs={'dropout': jax.random.key(0)})
    assert _maxdiff(out, want) < TOL


@pytest.mark.parametrize('name', AR)
def test_kv_cache_decoding_equals_full_forward(name):
  """Step-by-step decoding with the KV cache (class slot first, then one token per step) and a chunked prefill
  reproduce the teacher-forced logits of every position."""
  cfg, model, v, io, _, out = fixture_model(name)
  full = _split(out, io['labels'].shape[0])[0]
  b, n, t = io['tokens'].shape
  labels = jnp.asarray(io['labels'])

  def step(v, h_in_tokens, caches, index):
    def f(mdl, toks, caches, index):
      cond = mdl.class_embed(labels)
      h = jnp.where(index == 0, cond, mdl.embed_tokens(toks))
      return mdl.decode(h, cond, caches, index)
    return model.apply(v, h_in_tokens, caches, index, method=f)

  step = jax.jit(step)
  caches = E.init_cache(cfg, b)
  assert caches[0]['k'].shape == (b, n, cfg.n_head, cfg.head_dim)
  prev = jnp.zeros((b, 1, t), jnp.int32)
  rows = []
  for s in range(n):
    if s > 0:
      prev = jnp.asarray(io['tokens'][:, s - 1:s])
    logits, caches = step(v, prev, caches, jnp.int32(s))
    rows.append(np.asarray(logits))
  dec = np.concatenate(rows, axis=1)
  assert dec.shape == full.shape
  assert _maxdiff(dec, full) < 1e-5

  # prefill [class, tokens 0..6] in one call (S = 8), then the rest one by one
  def prefill(mdl, toks, caches):
    cond = mdl.class_embed(labels)
    h = jnp.concatenate([cond, mdl.embed_tokens(toks)], axis=1)
    return mdl.decode(h, cond, caches, 0)
  logits, caches = jax.jit(lambda v, x, c: model.apply(v, x, c, method=prefill))(
      v, jnp.asarray(io['tokens'][:, :7]), E.init_cache(cfg, b))
  rows = [np.asarray(logits)]
  for s in range(8, n):
    logits, caches = step(v, jnp.asarray(io['tokens'][:, s - 1:s]), caches, jnp.int32(s))
    rows.append(np.asarray(logits))
  assert _maxdiff(np.concatenate(rows, axis=1), full) < 1e-5
  if t == 1:
    return
  # forward_prefix on a prefix = the reference forward(idx, cond): rows of the first S+1 positions
  pre = model.apply(v, jnp.asarray(io['tokens'][:, :3]), labels, method=model.forward_prefix)
  assert _maxdiff(pre, full[:, :4 * t]) < 1e-5
  pre0 = model.apply(v, jnp.zeros((b, 0, t), jnp.int32), labels, method=model.forward_prefix)
  assert _maxdiff(pre0, full[:, :t]) < 1e-5


def test_mlm_random_mask():
  keys = jax.random.split(jax.random.key(1), 40)
  masks = np.asarray(jax.jit(jax.vmap(lambda k: token_losses.mlm_random_mask(k, 3, 16, gen_iter=10)))(keys))
  assert masks.shape == (40, 3, 16) and masks.dtype == np.uint8
  counts = masks.sum(-1)
  assert (counts == counts[:, :1]).all()          # one count per batch
  allowed = {max(1, int(np.floor(16 * np.cos(np.pi / 2 * s / 10)))) for s in range(10)}
  seen = set(counts[:, 0].tolist())
  assert seen <= allowed and len(seen) > 3


def test_model_args_defaults_and_unknown():
  assert E.ELMConfig.from_model_args('ar') == E.ELMConfig()
  assert E.ELMConfig.from_model_args('mlm').pause_num == 10
  with pytest.raises(TypeError, match='bogus_field'):
    E.ELMConfig.from_model_args('ar', dim=64, bogus_field=1)
  with pytest.raises(TypeError, match='smoothing'):
    E.ELMConfig.from_model_args('ar', smoothing=0.1)       # an MLM-only field
  with pytest.raises(NotImplementedError, match='rope1d'):
    E.ELMConfig(pos_type='rope1d')


def _randomize(params, seed=0, scale=0.2):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.slow
def test_options_init_cache_and_grads():
  """Reference options no fixture covers (adaLN, cosine attention, grouped KV heads, 2 class slots, dropouts):
  the reference init, cached decoding == full forward, finite training gradients."""
  cfg = E.ELMConfig.from_model_args('ar', dim=64, n_layer=2, n_head=4, n_kv_head=2, code_dim=4, token_each=2,
                                    num_classes=10, block_size=16, multiple_of=32, use_adaLN=True, attn_type='cs',
                                    cls_token_num=2, drop_path_rate=0.1, attn_dropout_p=0.1)
  model = E.ELMAR(cfg)
  x = np.asarray(jax.random.randint(jax.random.key(1), (2, 16, 2), 0, 16))
  y = jnp.array([3, 10])
  params = meta.unbox(jax.jit(model.init)(jax.random.key(0), x, y)['params'])
  # reference init: zero heads and adaLN, N(0, 0.02) tables and linears, unit norms
  assert not np.any(params['output_0']['kernel']) and not np.any(params['final_adaLN']['kernel'])
  assert not np.any(params['layers_1']['adaLN_modulation']['kernel'])
  assert abs(float(np.std(params['tok_embedder_0'])) - 0.02) < 2e-3
  assert abs(float(np.std(params['layers_0']['attention']['wqkv']['kernel'])) - 0.02) < 2e-3
  assert params['layers_0']['attention']['wqkv']['kernel'].shape == (64, (4 + 2 * 2) * 16)
  assert np.all(params['norm']['weight'] == 1)
  params = _randomize(params)
  full = jax.jit(model.apply)({'params': params}, x, y)

  @jax.jit
  def step(params, toks, caches, index):
    def f(mdl, toks, caches, index):
      cond = mdl.class_embed(y)
      return mdl.decode(jnp.where(index == 0, cond, mdl.embed_tokens(toks)), cond, caches, index)
    return model.apply({'params': params}, toks, caches, index, method=f)

  caches = E.init_cache(cfg, 2)
  assert caches[0]['k'].shape == (2, 16, 2, 16)
  rows = []
  for s in range(16):
    logits, caches = step(params, x[:, max(s - 1, 0):max(s, 1)], caches, jnp.int32(s))
    rows.append(logits)
  assert _maxdiff(np.concatenate(rows, axis=1), full) < 1e-5

  def loss(p):
    lg = model.apply({'params': p}, x, y, train=True, rngs={'dropout': jax.random.key(2)})
    return token_losses.ar_loss(lg, x, hm_dist=1)
  g = jax.jit(jax.grad(loss))(params)
  assert all(np.isfinite(a).all() for a in jax.tree_util.tree_leaves(g))
  assert np.abs(g['cls_embedding']).max() > 0


def test_mlm_init_and_tied_head():
  cfg = E.ELMConfig.from_model_args('mlm', dim=32, n_layer=1, n_head=2, code_dim=3, token_each=2, num_classes=5,
                                    block_size=4, multiple_of=32)
  model = E.ELMMLM(cfg)
  x = jnp.zeros((2, 4, 2), jnp.int32)
  params = meta.unbox(jax.jit(model.init)(jax.random.key(0), x, jnp.array([0, 1]))['params'])
  assert params['tok_embedder'].shape == (9, 32) and params['mlm_layer']['bias'].shape == (9,)
  assert not np.any(params['mlm_layer']['bias']) and not np.any(params['mlm_layer']['fc']['bias'])
  assert np.all(params['mlm_layer']['ln_scale'] == 1) and not np.any(params['mlm_layer']['ln_bias'])
  # the head reads the token table detached (reference weight.data.detach()): rows never fed get no gradient
  g = jax.jit(jax.grad(lambda p: model.apply({'params': p}, x, jnp.array([0, 1])).sum()))(params)
  assert not np.any(g['tok_embedder'][1:]) and np.any(g['tok_embedder'][0])
