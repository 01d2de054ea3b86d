"""ELM (AR / MLM) and BiGR on the bits of a frozen binary autoencoder (``config.task`` = 'elm_ar' | 'elm_mlm' |
'bigr').

One step:

1. images from the pipeline ([-1, 1]) go to the BAE's [0, 1] as ``(x + 1) / 2``; the frozen BAE (replicated) draws
   Bernoulli bits ``u < p`` (the reference ``encode()`` samples) with the key ``k_bits``;
2. the model's own loss on those bits with the key ``k_model``:

   - elm_ar: ``tokens = bits_to_tokens(bits, token_each)``; ``ELMAR(tokens, labels, train=True)`` with the rng
     stream ``'dropout' = k_model`` (label dropout, token/residual/FFN dropout); ``ar_loss(logits, tokens, hm_dist)``;
   - elm_mlm: ``k_mask, k_drop = split(k_model)``; ``mask = mlm_random_mask(k_mask, B, N, gen_iter, mask_schtype)``;
     ``ELMMLM(tokens, labels, token_all_mask=mask, train=True)`` with ``'dropout' = k_drop``;
     ``mlm_loss(logits, tokens, mask, smoothing)`` (with ``hm_dist > 0``: the Hamming soft-label loss over all
     sub-tokens, as the reference's ``weights=`` branch);
   - bigr: ``inp = bits.reshape(B, N, K)``; ``training_loss(model, params, k_model, inp, labels, train=True)``
     (mask count, mask, timesteps, x_t, label dropout and dropouts all from ``k_model``);

3. AdamW with weight decay on exactly the tensors the reference decays (torch ndim > 1, not ``*.bias``, not
   ``denoise_mlp``: read from the interop tables, so e.g. BiGR's ``mask_tok``, (1, D) in torch, is decayed although
   it is 1-D here), then the EMA of the params (the reference ``update_ema`` after every ``opt.step()``).

Keys: ``k_bits, k_model = split(step_key(seed, step))``; with ``grad_accum`` > 1 each is split once more into one
key per micro-batch. Eval: the same losses in eval mode on the eval split with keys from ``rng.eval_key`` (fixed, so
evals at different steps are comparable); padded examples are excluded. ELM AR reports cross-entropy.

Periodic output (``config.sample_every``): a grid of ``config.sample_classes`` sampled through the family's pipeline
(``config.sample``: its sampling settings), to ``<workdir>/samples`` and TensorBoard.

Export: the model in the reference layout (``<workdir>/model.pth`` / ``bigr.pt``; ``config.export_name``) holding
the EMA weights when ``config.ema.decay`` > 0, plus ``model_args.json`` (the reference ``ModelArgs`` to reload it)
and, for a random-init tokenizer, ``binaryae.th``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from var_jax import sharding as shd
from var_jax.dtypes import parse_dtype
from var_jax.losses import bigr as bigr_losses
from var_jax.losses import tokens as token_losses
from var_jax.models import bernoulli_diffusion as bd
from var_jax.models import elm as elm_lib
from var_jax.models.bae import BAEConfig, BinaryAutoEncoder
from var_jax.models.bigr import BiGR, BiGRConfig
from var_jax.models.elm import ELMAR, ELMMLM, ELMConfig
from var_jax.train import optim
from var_jax.train import rng as rng_lib
from var_jax.train.state import unbox
from var_jax.train.tasks import base

KINDS = ('elm_ar', 'elm_mlm', 'bigr')
ModelConfig = Union[ELMConfig, BiGRConfig]


def model_configs(config) -> Tuple[BAEConfig, ModelConfig]:
  """(BAE config, model config) from ``config.bae`` / ``config.model``, checked against each other and the data."""
  kind = config.task
  if kind not in KINDS:
    raise ValueError(f'config.task={kind!r}: the bits task trains one of {KINDS}')
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
    if int(config.hm_dist) < 0:
      raise ValueError(f'hm_dist must be >= 0, got {config.hm_dist}')
  if bae_cfg.codebook_size != k:
    raise ValueError(f'{what} = {k} bits per cell, but the BAE has bae.codebook_size = {bae_cfg.codebook_size}')
  size = int(config.data.image_size)
  if (size // bae_cfg.downsample) ** 2 != n:
    raise ValueError(f'data.image_size={size} gives a {size // bae_cfg.downsample}^2 latent grid, the model expects '
                     f'{n} cells (model.block_size / seq_len)')
  bae_cfg.check_image_size(size)
  return bae_cfg, cfg


def make_model(kind: str, cfg: ModelConfig, dtype=jnp.float32):
  return {'elm_ar': ELMAR, 'elm_mlm': ELMMLM, 'bigr': BiGR}[kind](cfg, dtype=dtype)


def dummy_inputs(kind: str, cfg: ModelConfig):
  """Inputs of the training shapes (batch 1) for ``model.init``."""
  labels = jnp.zeros((1,), jnp.int32)
  if kind == 'bigr':
    return jnp.zeros((1, cfg.seq_len, cfg.binary_size), jnp.float32), labels
  return jnp.zeros((1, cfg.seq_len, cfg.token_each), jnp.int32), labels


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


def load_bae(config, bae_cfg: BAEConfig, mesh) -> Dict[str, Any]:
  """The frozen tokenizer's variables ({'params'} and, when available, {'unused'}), replicated: from a reference
  file (``config.bae_ckpt``: ``binaryae*.th`` / ``.pth`` / ``.safetensors``) or a seeded random init
  (key(seed + 1))."""
  path = config.bae_ckpt
  if not path:
    s = int(config.data.image_size)
    v = base.random_tokenizer('bae_ckpt', config.seed, lambda k: BinaryAutoEncoder(bae_cfg).init(
        k, jnp.zeros((1, s, s, 3)), train=False))
  else:
    from var_jax.interop import bae as bae_io
    got, v, _ = bae_io.load_bae(path, resolution=bae_cfg.resolution)
    diff = [f'{f.name}: file {getattr(got, f.name)!r} vs config.bae {getattr(bae_cfg, f.name)!r}'
            for f in dataclasses.fields(BAEConfig) if getattr(got, f.name) != getattr(bae_cfg, f.name)]
    if diff:
      raise ValueError(f'{path}: the BAE checkpoint does not match config.bae: ' + '; '.join(diff))
  return jax.device_put(dict(v), shd.replicated(mesh))


def step_keys(seed: int, step) -> Tuple[jax.Array, jax.Array]:
  """(k_bits, k_model) of a training step: ``split(step_key(seed, step))``."""
  k = jax.random.split(rng_lib.step_key(seed, step))
  return k[0], k[1]


BITS_MODES = ('bernoulli', 'threshold')


def image_bits(bae: BinaryAutoEncoder, bae_vars, images, key, mode: str = 'bernoulli'):
  """Pipeline images ([-1, 1], NHWC) -> BAE bits (B, h, w, K) uint8 (the BAE works on [0, 1]): Bernoulli-sampled
  (``mode='bernoulli'``, the references) or ``p > 0.5`` ('threshold': the same bits for an image at every step)."""
  x01 = (jnp.asarray(images, jnp.float32) + 1.0) * 0.5
  return jax.lax.stop_gradient(bae.apply({'params': bae_vars['params']}, x01, mode, key if mode == 'bernoulli'
                                         else None, method=BinaryAutoEncoder.bits))


def _token_bit_acc(pred, tokens, code_dim: int):
  """Fraction of equal bits between predicted and true sub-tokens, per sub-token."""
  x = jnp.bitwise_xor(pred.astype(jnp.int32), tokens.astype(jnp.int32))
  wrong = jnp.sum((x[..., None] >> jnp.arange(code_dim, dtype=jnp.int32)) & 1, axis=-1)
  return 1.0 - wrong.astype(jnp.float32) / code_dim


def _token_metrics(logits, tokens, w, code_dim):
  """Weighted (sum, count) of sub-token accuracy and bit accuracy (%), w broadcast to the sub-token shape."""
  pred = jnp.argmax(logits, -1).reshape(tokens.shape)
  return {'acc': (jnp.sum((pred == tokens) * w) * 100, jnp.sum(w)),
          'bit_acc': (jnp.sum(_token_bit_acc(pred, tokens, code_dim) * w) * 100, jnp.sum(w))}


def compute_loss(kind: str, model, cfg: ModelConfig, params, bits, labels, key, *, hm_dist: int = 0,
                 schedule=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The training loss (train mode) of ``kind`` on BAE bits (B, h, w, K) and labels, all randomness from ``key``.
  Returns (loss, metrics): 'loss'; ELM: 'acc' (top-1 sub-token, %) and 'bit_acc' (the bits of that prediction, %),
  on the masked positions for MLM, plus 'mask_frac'; BiGR: 'bit_acc' (the reference's accuracy of the x0
  prediction over all bits, %) and 'bce_loss'."""
  b = bits.shape[0]
  labels = jnp.asarray(labels, jnp.int32)
  if kind == 'bigr':
    inp = bits.reshape(b, -1, bits.shape[-1]).astype(jnp.float32)
    loss, st = bigr_losses.training_loss(model, {'params': params}, key, inp, labels, train=True, schedule=schedule)
    return loss, {'loss': loss, 'bce_loss': st['bce_loss'], 'bit_acc': st['acc'] * 100}
  tokens = elm_lib.bits_to_tokens(bits, cfg.token_each)
  if kind == 'elm_ar':
    logits = model.apply({'params': params}, tokens, labels, train=True, rngs={'dropout': key})
    loss = token_losses.ar_loss(logits, tokens, hm_dist, cfg.code_dim)
    w = jnp.ones(tokens.shape, jnp.float32)
    m = {'loss': loss, **{k: s / n for k, (s, n) in _token_metrics(logits, tokens, w, cfg.code_dim).items()}}
    if hm_dist > 0:
      m['ce'] = token_losses.ar_loss(logits, tokens, 0)
    return loss, m
  k_mask, k_drop = jax.random.split(key)
  mask = token_losses.mlm_random_mask(k_mask, b, tokens.shape[1], cfg.gen_iter, cfg.mask_schtype)
  logits = model.apply({'params': params}, tokens, labels, token_all_mask=mask, train=True, rngs={'dropout': k_drop})
  if hm_dist > 0:   # the reference's ``weights=`` branch: soft labels, mean over all sub-tokens
    loss = token_losses.hamming_soft_loss(logits, tokens, cfg.code_dim, hm_dist)
  else:
    loss = token_losses.mlm_loss(logits, tokens, mask, cfg.smoothing)
  w = jnp.broadcast_to(mask.astype(jnp.float32)[..., None], tokens.shape)
  acc = _token_metrics(logits, tokens, w, cfg.code_dim)
  return loss, {'loss': loss, **{k: s / jnp.maximum(n, 1.0) for k, (s, n) in acc.items()},
                'mask_frac': jnp.mean(mask.astype(jnp.float32))}


