"""ELM (AR / MLM) and BiGR training on the bits of a frozen binary autoencoder, in the shared sharded trainer.

``config.task`` picks the model: ``'elm_ar'`` (``var_jax.models.elm.ELMAR``), ``'elm_mlm'`` (``ELMMLM``) or
``'bigr'`` (``var_jax.models.bigr.BiGR``). The loop is the VAR trainer's (``var_jax.train.trainer``): its
``TrainState``, the mesh and logical-axis rules (``loop_common.setup_mesh``), state born sharded from the params'
logical axis names, ``TrainCheckpointer`` with exact resume (``loop_common.restore_or_init``), ``MetricWriter``,
periodic eval, SIGTERM preemption. One step:

1. images from the pipeline ([-1, 1]) go to the BAE's [0, 1] as ``(x + 1) / 2``; the frozen BAE (replicated) draws
   Bernoulli bits ``u < p`` (the reference ``encode()`` samples) with the key ``k_bits``;
2. the model's own loss on those bits with the key ``k_model``:

   - elm_ar: ``tokens = bits_to_tokens(bits, token_each)``; ``ELMAR(tokens, labels, train=True)`` with the rng
     stream ``'dropout' = k_model`` (label dropout, token/residual/FFN dropout); ``ar_loss(logits, tokens, hm_dist)``;
   - elm_mlm: ``k_mask, k_drop = split(k_model)``; ``mask = mlm_random_mask(k_mask, B, N, gen_iter, mask_schtype)``;
     ``ELMMLM(tokens, labels, token_all_mask=mask, train=True)`` with ``'dropout' = k_drop``;
     ``mlm_loss(logits, tokens, mask, smoothing)`` (with ``hm_dist > 0``: the Hamming soft-label loss over all
     sub-tokens, as the reference's ``weights=`` branch);
   - bigr: ``inp = bits.reshape(B, N, K)``; ``bigr.training_loss(model, params, k_model, inp, labels, train=True)``
     (mask count, mask, timesteps, x_t, label dropout and dropouts all from ``k_model``);

3. AdamW: global-norm clip, Adam moments, decoupled weight decay on exactly the tensors the reference decays
   (torch ndim > 1, not ``*.bias``, not ``denoise_mlp``: read from the interop tables, so e.g. BiGR's ``mask_tok``,
   (1, D) in torch, is decayed although it is 1-D here), the lr schedule, then the EMA of the params (kept in the
   optimizer state, so it is sharded and checkpointed with it).

Keys: ``k_bits, k_model = split(fold_in(key(seed), step))`` (``step_keys``); with ``grad_accum`` > 1 each is split
once more into one key per micro-batch. So a run is a pure function of (config, seed) and a resumed run repeats an
uninterrupted one bit for bit; threefry keys are partitionable, so the draws do not depend on the mesh.

Eval (every ``eval_every`` steps and at the end): the same losses in eval mode (no dropouts, no label dropout) on
the eval split, with bits, masks and timesteps from fixed keys (``fold_in(eval_root(seed), batch)``) so evals at
different steps are comparable; padded examples are excluded. ELM AR reports cross-entropy (= the training loss at
``hm_dist = 0``, the release recipe).

At the end: the model in the reference layout (``save_elm`` -> ``<workdir>/model.pth`` / ``save_bigr`` ->
``<workdir>/bigr.pt``; ``config.export_name``), holding the EMA weights when ``config.ema.decay`` > 0, plus
``model_args.json`` (the reference ``ModelArgs`` to reload it: ``load_elm(path, **model_args)`` /
``load_bigr(path, **model_args)``) and, for a random-init tokenizer, ``binaryae.th`` (``load_bae``).
"""
from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import os
import shutil
import time
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from flax.core import meta

from var_jax import sharding as shd
from var_jax.models import bernoulli_diffusion as bd
from var_jax.models import bigr as bigr_lib
from var_jax.models import elm as elm_lib
from var_jax.models.bae import BAEConfig, BinaryAutoEncoder
from var_jax.models.bigr import BiGR, BiGRConfig
from var_jax.models.elm import ELMAR, ELMMLM, ELMConfig
from var_jax.train import loop_common
from var_jax.train import metrics as metrics_lib
from var_jax.train import optim
from var_jax.train.trainer import TrainState

