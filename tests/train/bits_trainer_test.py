"""ELM AR / ELM MLM / BiGR training (var_jax.train.tasks.bits) on 8 fake CPU devices, mesh data=4 x fsdp=2.

Fast: a few sharded steps of each kind lower the loss; the first step's loss is the model's own loss function called
directly on the same images, Bernoulli bits and keys; params and the optimizer state (Adam moments, EMA) are sharded
as the logical rules say; the exported reference-layout file reloads with load_elm / load_bigr and gives the same
logits as the EMA params; the released configs build the released parameter counts with the reference's
weight-decay groups. Slow: the whole loop (eval, checkpoints, export) resumed after 3 of 6 steps ends with params,
EMA and losses identical to an uninterrupted run; the CLI dispatches the quickstart config.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from tests_helpers import load_config
from var_jax import sharding as shd
from var_jax.losses import bigr as bigr_losses
from var_jax.losses import tokens as token_losses
from var_jax.models import bigr as bigr_lib
from var_jax.models import elm as elm_lib
from var_jax.models.bae import BinaryAutoEncoder
from var_jax.train import loop, optim, tasks
from var_jax.train import state as state_lib
from var_jax.train.tasks import bits as bt

KINDS = ('elm_ar', 'elm_mlm', 'bigr')
# compiling a sharded train step takes 15-40 s on a loaded 2-core CPU: ELM AR runs in the fast suite, the other two
# kinds (same code paths, their own losses) in the slow one
FAST_KINDS = ['elm_ar', pytest.param('elm_mlm', marks=pytest.mark.slow), pytest.param('bigr', marks=pytest.mark.slow)]
QUICKSTART = {'elm_ar': 'elm_quickstart', 'elm_mlm': 'elm_mlm_quickstart', 'bigr': 'bigr_quickstart'}
MESH = {'data': 4, 'fsdp': 2, 'tensor': 1}
N_STEPS = 10


def _config(kind, **overrides):
  """The quickstart shrunk: the digits at their own 8x8, a 2-level BAE with one res block per level (a 4x4 grid of
  16 bits), one transformer block of width 32."""
  c = load_config(QUICKSTART[kind])
  c.data.update(image_size=8)
  c.bae.update(ch_mult=(1, 1), res_blocks=1, resolution=8, attn_resolutions=())
  c.model.update(dim=32, n_head=2, n_layer=1)
  if kind == 'bigr':
    c.model.update(denoise_hidden_dim=32, n_sample_steps=16)
  c.global_batch_size = 16
  c.optim.update(lr=1e-2, warmup_steps=0)
  c.ema.decay = 0.9
  c.mesh.update(MESH)
  c.update(overrides)
  return c


def _sharp_bae(bae_cfg, seed):
  """The trainer's random-init BAE (key(seed + 1)) with its bit logits scaled x30: nearly deterministic bits, so
  that a few steps on one batch visibly lower the loss (a random BAE's probabilities sit near 0.5)."""
  v = BinaryAutoEncoder(bae_cfg).init(jax.random.key(seed + 1), jnp.zeros((1, bae_cfg.resolution,
                                                                           bae_cfg.resolution, 3)), train=False)
  v = bt.unbox(dict(v))
  proj = v['params']['quantize']['proj']
  v['params']['quantize']['proj'] = {k: a * 30.0 for k, a in proj.items()}
  return v


def _first_batch(config):
  from var_jax.data import pipeline as data_lib
  it = iter(data_lib.make_train_dataset(config.data, config.global_batch_size, config.seed))
  return {k: np.asarray(v) for k, v in next(it).items()}


@pytest.fixture(scope='module', params=FAST_KINDS)
def steps(request):
  """N_STEPS sharded steps of one kind on one fixed batch; the state, metrics and what they were computed from."""
  kind = request.param
  config = _config(kind)
  mesh = shd.make_mesh(MESH)
  task = tasks.build(config, mesh, 1000)
  bae_cfg, cfg, model, bae = task.bae_cfg, task.cfg, task.model, task.bae
  bae_vars = task.frozen = jax.device_put(_sharp_bae(bae_cfg, config.seed), shd.replicated(mesh))
  state = task.init_state()
  params0 = jax.device_get(state.params)
  step = task.jit_step()
  batch = _first_batch(config)
  metrics = []
  with shd.mesh_context(mesh):
    for i in range(N_STEPS):
      state, m = step(state, shd.host_local_to_global(batch, mesh), bae_vars)
      metrics.append(jax.device_get(m))
      if i == 0:
        params1 = jax.device_get(state.params)
  return dict(kind=kind, config=config, cfg=cfg, bae_cfg=bae_cfg, model=model, bae_vars=bae_vars, batch=batch,
              params=(params0, params1), state=state, metrics=metrics)


def test_sharded_steps_lower_the_loss(steps):
  losses = [float(m['loss']) for m in steps['metrics']]
  assert np.all(np.isfinite(losses)), losses
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.005, losses   # one batch, bits redrawn every step
  assert all(np.isfinite(float(m['grad_norm'])) and float(m['grad_norm']) > 0 for m in steps['metrics'])
  assert int(steps['state'].step) == N_STEPS
  assert 0 <= float(steps['metrics'][0]['bit_acc']) <= 100


def test_params_and_optimizer_state_are_sharded(steps):
  state = steps['state']
  wqkv = state.params['layers_0']['attention']['wqkv']['kernel']                  # ('embed', 'qkv')
  assert wqkv.sharding.spec == P('fsdp', 'tensor')
  assert wqkv.addressable_shards[0].data.shape == (wqkv.shape[0] // 2, wqkv.shape[1])
  assert state.params['cls_embedding'].sharding.spec == P(None, 'fsdp')            # ('classes', 'embed')
  ema = state.ema
  mu = state.opt_state[1].mu                                                      # clip, then Adam
  for tree in (ema, mu):
    assert tree['layers_0']['attention']['wqkv']['kernel'].sharding.spec == P('fsdp', 'tensor')
  if steps['kind'] == 'bigr':   # the transcoder's square ('embed', 'mlp') kernels: fsdp x tensor
    c_emb = state.params['denoise_mlp']['c_embedder']['kernel']
    assert c_emb.sharding.spec == P('fsdp', 'tensor')
    assert c_emb.addressable_shards[0].data.shape == (c_emb.shape[0] // 2, c_emb.shape[1])


def _model_loss(kind, model, cfg, params, bits, labels, key):
  """The model's own loss functions, as the reference training forward composes them."""
  if kind == 'bigr':
    inp = bits.reshape(bits.shape[0], -1, bits.shape[-1]).astype(jnp.float32)
    return bigr_losses.training_loss(model, {'params': params}, key, inp, labels, train=True)[0]
  tokens = elm_lib.bits_to_tokens(bits, cfg.token_each)
  if kind == 'elm_ar':
    logits = model.apply({'params': params}, tokens, labels, train=True, rngs={'dropout': key})
    return token_losses.ar_loss(logits, tokens)
  k_mask, k_drop = jax.random.split(key)
  mask = token_losses.mlm_random_mask(k_mask, tokens.shape[0], tokens.shape[1], cfg.gen_iter, cfg.mask_schtype)
  logits = model.apply({'params': params}, tokens, labels, token_all_mask=mask, train=True, rngs={'dropout': k_drop})
  return token_losses.mlm_loss(logits, tokens, mask, cfg.smoothing)


def test_step_losses_are_the_model_loss(steps):
  """Steps 0 and 1: the logged loss is the model's loss on the BAE's Bernoulli bits of the batch, with the keys
  split(fold_in(key(seed), step)) = (bits, model). (At step 0 an ELM AR's zero-initialised heads make every loss
  log V, so step 1 is the informative one.)"""
  kind, config, cfg = steps['kind'], steps['config'], steps['cfg']
  # the params are the model's own init from key(seed) (jitted there: equal to float rounding)
  direct = bt.unbox(steps['model'].init(jax.random.key(config.seed), *_dummy(kind, cfg))['params'])
  for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(steps['params'][0])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
  bae = BinaryAutoEncoder(steps['bae_cfg'])
  images01 = (jnp.asarray(steps['batch']['image']) + 1) / 2
  labels = jnp.asarray(steps['batch']['label'])

  @jax.jit
  def direct_loss(params, k_bits, k_model):
    bits = bae.apply({'params': steps['bae_vars']['params']}, images01, 'bernoulli', k_bits, method='bits')
    return _model_loss(kind, steps['model'], cfg, params, bits, labels, k_model), bits

  def keys(step):
    return jax.random.split(jax.random.fold_in(jax.random.key(config.seed), step))

  for step in (0, 1):
    want, bits = direct_loss(steps['params'][step], *keys(step))
    assert 0.05 < float(jnp.mean(bits)) < 0.95
    np.testing.assert_allclose(float(steps['metrics'][step]['loss']), float(want), rtol=2e-6)
  # ... and neither the bits key nor the model key is a no-op
  k_bits, k_model = keys(1)
  other = jax.random.key(99)
  assert abs(float(direct_loss(steps['params'][1], other, k_model)[0]) - float(want)) > 1e-4
  assert abs(float(direct_loss(steps['params'][1], k_bits, other)[0]) - float(want)) > 1e-5


def _dummy(kind, cfg):
  labels = jnp.zeros((1,), jnp.int32)
  if kind == 'bigr':
    return jnp.zeros((1, cfg.seq_len, cfg.binary_size)), labels
  return jnp.zeros((1, cfg.seq_len, cfg.token_each), jnp.int32), labels


def _logits(kind, model, params, bits, labels):
  if kind == 'bigr':
    inp = bits.reshape(bits.shape[0], -1, bits.shape[-1]).astype(jnp.float32)
    mask = jnp.arange(inp.shape[1])[None, :] % 3 == 0
    x_t = jnp.where(jnp.arange(inp.shape[-1]) % 4 == 0, 1.0 - inp, inp)
    return model.apply({'params': params}, inp, labels, jnp.broadcast_to(mask, inp.shape[:2]), x_t,
                       jnp.full(inp.shape[:2], 5))[1]
  tokens = elm_lib.bits_to_tokens(bits, model.config.token_each)
  if kind == 'elm_ar':
    return model.apply({'params': params}, tokens, labels)
  mask = jnp.broadcast_to(jnp.arange(tokens.shape[1])[None, :] % 2 == 0, tokens.shape[:2])
  return model.apply({'params': params}, tokens, labels, token_all_mask=mask)


def test_export_reloads_with_the_same_logits(steps, tmp_path):
  from var_jax.interop import bae as bae_io
  kind, config, cfg, state = steps['kind'], steps['config'], steps['cfg'], steps['state']
  ema = jax.device_get(state.ema)
  params = jax.device_get(state.params)
  assert not np.allclose(np.asarray(jax.tree.leaves(ema)[0]), np.asarray(jax.tree.leaves(params)[0]))
  path = bt.export(str(tmp_path), config, kind, cfg, steps['bae_cfg'], jax.device_get(state.ema),
                   steps['bae_vars'], N_STEPS)[0][0]
  assert os.path.basename(path) == ('bigr.pt' if kind == 'bigr' else 'model.pth')
  info = json.loads((tmp_path / 'model_args.json').read_text())
  assert info['task'] == kind and info['weights'] == 'ema' and info['step'] == N_STEPS
  if kind == 'bigr':
    from var_jax.interop.bigr import load_bigr
    cfg2, variables = load_bigr(path, **info['model_args'])
    model2 = bigr_lib.BiGR(cfg2)
  else:
    from var_jax.interop.elm import load_elm
    model2, variables = load_elm(path, **info['model_args'])
    cfg2 = model2.config
  assert bt.reference_model_args(kind, cfg2) == bt.reference_model_args(kind, cfg)
  g = int(np.sqrt(cfg.seq_len))
  bits = (jax.random.uniform(jax.random.key(7), (3, g, g, steps['bae_cfg'].codebook_size)) < 0.5).astype(jnp.uint8)
  labels = jnp.asarray([0, 3, 9])
  want = jax.jit(lambda p: _logits(kind, steps['model'], p, bits, labels))(ema)
  got = jax.jit(lambda p: _logits(kind, model2, p, bits, labels))(variables['params'])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
  # the (random-init) tokenizer is exported too and reloads to the same bits
  bae_cfg2, bae_vars2, _ = bae_io.load_bae(str(tmp_path / info['bae_file']), resolution=info['bae_resolution'])
  assert bae_cfg2 == steps['bae_cfg']
  x = jnp.asarray(steps['batch']['image'][:4] + 1) / 2
  probs = jax.jit(lambda v: BinaryAutoEncoder(bae_cfg2).apply({'params': v}, x, method='probs'))
  b0, b1 = probs(steps['bae_vars']['params']), probs(jax.tree.map(jnp.asarray, bae_vars2['params']))
  np.testing.assert_allclose(np.asarray(b1), np.asarray(b0), atol=1e-6)


@pytest.mark.slow
def test_grad_accumulation_and_hamming_soft_labels():
  """grad_accum=2 splits the batch and both step keys in two (micro-batch i: split(k_bits, 2)[i],
  split(k_model, 2)[i]); the step's loss is the mean of the micro-batch losses. ELM MLM with hm_dist=1: the
  reference's soft-label branch (mean over all sub-tokens)."""
  kind = 'elm_mlm'
  config = _config(kind, grad_accum=2, hm_dist=1)
  mesh = shd.make_mesh(MESH)
  task = tasks.build(config, mesh, 1000)
  bae_cfg, cfg, model, bae = task.bae_cfg, task.cfg, task.model, task.bae
  bae_vars = task.frozen = jax.device_put(_sharp_bae(bae_cfg, config.seed), shd.replicated(mesh))
  state = task.init_state()
  params0 = jax.device_get(state.params)
  step = task.jit_step()
  batch = _first_batch(config)
  with shd.mesh_context(mesh):
    state, m = step(state, shd.host_local_to_global(batch, mesh), bae_vars)
  k_bits, k_model = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 0))
  kb, km = jax.random.split(k_bits, 2), jax.random.split(k_model, 2)

  @jax.jit
  def micro_loss(images, labels, k_bits, k_model):
    bits = bae.apply({'params': bae_vars['params']}, (images + 1) / 2, 'bernoulli', k_bits, method='bits')
    tokens = elm_lib.bits_to_tokens(bits, cfg.token_each)
    k_mask, k_drop = jax.random.split(k_model)
    mask = token_losses.mlm_random_mask(k_mask, tokens.shape[0], tokens.shape[1], cfg.gen_iter, cfg.mask_schtype)
    logits = model.apply({'params': params0}, tokens, labels, token_all_mask=mask, train=True,
                         rngs={'dropout': k_drop})
    return token_losses.soft_label_loss(logits, token_losses.softlabel_weights(bits.reshape(-1, cfg.code_dim), 1))

  h = config.global_batch_size // 2
  want = np.mean([float(micro_loss(batch['image'][i * h:(i + 1) * h], batch['label'][i * h:(i + 1) * h], kb[i], km[i]))
                  for i in range(2)])
  np.testing.assert_allclose(float(m['loss']), want, rtol=2e-6)
  assert np.isfinite(float(m['grad_norm'])) and int(state.step) == 1


# ----------------------------------------------------------------------------- pieces
def test_params_ema_and_lr_schedule():
  import optax
  tx = optax.sgd(0.5)
  p = {'w': jnp.asarray([1.0, 2.0])}
  u, _ = tx.update({'w': jnp.asarray([1.0, -1.0])}, tx.init(p), p)
  ema = state_lib.update_ema(p, optax.apply_updates(p, u), 0, 0.9, 1, 0)      # the state's EMA rule
  np.testing.assert_allclose(ema['w'], 0.9 * np.array([1, 2]) + 0.1 * np.array([0.5, 2.5]), rtol=1e-6)
  c = load_config('bigr_l').optim
  c.update(warmup_steps=10)
  f = optim.lr_schedule(c, 512, 1000, c.warmup_steps)
  np.testing.assert_allclose([float(f(i)) for i in (0, 5, 10, 999)], [0.0, 5e-5, 1e-4, 1e-4], rtol=1e-6)
  c.update(schedule='cos', warmup_steps=0, end_ratio=0.01)    # ELM's --lr_decay: cosine to min_lr = 0.01 lr
  f = optim.lr_schedule(c, 512, 1000, c.warmup_steps)
  np.testing.assert_allclose([float(f(0)), float(f(999))], [1e-4, 1e-6], rtol=1e-5)


@pytest.mark.parametrize('name,count', [('elm_ar_l', 315_648_000), ('elm_mlm_l', 377_583_617),
                                        ('bigr_l', 336_346_136)])
def test_released_configs_and_decay_groups(name, count):
  """The released sizes (official layouts; MLM without its unused output head and pos_embed) and the reference's
  weight-decay groups (torch ndim > 1, no biases, no denoise_mlp)."""
  c = load_config(name)
  bae_cfg, cfg = bt.model_configs(c)
  model = bt.make_model(c.task, cfg)
  params = jax.eval_shape(lambda: bt.unbox(model.init(jax.random.key(0), *bt.dummy_inputs(c.task, cfg))['params']))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == count
  mask = traverse_util.flatten_dict(bt.reference_decay_mask(c.task, cfg, params), sep='/')
  assert mask['layers_0/attention/wqkv/kernel'] and mask['cls_embedding']
  assert not mask['layers_0/attention_norm/weight'] and not mask['norm/weight']
  if c.task == 'bigr':
    assert mask['mask_tok'] and mask['layers_0/ada_gss'] and mask['diffusion_pos_embed_learned']   # torch 2-D+
    assert not any(v for k, v in mask.items() if k.startswith('denoise_mlp/'))
    assert not mask['tok_embeddings/bias']
    assert (c.global_batch_size, c.optim.weight_decay, c.model.p_flip, c.model.use_adaLN) == (512, 2e-2, True, True)
  else:
    assert (c.global_batch_size, c.optim.weight_decay, c.hm_dist, c.model.token_dropout_p) == (256, 0.05, 0, 0.1)
  if c.task == 'elm_mlm':
    assert mask['tok_embedder'] and not mask['mlm_layer/bias'] and not mask['mlm_layer/ln_scale']
    assert c.model.smoothing == 0.0
  assert (c.optim.lr, c.optim.b1, c.optim.b2, c.optim.grad_clip, c.ema.decay) == (1e-4, 0.9, 0.95, 1.0, 0.9999)


def test_config_errors():
  c = _config('elm_ar')
  c.bae.codebook_size = 20
  with pytest.raises(ValueError, match='bits per cell'):
    bt.model_configs(c)
  c = _config('bigr')
  c.data.image_size = 32
  with pytest.raises(ValueError, match='latent grid'):
    bt.model_configs(c)


# ----------------------------------------------------------------------------- the whole loop (slow)
def _losses(workdir, split='train'):
  out = {}
  for line in open(os.path.join(workdir, 'metrics.jsonl')):
    r = json.loads(line)
    if r['split'] == split:
      out[r['step']] = r
  return out


@pytest.mark.slow
@pytest.mark.parametrize('kind', KINDS)
def test_loop_resumes_exactly(kind, tmp_path):
  run = dict(total_steps=6, log_every=1, ckpt_every=3, eval_every=3, eval_batches=1, keep_ckpts=2)
  straight, s_state = str(tmp_path / 'straight'), None
  s_state, _ = loop.train(_config(kind, **run), straight)
  resumed = str(tmp_path / 'resumed')
  loop.train(_config(kind, **dict(run, total_steps=3)), resumed)          # stops (and checkpoints) at step 3
  r_state, _ = loop.train(_config(kind, **run), resumed)                  # resumes at 3, runs to 6
  for a, b in zip(jax.tree.leaves(jax.device_get(s_state)), jax.tree.leaves(jax.device_get(r_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ls, lr = _losses(straight), _losses(resumed)
  assert sorted(ls) == list(range(1, 7))
  assert all(ls[s]['loss'] == lr[s]['loss'] for s in range(1, 7))
  ev = _losses(straight, 'eval')
  assert sorted(ev) == [3, 6] and all(np.isfinite(e['loss']) and e['examples'] == 16 for e in ev.values())
  assert sorted(os.listdir(os.path.join(straight, 'checkpoints'))) == ['3', '6']
  assert os.path.exists(os.path.join(straight, 'model_args.json'))