def reference_model_args(kind: str, cfg: ModelConfig) -> Dict[str, Any]:
  """The ``ModelArgs`` keyword arguments that reload an exported file (``load_elm`` / ``load_bigr``)."""
  if kind == 'bigr':
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != 'remat'}   # remat: ours, a training option
  allowed = elm_lib.AR_MODEL_ARGS if cfg.modeling == 'ar' else elm_lib.MLM_MODEL_ARGS
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k in allowed}


class BitsTask(base.Task):
  has_eval = True
  has_periodic_output = True
  frozen_input_keys = ('bae_ckpt',)

  def __init__(self, config, mesh, num_train_examples: int, rules=None):
    super().__init__(config, mesh, rules)
    self.name = self.kind = config.task
    self.bae_cfg, self.cfg = model_configs(config)
    s = base.total_steps(config, num_train_examples)
    self.schedule = s
    self.model = make_model(self.kind, self.cfg, parse_dtype(config.dtype, 'config.dtype'))
    self.bae = BinaryAutoEncoder(self.bae_cfg, dtype=parse_dtype(config.bae_dtype, 'config.bae_dtype'))
    self.diffusion = bd.make_schedule(self.cfg.n_sample_steps, self.cfg.beta_type) if self.kind == 'bigr' else None
    self.tokens_per_example = self.cfg.seq_len
    boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))['params']
    mask = reference_decay_mask(self.kind, self.cfg, unbox(boxed))
    self.tx = optim.make_optimizer(config.optim, config.global_batch_size, s.total_steps,
                                   float(config.optim.warmup_steps), mask=mask)
    self.lr_schedule = optim.lr_schedule(config.optim, config.global_batch_size, s.total_steps,
                                         float(config.optim.warmup_steps))
    self._set_state_shapes(boxed)
    self._pipe = None
    base.check_quality_config(config, self.cfg.num_classes)
    self.bits_mode = str(config.bae_bits)
    if self.bits_mode not in BITS_MODES:
      from var_jax.train import errors
      raise errors.ConfigError(f'config.bae_bits={self.bits_mode!r}: give one of {BITS_MODES}')
    if config.sample_every > 0:                       # before any work: the sampler's keyword arguments
      import inspect
      from var_jax.pipelines.bigr import BiGRPipeline
      from var_jax.pipelines.elm import ELMPipeline
      sample = (BiGRPipeline if self.kind == 'bigr' else ELMPipeline).sample
      ok = set(inspect.signature(sample).parameters) - {'self', 'labels', 'rng', 'noise', 'sample_ids', 'num_samples'}
      bad = sorted(set(config.sample) - ok)
      if bad:
        from var_jax.train import errors
        raise errors.ConfigError(f'config.sample has {", ".join(bad)}: not a setting of {sample.__qualname__} (it '
                                 f'takes {", ".join(sorted(ok))})')

  def _init_boxed(self, rng):
    return self.model.init(rng, *dummy_inputs(self.kind, self.cfg))

  def load_frozen(self):
    return load_bae(self.config, self.bae_cfg, self.mesh)

  def init_params(self, rng):
    return unbox(self._init_boxed(rng)['params']), None

  def init_from(self, state, path):
    """Fine-tune from a reference checkpoint: its params (and a fresh optimizer state / EMA from them)."""
    if self.kind == 'bigr':
      from var_jax.interop.bigr import import_bigr, load_bigr_state_dict
      v = import_bigr(load_bigr_state_dict(path), self.cfg, what=str(path))
    else:
      from var_jax.interop.elm import import_elm, load_state_dict
      v = import_elm(load_state_dict(path), self.cfg, what=str(path))
    params = jax.device_put(jax.tree.map(jnp.asarray, v['params']), self.shardings.params)
    opt_state = jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)(params)
    base.logging.info('initialised the %s model from %s', self.kind, path)
    return state.replace(params=params, opt_state=opt_state, ema=params if self._ema_fn() else state.ema)

  # ---- steps
  def train_step(self, stage):
    seed, accum = int(self.config.seed), int(self.config.grad_accum)
    hm_dist = int(self.config.hm_dist) if self.kind != 'bigr' else 0      # ELM only (BiGR has its own losses)

    def step_fn(state, batch, bae_vars):
      def micro(params, mb, keys):
        k_bits, k_model = keys
        bits = image_bits(self.bae, bae_vars, mb['image'], k_bits, self.bits_mode)
        (_, m), grads = jax.value_and_grad(
            lambda p: compute_loss(self.kind, self.model, self.cfg, p, bits, mb['label'], k_model, hm_dist=hm_dist,
                                   schedule=self.diffusion), has_aux=True)(params)
        return grads, m

      grads, m = base.accumulate(micro, state.params, batch, step_keys(seed, state.step), accum)
      m['grad_norm'] = optax.tree.norm(grads)
      return self.apply_gradients(state, grads), m

    return step_fn

  def eval_step(self):
    kind, model, cfg = self.kind, self.model, self.cfg

    def eval_fn(params, batch, bae_vars, key):
      k_bits, k_model = jax.random.split(key)
      bits = image_bits(self.bae, bae_vars, batch['image'], k_bits, self.bits_mode)
      labels = jnp.asarray(batch['label'], jnp.int32)
      valid = batch['mask'].astype(bool)
      b = bits.shape[0]
      examples = {'examples': (jnp.sum(valid), 1.0)}
      if kind == 'bigr':
        inp = bits.reshape(b, -1, bits.shape[-1]).astype(jnp.float32)
        r = bigr_losses.sample_training_inputs(k_model, b, inp.shape[1], inp.shape[2], cfg.n_sample_steps)
        mask = r['token_all_mask'] & valid[:, None]
        _, st = model.apply({'params': params}, inp, labels, mask, r['t'], r['u'], deterministic=True,
                            schedule=self.diffusion, method=BiGR.loss)
        w = jnp.broadcast_to(mask[..., None].astype(jnp.float32), inp.shape)
        p0 = bd.x0_probs(st['logits'], st['x_t'], p_flip=cfg.p_flip).reshape(inp.shape)
        correct = ((p0 > 0.5).astype(jnp.float32) == inp).astype(jnp.float32)
        return {'loss': (jnp.sum(st['loss_all'] * w), jnp.sum(w)),
                'bce_loss': (jnp.sum(st['bce_loss_all'] * w), jnp.sum(w)),
                'bit_acc': (jnp.sum(correct * w) * 100, jnp.sum(w)), **examples}
      tokens = elm_lib.bits_to_tokens(bits, cfg.token_each)
      if kind == 'elm_ar':
        logits = model.apply({'params': params}, tokens, labels)
        w = jnp.broadcast_to(valid[:, None, None].astype(jnp.float32), tokens.shape)
        nll = token_losses.label_smoothed_cross_entropy(logits, tokens.reshape(b, -1)).reshape(tokens.shape)
      else:
        mask = token_losses.mlm_random_mask(k_model, b, tokens.shape[1], cfg.gen_iter, cfg.mask_schtype)
        mask = mask.astype(bool) & valid[:, None]
        logits = model.apply({'params': params}, tokens, labels, token_all_mask=mask)
        w = jnp.broadcast_to(mask[..., None].astype(jnp.float32), tokens.shape)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(tokens.shape + (-1,))
        nll = -jnp.take_along_axis(lp, tokens[..., None], -1)[..., 0]
        if cfg.smoothing > 0:
          nll = (1.0 - cfg.smoothing) * nll - cfg.smoothing * jnp.mean(lp, -1)
      return {'loss': (jnp.sum(nll * w), jnp.sum(w)), **_token_metrics(logits, tokens, w, cfg.code_dim),
              **examples}

    return eval_fn

  # ---- reporting and outputs
  def describe(self, state):
    return f'{super().describe(state)}; {self.cfg.seq_len} tokens of {self.bae_cfg.codebook_size} bits per image'

  def log_line(self, m):
    accs = ' '.join(f'{k} {m[k]:.2f}%' for k in ('acc', 'bit_acc') if k in m)
    return f'loss {m["loss"]:.4f} {accs} gnorm {m["grad_norm"]:.3f} lr {m["lr"]:.3g}'

  def periodic_output(self, state, batch, step, workdir):
    """A grid of ``config.sample_classes`` (mod num_classes) and (``config.quality_per_class`` > 0) the digits quality
    score, sampled from the exported weights (the EMA when kept) by the family's pipeline (``ELMPipeline`` /
    ``BiGRPipeline``.sample with ``config.sample`` over its release settings), on process 0."""
    from var_jax import images as images_lib
    if jax.process_count() > 1:
      # the pipeline's sampler on process 0 alone, under the loop's global mesh, returns arrays that span every
      # process's devices and hangs in their all-gather: multi-process runs skip the grid and the score for now
      if not getattr(self, '_warned_multiprocess', False):
        base.logging.warning('%s: sample grids and the digits quality score are written by single-process runs '
                             'only (config.sample_every is ignored with %d processes)', self.kind, jax.process_count())
        self._warned_multiprocess = True
      return None
    params = shd.to_host(self.export_tree(state)['params'])
    if self._pipe is None:
      from var_jax.pipelines.bigr import BiGRPipeline
      from var_jax.pipelines.elm import ELMPipeline
      bae_vars = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), self.frozen)   # replicated: local copy
      self._pipe = (BiGRPipeline if self.kind == 'bigr' else ELMPipeline)(self.bae_cfg, self.cfg, bae_vars,
                                                                            {'params': params})
    else:                                                        # the same compiled sampler, the new params
      self._pipe.set_model_variables({'params': params})

    def sample(labels):
      # unsharded: the loop's mesh is in effect here, not the pipeline's local one
      kw = {'shard': False, **self.config.sample.to_dict()}
      return self._pipe.sample([int(c) % self.cfg.num_classes for c in labels], rng=int(self.config.seed), **kw)[0]

    labels = [int(c) % self.cfg.num_classes for c in self.config.sample_classes]
    grid = images_lib.labelled_grid(images_lib.to_uint8(sample(labels)), labels, cols=min(len(labels), 8))
    return base.image_output(workdir, 'samples', step, grid, scalars=base.quality_scalars(self.config, sample))

  def export_tree(self, state):
    return {'params': state.ema if self._ema_fn() else state.params}

  def export(self, host, workdir, step):
    return export(workdir, self.config, self.kind, self.cfg, self.bae_cfg, host['params'], self.frozen, step)