logging = std_logging.getLogger('var_jax.train')

KINDS = ('elm_ar', 'elm_mlm', 'bigr')
ModelConfig = Union[ELMConfig, BiGRConfig]
_EVAL_SALT = np.uint32(0xFFFFFFFF)       # eval keys: fold_in(key(seed), _EVAL_SALT); train steps never reach it


# ----------------------------------------------------------------------------- configs
def model_configs(config) -> Tuple[BAEConfig, ModelConfig]:
  """(BAE config, model config) from ``config.bae`` / ``config.model``, checked against each other and the data."""
  kind = config.get('task', None)
  if kind not in KINDS:
    raise ValueError(f'config.task={kind!r}: the bits trainer trains one of {KINDS}')
  bae_cfg = BAEConfig(**config.bae.to_dict())
  model_kw = config.model.to_dict()
  if kind == 'bigr':
    cfg = BiGRConfig(**model_kw)
    k, n, what = cfg.binary_size, cfg.seq_len, 'model.binary_size'
    if cfg.block_size != cfg.seq_len:
      raise ValueError(f'model.block_size={cfg.block_size} must equal model.seq_len={cfg.seq_len} (the 2D RoPE grid '
                       f'is the latent grid; the reference passes block_size = latent_size ** 2)')
  else:
    cfg = ELMConfig(modeling=kind[len('elm_'):], **model_kw)
    k, n, what = cfg.bits_per_cell, cfg.seq_len, 'model.token_each * model.code_dim'
    if cfg.modeling == 'mlm' and cfg.maskpersample:
      raise NotImplementedError('model.maskpersample=True (a mask count per sample) is not implemented; the release '
                                'recipe uses one count per batch')
    if int(config.get('hm_dist', 0)) < 0:
      raise ValueError(f'hm_dist must be >= 0, got {config.hm_dist}')
  if bae_cfg.codebook_size != k:
    raise ValueError(f'{what} = {k} bits per cell, but the BAE has bae.codebook_size = {bae_cfg.codebook_size}')
  size = int(config.data.image_size)
  if size % bae_cfg.downsample:
    raise ValueError(f'data.image_size={size} is not divisible by the BAE downsampling {bae_cfg.downsample}')
  if (size // bae_cfg.downsample) ** 2 != n:
    raise ValueError(f'data.image_size={size} gives a {size // bae_cfg.downsample}^2 latent grid, the model expects '
                     f'{n} cells (model.block_size / seq_len)')
  if bae_cfg.resolution != size:
    raise ValueError(f'bae.resolution={bae_cfg.resolution} must equal data.image_size={size} (it places the BAE '
                     f'attention levels)')
  return bae_cfg, cfg


def make_model(kind: str, cfg: ModelConfig, dtype=jnp.float32):
  if kind == 'elm_ar':
    return ELMAR(cfg, dtype=dtype)
  if kind == 'elm_mlm':
    return ELMMLM(cfg, dtype=dtype)
  return BiGR(cfg, dtype=dtype)


def _dtype(name: str):
  return jnp.bfloat16 if name == 'bfloat16' else jnp.float32


def init_variables_fn(kind: str, model, cfg: ModelConfig) -> Callable[[jax.Array], Dict[str, Any]]:
  """rng -> the model's (boxed) variables from dummy inputs of the training shapes."""
  labels = jnp.zeros((1,), jnp.int32)
  if kind == 'bigr':
    dummy = jnp.zeros((1, cfg.seq_len, cfg.binary_size), jnp.float32)
  else:
    dummy = jnp.zeros((1, cfg.seq_len, cfg.token_each), jnp.int32)
  return lambda rng: model.init(rng, dummy, labels)


def reference_table(kind: str, cfg: ModelConfig):
  if kind == 'bigr':
    from var_jax.interop.bigr import bigr_table
    return bigr_table(cfg)
  from var_jax.interop.elm import elm_table
  return elm_table(cfg)


def reference_decay_mask(kind: str, cfg: ModelConfig, params) -> Dict[str, Any]:
  """True where the reference ``add_weight_decay`` decays: the torch tensor has ndim > 1, its name does not end in
  ``.bias`` and does not contain ``denoise_mlp`` (both repos use this rule; ELM has no ``denoise_mlp``). Shapes and
  names come from the interop table (first name of a tensor registered twice, as ``named_parameters`` does)."""
  flat: Dict[Tuple[str, ...], bool] = {}
  for e in reference_table(kind, cfg):
    if e.collection != 'params' or e.path in flat:
      continue
    flat[e.path] = len(e.shape) > 1 and not e.key.endswith('.bias') and 'denoise_mlp' not in e.key
  ours = set(traverse_util.flatten_dict(params))
  if ours != set(flat):
    raise ValueError(f'the interop table and the params differ: {sorted(ours ^ set(flat))[:5]}')
  return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------- optimizer
class ParamsEmaState(NamedTuple):
  ema: Any


def params_ema(decay: float) -> optax.GradientTransformation:
  """Leaves the updates alone and tracks ``ema = decay * ema + (1 - decay) * (params + updates)`` (the reference
  ``update_ema`` after ``opt.step()``; initialised to the params). Put it last in the chain."""

  def init(params):
    return ParamsEmaState(ema=jax.tree.map(lambda p: p, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('params_ema needs the params')
    ema = jax.tree.map(lambda e, p, u: decay * e + (1.0 - decay) * (p + u).astype(e.dtype), state.ema, params,
                       updates)
    return updates, ParamsEmaState(ema=ema)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state) -> Optional[Any]:
  """The EMA params held in an optimizer state built by ``build_optimizer`` (None when the EMA is off)."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ParamsEmaState))
           if isinstance(s, ParamsEmaState)]
  return found[0].ema if found else None


def lr_fn(optim_cfg, total_steps: int) -> Callable[[Any], jax.Array]:
  """step -> learning rate: linear warmup from ``warmup_start * lr`` over ``warmup_steps`` (the references' get_lr
  starts at 0), then constant (``schedule='constant'``) or a ``var_jax.train.optim.lr_factor`` schedule."""
  lr0, wp = float(optim_cfg.lr), float(optim_cfg.warmup_steps)
  ws, sched = float(optim_cfg.warmup_start), str(optim_cfg.schedule)
  if sched == 'constant':
    def f(step):
      s = jnp.asarray(step, jnp.float32)
      return lr0 * jnp.where(s < round(wp), ws + (1 - ws) * s / max(round(wp), 1.0), 1.0)
    return f
  return lambda step: lr0 * optim.lr_factor(step, wp, total_steps, sched, ws, float(optim_cfg.end_ratio))


def build_optimizer(config, total_steps: int, decay_mask) -> optax.GradientTransformation:
  o = config.optim
  parts = []
  if o.grad_clip and o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(o.grad_clip)))
  parts += [optax.scale_by_adam(b1=float(o.b1), b2=float(o.b2), eps=float(o.eps)),
            optax.add_decayed_weights(float(o.weight_decay), mask=lambda _: decay_mask),
            optax.scale_by_learning_rate(lr_fn(o, total_steps))]
  decay = float(config.ema.decay)
  if decay > 0:
    parts.append(params_ema(decay))
  return optax.chain(*parts)


# ----------------------------------------------------------------------------- state
def unbox(tree):
  """Strip the logical-axis boxes without sharding constraints (the jit's out_shardings place the arrays)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def abstract_state_and_shardings(init_variables, tx, mesh, rules):
  """Shapes of the train state (no allocation) and its NamedShardings from the params' logical axis names."""
  boxed = jax.eval_shape(init_variables, jax.random.key(0))['params']
  param_sh = shd.logical_to_shardings(boxed, mesh, rules)
  params = meta.unbox(boxed)
  opt_state = jax.eval_shape(tx.init, params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_state, param_sh,
                                 transform_non_params=lambda _: shd.replicated(mesh))
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state)
  shardings = TrainState(step=shd.replicated(mesh), params=param_sh, opt_state=opt_sh)
  return abstract, shardings


def init_state(init_variables, tx, seed: int, shardings):
  """The initial state, born sharded: params = ``init_variables(key(seed))['params']``."""

  def init(rng):
    params = unbox(init_variables(rng)['params'])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  # no logical-rules context: the out_shardings place the arrays
  return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def load_bae(config, bae_cfg: BAEConfig, mesh) -> Dict[str, Any]:
  """The frozen tokenizer's variables ({'params'} and, when available, {'unused'}), replicated: from a reference
  file (``config.bae_ckpt``: ``binaryae*.th`` / ``.pth`` / ``.safetensors``, ``ae.``-prefixed or plain) or a
  seeded random init (key(seed + 1))."""
  path = config.bae_ckpt
  if not path:
    logging.warning('config.bae_ckpt is empty: using a randomly initialised BAE (fine for smoke tests and the '
                    'quickstarts; load a trained one for meaningful codes)')
    s = int(config.data.image_size)
    init = jax.jit(lambda k: meta.unbox(BinaryAutoEncoder(bae_cfg).init(k, jnp.zeros((1, s, s, 3)), train=False)))
    v = init(jax.random.key(int(config.seed) + 1))
  else:
    from var_jax.interop import bae as bae_io
    got, v, _ = bae_io.load_bae(path, resolution=bae_cfg.resolution)
    diff = [f'{f.name}: file {getattr(got, f.name)!r} vs config.bae {getattr(bae_cfg, f.name)!r}'
            for f in dataclasses.fields(BAEConfig) if getattr(got, f.name) != getattr(bae_cfg, f.name)]
    if diff:
      raise ValueError(f'{path}: the BAE checkpoint does not match config.bae: ' + '; '.join(diff))
  return jax.device_put(dict(v), shd.replicated(mesh))


# ----------------------------------------------------------------------------- losses
def step_keys(seed: int, step) -> Tuple[jax.Array, jax.Array]:
  """(k_bits, k_model) of a training step: ``split(fold_in(key(seed), step))``."""
  k = jax.random.split(jax.random.fold_in(jax.random.key(seed), step))
  return k[0], k[1]


def eval_root(seed: int) -> jax.Array:
  """Eval batch i uses ``fold_in(eval_root(seed), i)`` (split into bits and model keys as a train step)."""
  return jax.random.fold_in(jax.random.key(seed), _EVAL_SALT)


def image_bits(bae: BinaryAutoEncoder, bae_vars, images, key):
  """Pipeline images ([-1, 1], NHWC) -> Bernoulli-sampled BAE bits (B, h, w, K) uint8 (the BAE works on [0, 1])."""
  x01 = (jnp.asarray(images, jnp.float32) + 1.0) * 0.5
  return jax.lax.stop_gradient(bae.apply({'params': bae_vars['params']}, x01, 'bernoulli', key,
                                         method=BinaryAutoEncoder.bits))


def _token_bit_acc(pred, tokens, code_dim: int):
  """Fraction of equal bits between predicted and true sub-tokens, per sub-token."""
  x = jnp.bitwise_xor(pred.astype(jnp.int32), tokens.astype(jnp.int32))
  wrong = jnp.sum((x[..., None] >> jnp.arange(code_dim, dtype=jnp.int32)) & 1, axis=-1)
  return 1.0 - wrong.astype(jnp.float32) / code_dim


def compute_loss(kind: str, model, cfg: ModelConfig, params, bits, labels, key, *, hm_dist: int = 0,
                 schedule=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The training loss (train mode) of ``kind`` on BAE bits (B, h, w, K) and labels, all randomness from ``key``
  (see the module docstring). Returns (loss, metrics): 'loss'; ELM: 'acc' (top-1 sub-token, %) and 'bit_acc' (the
  bits of that prediction, %), on the masked positions for MLM, plus 'mask_frac'; BiGR: 'bit_acc' (the reference's
  accuracy of the x0 prediction over all bits, %) and 'bce_loss'."""
  b = bits.shape[0]
  labels = jnp.asarray(labels, jnp.int32)
  if kind == 'bigr':
    inp = bits.reshape(b, -1, bits.shape[-1]).astype(jnp.float32)
    loss, st = bigr_lib.training_loss(model, {'params': params}, key, inp, labels, train=True, schedule=schedule)
    return loss, {'loss': loss, 'bce_loss': st['bce_loss'], 'bit_acc': st['acc'] * 100}
  tokens = elm_lib.bits_to_tokens(bits, cfg.token_each)
  if kind == 'elm_ar':
    logits = model.apply({'params': params}, tokens, labels, train=True, rngs={'dropout': key})
    loss = elm_lib.ar_loss(logits, tokens, hm_dist, cfg.code_dim)
    pred = jnp.argmax(logits, -1).reshape(tokens.shape)
    m = {'loss': loss, 'acc': jnp.mean((pred == tokens).astype(jnp.float32)) * 100,
         'bit_acc': jnp.mean(_token_bit_acc(pred, tokens, cfg.code_dim)) * 100}
    if hm_dist > 0:
      m['ce'] = elm_lib.ar_loss(logits, tokens, 0)
    return loss, m
  k_mask, k_drop = jax.random.split(key)
  n = tokens.shape[1]
  mask = elm_lib.mlm_random_mask(k_mask, b, n, cfg.gen_iter, cfg.mask_schtype)
  logits = model.apply({'params': params}, tokens, labels, token_all_mask=mask, train=True, rngs={'dropout': k_drop})
  if hm_dist > 0:   # the reference's ``weights=`` branch: soft labels, mean over all sub-tokens
    loss = elm_lib.hamming_soft_loss(logits, tokens, cfg.code_dim, hm_dist)
  else:
    loss = elm_lib.mlm_loss(logits, tokens, mask, cfg.smoothing)
  pred = jnp.argmax(logits, -1).reshape(tokens.shape)
  w = jnp.broadcast_to(mask.astype(jnp.float32)[..., None], tokens.shape)
  den = jnp.maximum(w.sum(), 1.0)
  m = {'loss': loss, 'acc': jnp.sum((pred == tokens) * w) / den * 100,
       'bit_acc': jnp.sum(_token_bit_acc(pred, tokens, cfg.code_dim) * w) / den * 100,
       'mask_frac': jnp.mean(mask.astype(jnp.float32))}
  return loss, m


def _diffusion_schedule(kind, cfg):
  return bd.make_schedule(cfg.n_sample_steps, cfg.beta_type) if kind == 'bigr' else None


# ----------------------------------------------------------------------------- the steps
def make_train_step(kind: str, model, cfg: ModelConfig, bae: BinaryAutoEncoder, tx, config):
  """(state, batch, bae_vars) -> (state, metrics), to be jitted with the state's shardings."""
  seed, accum, hm_dist = int(config.seed), int(config.grad_accum), int(config.get('hm_dist', 0))
  schedule = _diffusion_schedule(kind, cfg)

  def micro(params, mb, k_bits, k_model, bae_vars):
    bits = image_bits(bae, bae_vars, mb['image'], k_bits)

    def loss_fn(p):
      return compute_loss(kind, model, cfg, p, bits, mb['label'], k_model, hm_dist=hm_dist, schedule=schedule)

    (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, m

  def step_fn(state: TrainState, batch, bae_vars):
    k_bits, k_model = step_keys(seed, state.step)
    if accum == 1:
      grads, m = micro(state.params, batch, k_bits, k_model, bae_vars)
    else:
      mbs = jax.tree.map(lambda a: a.reshape((accum, a.shape[0] // accum) + a.shape[1:]), batch)
      keys = (jax.random.split(k_bits, accum), jax.random.split(k_model, accum))

      def body(carry, xs):
        mb, kb, km = xs
        g, m = micro(state.params, mb, kb, km, bae_vars)
        return jax.tree.map(jnp.add, carry, (g, m)), None

      first = jax.tree.map(lambda a: a[0], (mbs,) + keys)
      zero = jax.eval_shape(lambda: micro(state.params, *first, bae_vars))
      zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
      (grads, m), _ = jax.lax.scan(body, zero, (mbs,) + keys)
      grads, m = jax.tree.map(lambda a: a / accum, (grads, m))
    m['grad_norm'] = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), m

  return step_fn


def make_eval_step(kind: str, model, cfg: ModelConfig, bae: BinaryAutoEncoder, config):
  """(params, batch with 'mask', bae_vars, key) -> sums and counts of the eval-mode losses over real examples."""
  schedule = _diffusion_schedule(kind, cfg)

  def eval_fn(params, batch, bae_vars, key):
    k_bits, k_model = jax.random.split(key)
    bits = image_bits(bae, bae_vars, batch['image'], k_bits)
    labels = jnp.asarray(batch['label'], jnp.int32)
    valid = batch['mask'].astype(bool)
    b = bits.shape[0]
    if kind == 'bigr':
      inp = bits.reshape(b, -1, bits.shape[-1]).astype(jnp.float32)
      r = bigr_lib.sample_training_inputs(k_model, b, inp.shape[1], inp.shape[2], cfg.n_sample_steps)
      mask = r['token_all_mask'] & valid[:, None]
      _, st = model.apply({'params': params}, inp, labels, mask, r['t'], r['u'], deterministic=True,
                          schedule=schedule, method=BiGR.loss)
      w = jnp.broadcast_to(mask[..., None].astype(jnp.float32), inp.shape)
      p0 = bd.x0_probs(st['logits'], st['x_t'], p_flip=cfg.p_flip).reshape(inp.shape)
      correct = ((p0 > 0.5).astype(jnp.float32) == inp).astype(jnp.float32)
      return {'loss': (jnp.sum(st['loss_all'] * w), jnp.sum(w)), 'bce_loss': (jnp.sum(st['bce_loss_all'] * w),
                                                                               jnp.sum(w)),
              'bit_acc': (jnp.sum(correct * w) * 100, jnp.sum(w)), 'examples': (jnp.sum(valid), 1.0)}
    tokens = elm_lib.bits_to_tokens(bits, cfg.token_each)
    if kind == 'elm_ar':
      logits = model.apply({'params': params}, tokens, labels)
      w = jnp.broadcast_to(valid[:, None, None].astype(jnp.float32), tokens.shape)
      nll = elm_lib.cross_entropy(logits, tokens.reshape(b, -1)).reshape(tokens.shape)
    else:
      mask = elm_lib.mlm_random_mask(k_model, b, tokens.shape[1], cfg.gen_iter, cfg.mask_schtype)
      mask = mask.astype(bool) & valid[:, None]
      logits = model.apply({'params': params}, tokens, labels, token_all_mask=mask)
      w = jnp.broadcast_to(mask[..., None].astype(jnp.float32), tokens.shape)
      lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(tokens.shape + (-1,))
      nll = -jnp.take_along_axis(lp, tokens[..., None], -1)[..., 0]
      if cfg.smoothing > 0:
        nll = (1.0 - cfg.smoothing) * nll - cfg.smoothing * jnp.mean(lp, -1)
    pred = jnp.argmax(logits, -1).reshape(tokens.shape)
    return {'loss': (jnp.sum(nll * w), jnp.sum(w)), 'acc': (jnp.sum((pred == tokens) * w) * 100, jnp.sum(w)),
            'bit_acc': (jnp.sum(_token_bit_acc(pred, tokens, cfg.code_dim) * w) * 100, jnp.sum(w)),
            'examples': (jnp.sum(valid), 1.0)}

  return eval_fn


def evaluate(config, eval_fn, params, bae_vars, mesh) -> Dict[str, float]:
  from var_jax.data import pipeline as data_lib
  per_process = config.global_batch_size // jax.process_count()
  ds = data_lib.make_eval_dataset(config.data, per_process, jax.process_index(), jax.process_count())
  root = eval_root(int(config.seed))
  tot: Dict[str, np.ndarray] = {}
  for i, batch in enumerate(ds):
    if 0 <= config.eval_batches <= i:
      break
    out = jax.device_get(eval_fn(params, shd.host_local_to_global(batch, mesh), bae_vars, jax.random.fold_in(root, i)))
    for k, (s, n) in out.items():
      a = np.asarray([s, n], np.float64)
      tot[k] = tot[k] + a if k in tot else a
  if not tot or tot['examples'][0] == 0:
    return {}
  out = {k: s / max(n, 1e-12) for k, (s, n) in tot.items() if k != 'examples'}
  out['examples'] = tot['examples'][0]
  return out


# ----------------------------------------------------------------------------- export
def reference_model_args(kind: str, cfg: ModelConfig) -> Dict[str, Any]:
  """The ``ModelArgs`` keyword arguments that reload an exported file (``load_elm`` / ``load_bigr``)."""
  if kind == 'bigr':
    return dataclasses.asdict(cfg)
  allowed = elm_lib.AR_MODEL_ARGS if cfg.modeling == 'ar' else elm_lib.MLM_MODEL_ARGS
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k in allowed}


def _gather(tree):
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def export(workdir: str, config, kind: str, cfg: ModelConfig, bae_cfg: BAEConfig, params, bae_vars,
           step: int) -> Optional[str]:
  """Write the model in the reference layout (+ ``model_args.json``, + ``binaryae.th`` for a random-init BAE).
  Call on every process (gathers sharded params); process 0 writes. Returns the model file's path."""
  params = _gather(params)
  if jax.process_index() != 0:
    return None
  import tempfile
  from etils import epath
  from var_jax.interop import bae as bae_io
  name = str(config.export_name)
  try:
    import torch  # noqa: F401
  except ImportError:
    if not name.endswith('.safetensors'):
      logging.warning('torch is not installed: exporting %s as .safetensors', name)
      name = os.path.splitext(name)[0] + '.safetensors'
  files = {}
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, name)
    variables = {'params': params}
    if kind == 'bigr':
      from var_jax.interop.bigr import save_bigr
      save_bigr(local, variables, cfg)
    else:
      from var_jax.interop.elm import save_elm
      save_elm(variables, cfg, local)
    files[name] = local
    bae_name = ''
    if not config.bae_ckpt:
      bae_name = 'binaryae.th' if not name.endswith('.safetensors') else 'binaryae.safetensors'
      files[bae_name] = os.path.join(tmp, bae_name)
      bae_io.save_bae(jax.device_get(dict(bae_vars)), bae_cfg, files[bae_name])
    info = {'task': kind, 'file': name, 'step': int(step),
            'weights': 'ema' if float(config.ema.decay) > 0 else 'params', 'ema_decay': float(config.ema.decay),
            'model_args': reference_model_args(kind, cfg),
            'bae_file': bae_name or str(config.bae_ckpt), 'bae_resolution': bae_cfg.resolution,
            'bae': dataclasses.asdict(bae_cfg)}
    files['model_args.json'] = os.path.join(tmp, 'model_args.json')
    with open(files['model_args.json'], 'w') as f:
      json.dump(info, f, indent=1)
    out = epath.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    for n, p in files.items():
      dst = out / n
      if '://' in workdir:
        dst.write_bytes(epath.Path(p).read_bytes())
      else:
        shutil.move(p, os.fspath(dst))
  return str(epath.Path(workdir) / name)


# ----------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class Schedule:
  steps_per_epoch: int
  total_steps: int


def make_schedule(config, num_train_examples: int) -> Schedule:
  from var_jax.data.pipeline import epoch_steps
  spe = epoch_steps(num_train_examples, config.global_batch_size)
  total = int(config.total_steps) if config.total_steps > 0 else max(int(round(config.epochs * spe)), 1)
  return Schedule(spe, total)


def train(config: ml_collections.ConfigDict, workdir: str) -> Tuple[TrainState, Dict[str, float]]:
  """Train as ``config`` says in ``workdir`` (resumes automatically). Returns (final state, last train metrics)."""
  from var_jax import checkpoint
  from var_jax.data import pipeline as data_lib

  kind = config.task
  mesh, rules = loop_common.setup_mesh(config)
  bae_cfg, cfg = model_configs(config)

  # ---- data ----
  per_process = config.global_batch_size // jax.process_count()
  n_train = len(data_lib.make_source(config.data, config.data.train_split))
  schedule = make_schedule(config, n_train)
  train_iter = iter(data_lib.make_train_dataset(config.data, per_process, config.seed, jax.process_index(),
                                                jax.process_count()))

  # ---- models, frozen tokenizer, optimizer ----
  model = make_model(kind, cfg, _dtype(config.dtype))
  bae = BinaryAutoEncoder(bae_cfg, dtype=_dtype(config.bae_dtype))
  bae_vars = load_bae(config, bae_cfg, mesh)
  init_variables = init_variables_fn(kind, model, cfg)
  params_shape = meta.unbox(jax.eval_shape(init_variables, jax.random.key(0))['params'])
  tx = build_optimizer(config, schedule.total_steps, reference_decay_mask(kind, cfg, params_shape))

  # ---- state: restore or init ----
  ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, 'checkpoints'), config.ckpt_every, config.keep_ckpts)
  abstract, shardings = abstract_state_and_shardings(init_variables, tx, mesh, rules)

  def fresh():
    state = init_state(init_variables, tx, config.seed, shardings)
    if config.init_from:
      state = _init_from_reference(config.init_from, kind, cfg, state, tx, shardings)
    if jax.process_index() == 0:
      from etils import epath
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      (epath.Path(workdir) / 'config.json').write_text(config.to_json_best_effort(indent=1))
    return state

  state, _ = loop_common.restore_or_init(ckpt, abstract, shardings, train_iter, fresh, f'{workdir}/checkpoints')
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  seq = cfg.seq_len
  logging.info('%s params: %.2fM; %d steps (%d per epoch); %d tokens of %d bits per image', kind, n_params / 1e6,
               schedule.total_steps, schedule.steps_per_epoch, seq, bae_cfg.codebook_size)

  # ---- jitted steps ----
  batch_sh = shd.batch_sharding(mesh)
  step_fn = jax.jit(make_train_step(kind, model, cfg, bae, tx, config),
                    in_shardings=(shardings, batch_sh, shd.replicated(mesh)),
                    out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=(0,))
  eval_fn = jax.jit(make_eval_step(kind, model, cfg, bae, config),
                    in_shardings=(shardings.params, batch_sh, shd.replicated(mesh), None),
                    out_shardings=shd.replicated(mesh))

  writer = metrics_lib.MetricWriter(metrics_lib.local_logdir(workdir))
  preempt = loop_common.Preemption()
  step = int(jax.device_get(state.step))
  t_last, steps_since, last = time.time(), 0, {}
  t_start = time.time()
  lr_at = lr_fn(config.optim, schedule.total_steps)
  try:
    with shd.mesh_context(mesh, rules):
      while step < schedule.total_steps:
        batch = shd.host_local_to_global(next(train_iter), mesh)
        state, m = step_fn(state, batch, bae_vars)
        step += 1
        steps_since += 1
        if step % config.log_every == 0 or step == schedule.total_steps:
          m = jax.device_get(m)
          dt = (time.time() - t_last) / steps_since
          ips = config.global_batch_size / dt
          last = {k: float(v) for k, v in m.items()}
          last.update(lr=float(lr_at(step - 1)), step_time=dt, images_per_s=ips, tokens_per_s=ips * seq)
          writer.write(step, last)
          accs = ' '.join(f'{k} {last[k]:.2f}%' for k in ('acc', 'bit_acc') if k in last)
          logging.info('step %d/%d loss %.4f %s gnorm %.3f lr %.3g %.1f img/s ETA %s', step, schedule.total_steps,
                       last['loss'], accs, last['grad_norm'], last['lr'], ips,
                       loop_common.fmt_eta((schedule.total_steps - step) * dt))
          t_last, steps_since = time.time(), 0
        if config.eval_every > 0 and (step % config.eval_every == 0 or step == schedule.total_steps):
          ev = evaluate(config, eval_fn, state.params, bae_vars, mesh)
          writer.write(step, ev, prefix='eval')
          logging.info('eval step %d: %s', step, ' '.join(f'{k} {v:.4f}' for k, v in ev.items()))
        stop = loop_common.should_stop(preempt, ckpt, step)
        ckpt.maybe_save(step, state, train_iter, config, force=step == schedule.total_steps or stop)
        if stop:
          ckpt.wait()
          logging.warning('preempted at step %d: checkpoint saved, exiting', step)
          break
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
    preempt.restore()
  if step >= schedule.total_steps:
    ema = ema_params(state.opt_state)
    path = export(workdir, config, kind, cfg, bae_cfg, ema if ema is not None else state.params, bae_vars, step)
    if path:
      logging.info('wrote %s (%s weights)', path, 'EMA' if ema is not None else 'raw')
  last['wall_time_s'] = time.time() - t_start
  return state, last


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """The CLI entry point (``python -m var_jax.train`` with task 'elm_ar' | 'elm_mlm' | 'bigr')."""
  return train(config, workdir)[1]


def _init_from_reference(path, kind, cfg, state, tx, shardings):
  """Fine-tune from a reference checkpoint: its params (and a fresh optimizer state / EMA from them)."""
  if kind == 'bigr':
    from var_jax.interop.bigr import import_bigr, load_bigr_state_dict
    v = import_bigr(load_bigr_state_dict(path), cfg, what=str(path))
  else:
    from var_jax.interop.elm import import_elm
    from var_jax.interop.reference import load_state_dict
    v = import_elm(load_state_dict(path), cfg, what=str(path))
  params = jax.device_put(jax.tree.map(jnp.asarray, v['params']), shardings.params)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  logging.info('initialised the %s model from %s', kind, path)
  return state.replace(params=params, opt_state=opt_state)