def export(workdir: str, config, kind: str, cfg: ModelConfig, bae_cfg: BAEConfig, params, bae_vars, step: int):
  """Write the model in the reference layout (+ ``model_args.json``, + ``binaryae.th`` for a random-init BAE) into
  ``workdir`` (host params; call on process 0; local or remote). Each file is written atomically (``fileio``).
  -> [(path, what)]."""
  import importlib.util
  import tempfile
  from etils import epath
  from var_jax import fileio
  from var_jax.interop import bae as bae_io
  name = str(config.export_name)
  if importlib.util.find_spec('torch') is None and not name.endswith('.safetensors'):
    base.logging.warning('torch is not installed: exporting %s as .safetensors', name)
    name = os.path.splitext(name)[0] + '.safetensors'
  files = {}
  with tempfile.TemporaryDirectory() as tmp:
    files[name] = os.path.join(tmp, name)
    if kind == 'bigr':
      from var_jax.interop.bigr import save_bigr
      save_bigr(files[name], {'params': params}, cfg)
    else:
      from var_jax.interop.elm import save_elm
      save_elm({'params': params}, cfg, files[name])
    bae_name = ''
    if not config.bae_ckpt:
      bae_name = 'binaryae.safetensors' if name.endswith('.safetensors') else 'binaryae.th'
      files[bae_name] = os.path.join(tmp, bae_name)
      bae_io.save_bae(jax.device_get(dict(bae_vars)), bae_cfg, files[bae_name])
    ema = float(config.ema.decay)
    info = {'task': kind, 'file': name, 'step': int(step), 'weights': 'ema' if ema > 0 else 'params',
            'ema_decay': ema, 'model_args': reference_model_args(kind, cfg),
            'bae_file': bae_name or str(config.bae_ckpt), 'bae_resolution': bae_cfg.resolution,
            'bae': dataclasses.asdict(bae_cfg)}
    files['model_args.json'] = os.path.join(tmp, 'model_args.json')
    with open(files['model_args.json'], 'w') as f:
      json.dump(info, f, indent=1)
    out = epath.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    for n, p in files.items():
      fileio.atomic_write_bytes(out / n, epath.Path(p).read_bytes())   # local or gs://
  what = {name: f'{kind}, {info["weights"]} weights', 'model_args.json': 'the ModelArgs to reload it'}
  return [(str(out / n), what.get(n, 'the random-init tokenizer')) for n in files]
