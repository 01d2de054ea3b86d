"""VAR (stage 2) training: sharded train step, evaluation, sample grids, checkpointed loop with exact resume.

The loop, in order: mesh -> data -> models and frozen tokenizer -> optimizer -> abstract state and shardings ->
state born sharded (or restored) -> jitted steps -> loop (log / eval / sample / checkpoint / preemption).

Randomness is a function of (seed, step): the step's key is fold_in(PRNGKey(seed), step) and the data order is a
pure function of the seed and the iterator state, so a run resumed from a checkpoint reproduces the losses of an
uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import logging as std_logging
from flax.core import meta

logging = std_logging.getLogger('var_jax.train')   # configured by the CLI; orbax's chatter stays in absl

from var_jax import sharding as shd
from var_jax.models.configs import VARConfig, VQVAEConfig
from var_jax.models.transformer import VAR
from var_jax.models.vqvae import VQVAE
from var_jax.train import loop_common
from var_jax.train import metrics as metrics_lib
from var_jax.train import optim
from var_jax.train.losses import label_smoothed_cross_entropy


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def model_configs(config) -> Tuple[VQVAEConfig, VARConfig]:
  vae_cfg = VQVAEConfig(**config.vae.to_dict())
  var_cfg = VARConfig(**config.model.to_dict())
  if tuple(vae_cfg.patch_nums) != tuple(var_cfg.patch_nums):
    raise ValueError(f'config.vae.patch_nums {vae_cfg.patch_nums} != config.model.patch_nums {var_cfg.patch_nums}')
  if (vae_cfg.vocab_size, vae_cfg.z_channels) != (var_cfg.vocab_size, var_cfg.z_channels):
    raise ValueError('config.model.vocab_size/z_channels must equal config.vae.vocab_size/z_channels')
  if vae_cfg.image_size != config.data.image_size:
    raise ValueError(f'config.data.image_size={config.data.image_size} but the tokenizer maps '
                     f'{vae_cfg.image_size}px images to patch_nums {vae_cfg.patch_nums}')
  return vae_cfg, var_cfg


# ----------------------------------------------------------------------------- schedules
@dataclasses.dataclass(frozen=True)
class Schedule:
  steps_per_epoch: int
  total_steps: int
  warmup_steps: float
  prog_fraction: float
  prog_start: int
  prog_warmup_steps: float
  num_scales: int

  def stage(self, step: int) -> Tuple[int, float]:
    """Progressive training (the reference's pg/pg0/pgwp): (scale index to train up to or -1 for all, the
    loss weight ramp of the newest scale)."""
    if self.prog_fraction <= 0:
      return -1, 1.0

    def si_at(it):
      if it <= self.warmup_steps:
        return self.prog_start
      if it >= self.total_steps * self.prog_fraction:
        return self.num_scales - 1
      delta = self.num_scales - 1 - self.prog_start
      progress = min(max((it - self.warmup_steps) / (self.total_steps * self.prog_fraction - self.warmup_steps),
                         0), 1)
      return self.prog_start + round(progress * delta)

    si = si_at(step)
    start = step
    while start > 0 and si_at(start - 1) == si:
      start -= 1
      if step - start > self.prog_warmup_steps + 1:
        break
    ramp = 1.0 if si == self.prog_start else max(min((step - start + 1) / max(self.prog_warmup_steps, 1e-9), 1),
                                                 0.01)
    return (-1 if si == self.num_scales - 1 else si), ramp


def make_schedule(config, num_train_examples: int) -> Schedule:
  from var_jax.data.pipeline import epoch_steps
  spe = epoch_steps(num_train_examples, config.global_batch_size)   # ceil, as the reference's sampler
  total = int(config.total_steps) if config.total_steps > 0 else max(int(round(config.epochs * spe)), 1)
  epochs = total / spe
  wp_ep = config.optim.warmup_epochs if config.optim.warmup_epochs >= 0 else epochs / 50
  pg = config.progressive
  pgwp_ep = pg.warmup_epochs if pg.warmup_epochs >= 0 else epochs / 300
  return Schedule(spe, total, wp_ep * spe, float(pg.fraction), int(pg.start_stage), pgwp_ep * spe,
                  len(config.model.patch_nums))


# ----------------------------------------------------------------------------- the steps
def _tokens(vae: VQVAE, vae_vars, images):
  idx = vae.apply(vae_vars, images, method=VQVAE.img_to_idx)
  x_in = vae.apply(vae_vars, idx, method=VQVAE.idx_to_var_input)
  return jnp.concatenate(idx, axis=1), jax.lax.stop_gradient(x_in)


def _scale_stats(per_tok, correct, var_cfg: VARConfig, ed: int):
  """Per-scale mean CE and accuracy, (K,) each (scales beyond ed are NaN-free zeros)."""
  out_l, out_a = [], []
  for b, e in var_cfg.begin_ends:
    if e <= ed:
      out_l.append(per_tok[:, b:e].mean())
      out_a.append(correct[:, b:e].mean())
  return jnp.stack(out_l), jnp.stack(out_a)


def make_train_step(var: VAR, vae: VQVAE, tx: optax.GradientTransformation, config, prog_si: int):
  """The jitted-to-be step for one progressive stage (prog_si = -1: all scales)."""
  cfg = var.config
  ed = cfg.seq_len if prog_si < 0 else cfg.begin_ends[prog_si][1]
  bg = 0 if prog_si < 0 else cfg.begin_ends[prog_si][0]
  accum = int(config.grad_accum)
  ls = float(config.label_smoothing)
  seed = int(config.seed)

  def step_fn(state: TrainState, batch, vae_vars, prog_wp):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    lw = jnp.full((ed,), 1.0 / cfg.seq_len, jnp.float32)
    if prog_si >= 0:
      lw = lw.at[bg:ed].multiply(jnp.clip(prog_wp, 0.0, 1.0))

    def micro(params, mb, key):
      gt, x_in = _tokens(vae, vae_vars, mb['image'])
      gt, x_in = gt[:, :ed], x_in[:, :ed - cfg.first_l]

      def loss_fn(p):
        logits = var.apply({'params': p}, mb['label'], x_in, deterministic=False, rngs={'dropout': key})
        per_tok = label_smoothed_cross_entropy(logits, gt, ls)
        return jnp.mean(jnp.sum(per_tok * lw, axis=-1)), logits

      (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      ce = label_smoothed_cross_entropy(logits, gt, 0.0)
      correct = (jnp.argmax(logits, -1) == gt).astype(jnp.float32)
      sl, sa = _scale_stats(ce, correct, cfg, ed)
      last_b = cfg.begin_ends[prog_si if prog_si >= 0 else -1][0]
      m = {'train_loss': loss, 'loss': ce.mean(), 'acc': correct.mean() * 100,
           'loss_last': ce[:, last_b:].mean(), 'acc_last': correct[:, last_b:].mean() * 100,
           'loss_per_scale': sl, 'acc_per_scale': sa * 100}
      return grads, m

    if accum == 1:
      grads, m = micro(state.params, batch, rng)
    else:
      mbs = jax.tree.map(lambda a: a.reshape((accum, a.shape[0] // accum) + a.shape[1:]), batch)
      keys = jax.random.split(rng, accum)

      def body(carry, xs):
        mb, key = xs
        g, m = micro(state.params, mb, key)
        return jax.tree.map(jnp.add, carry, (g, m)), None

      zero = jax.eval_shape(lambda: micro(state.params, jax.tree.map(lambda a: a[0], mbs), keys[0]))
      zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
      (grads, m), _ = jax.lax.scan(body, zero, (mbs, keys))
      grads, m = jax.tree.map(lambda a: a / accum, (grads, m))
    m['grad_norm'] = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), m

  return step_fn


def make_eval_step(var: VAR, vae: VQVAE):
  cfg = var.config

  def eval_fn(params, batch, vae_vars):
    gt, x_in = _tokens(vae, vae_vars, batch['image'])
    logits = var.apply({'params': params}, batch['label'], x_in)
    ce = label_smoothed_cross_entropy(logits, gt, 0.0)
    correct = (jnp.argmax(logits, -1) == gt).astype(jnp.float32)
    w = batch['mask'].astype(jnp.float32)[:, None]
    lb = cfg.begin_ends[-1][0]
    return {'loss_sum': jnp.sum(ce.mean(1, keepdims=True) * w), 'acc_sum': jnp.sum(correct.mean(1, keepdims=True) * w),
            'loss_last_sum': jnp.sum(ce[:, lb:].mean(1, keepdims=True) * w),
            'acc_last_sum': jnp.sum(correct[:, lb:].mean(1, keepdims=True) * w), 'count': jnp.sum(w)}

  return eval_fn


# ----------------------------------------------------------------------------- state
def build_optimizer(config, schedule: Schedule):
  return optim.make_optimizer(config.optim, config.global_batch_size, schedule.total_steps, schedule.warmup_steps)


def abstract_state_and_shardings(var: VAR, tx, mesh, rules):
  """Shapes of the train state (no allocation) and its NamedShardings from the params' logical axis names."""
  cfg = var.config

  def init_boxed(rng):
    return var.init(rng, jnp.zeros((1,), jnp.int32), jnp.zeros((1, cfg.seq_len - cfg.first_l, cfg.z_channels)))

  boxed = jax.eval_shape(init_boxed, jax.random.key(0))['params']
  param_sh = shd.logical_to_shardings(boxed, mesh, rules)
  params = meta.unbox(boxed)
  opt_state = jax.eval_shape(tx.init, params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_state, param_sh,
                                 transform_non_params=lambda _: shd.replicated(mesh))
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state)
  shardings = TrainState(step=shd.replicated(mesh), params=param_sh, opt_state=opt_sh)
  return abstract, shardings, init_boxed


def init_state(var: VAR, tx, mesh, rules, seed: int):
  abstract, shardings, init_boxed = abstract_state_and_shardings(var, tx, mesh, rules)

  def init(rng):
    params = meta.unbox(init_boxed(rng)['params'])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  with shd.mesh_context(mesh, rules):
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
  return state, abstract, shardings


def load_tokenizer(config, vae_cfg: VQVAEConfig, mesh):
  """The frozen VQVAE's variables, replicated: from a reference file, our checkpoint dir, or a seeded init."""
  from var_jax.interop import reference as ref
  path = config.vae_ckpt
  if not path:
    logging.warning('config.vae_ckpt is empty: using a randomly initialised tokenizer (fine for smoke tests and '
                    'the quickstart; train or load a real one for meaningful samples)')
    s = vae_cfg.image_size
    init = jax.jit(lambda k: meta.unbox(VQVAE(vae_cfg).init(k, jnp.zeros((1, s, s, vae_cfg.in_channels)),
                                                             method=VQVAE.init_all)))
    v = init(jax.random.key(int(config.seed) + 1))
  elif os.path.isdir(path):
    from var_jax import checkpoint
    cfg_ckpt, _, v, _ = checkpoint.load_model(path)
    if cfg_ckpt != vae_cfg:
      raise ValueError(f'{path}: the tokenizer checkpoint config {cfg_ckpt} differs from config.vae {vae_cfg}')
  else:
    sd = ref.load_state_dict(path)
    got = ref.vae_config_from_state_dict(sd, patch_nums=vae_cfg.patch_nums)
    v = ref.import_vae(sd, dataclasses.replace(vae_cfg))
    if (got.vocab_size, got.z_channels, got.ch) != (vae_cfg.vocab_size, vae_cfg.z_channels, vae_cfg.ch):
      raise ValueError(f'{path}: tokenizer V/Cvae/ch = {got.vocab_size}/{got.z_channels}/{got.ch}, config.vae has '
                       f'{vae_cfg.vocab_size}/{vae_cfg.z_channels}/{vae_cfg.ch}')
  v = {'params': v['params']}
  return jax.device_put(v, shd.replicated(mesh))


# ----------------------------------------------------------------------------- the loop
def _sample_grid(config, vae_cfg, var_cfg, state, vae_vars, workdir, step, sampler_cache):
  from var_jax import sampling
  from var_jax.sample import labelled_grid, to_uint8
  labels = np.asarray(config.sample_classes, np.int32) % var_cfg.num_classes
  opts = sampling.SamplingOptions(cfg=config.sample.cfg, top_k=config.sample.top_k, top_p=config.sample.top_p)
  if 'fn' not in sampler_cache:
    sampler_cache['fn'] = sampling.make_sampler(vae_cfg, var_cfg, opts)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(config.seed), i))(jnp.arange(len(labels)))
  imgs, _ = sampler_cache['fn'](vae_vars, {'params': state.params}, jnp.asarray(labels), keys)
  grid = labelled_grid(to_uint8(jax.device_get(imgs)), labels.tolist(), cols=min(len(labels), 8))
  return loop_common.write_png(workdir, 'samples', step, grid)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Train VAR as ``config`` says, in ``workdir`` (resumes automatically). Returns the last train metrics."""
  from var_jax import checkpoint
  from var_jax.data import pipeline as data_lib

  # ---- mesh ----
  mesh, rules = loop_common.setup_mesh(config)

  # ---- data ----
  per_process = config.global_batch_size // jax.process_count()
  n_train = len(data_lib.make_source(config.data, config.data.train_split))
  schedule = make_schedule(config, n_train)
  train_ds = data_lib.make_train_dataset(config.data, per_process, config.seed, jax.process_index(),
                                         jax.process_count())
  train_iter = iter(train_ds)

  # ---- models ----
  vae_cfg, var_cfg = model_configs(config)
  dtype = jnp.bfloat16 if config.dtype == 'bfloat16' else jnp.float32
  var = VAR(var_cfg, dtype=dtype)
  vae = VQVAE(vae_cfg, dtype=jnp.bfloat16 if config.vae_dtype == 'bfloat16' else jnp.float32)
  vae_vars = load_tokenizer(config, vae_cfg, mesh)
  tx = build_optimizer(config, schedule)

  # ---- state: restore or init ----
  ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, 'checkpoints'), config.ckpt_every, config.keep_ckpts)
  abstract, shardings, _ = abstract_state_and_shardings(var, tx, mesh, rules)

  def fresh():
    state, _, _ = init_state(var, tx, mesh, rules, config.seed)
    if config.init_from:
      state = _init_from_reference(config.init_from, var_cfg, state, shardings)
    if jax.process_index() == 0:
      from etils import epath
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      (epath.Path(workdir) / 'config.json').write_text(config.to_json_best_effort(indent=1))
    return state

  state, _ = loop_common.restore_or_init(ckpt, abstract, shardings, train_iter, fresh, f'{workdir}/checkpoints')
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info('VAR params: %.2fM; %d steps (%d per epoch), warmup %.0f', n_params / 1e6, schedule.total_steps,
               schedule.steps_per_epoch, schedule.warmup_steps)
  if jax.process_index() == 0 and '://' not in workdir:
    # what scaling-law fits read (var_jax.scaling): model size and the compute of one training example
    _write_run_info(workdir, var_cfg, state.params, config)

  # ---- jitted steps (one per progressive stage; compiled lazily, cached) ----
  batch_sh = shd.batch_sharding(mesh)
  step_fns = {}

  def get_step(prog_si):
    if prog_si not in step_fns:
      fn = make_train_step(var, vae, tx, config, prog_si)
      step_fns[prog_si] = jax.jit(fn, in_shardings=(shardings, batch_sh, shd.replicated(mesh), None),
                                  out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=(0,))
    return step_fns[prog_si]

  eval_fn = jax.jit(make_eval_step(var, vae), in_shardings=(shardings.params, batch_sh, shd.replicated(mesh)),
                    out_shardings=shd.replicated(mesh))

  writer = metrics_lib.MetricWriter(metrics_lib.local_logdir(workdir))
  flops_img = metrics_lib.var_train_flops_per_image(var_cfg)
  peak = metrics_lib.peak_flops_per_device()
  preempt = loop_common.Preemption()
  sampler_cache = {}
  step = int(jax.device_get(state.step))
  t_last, steps_since, last = time.time(), 0, {}
  t_start = time.time()
  try:
    with shd.mesh_context(mesh, rules):
      while step < schedule.total_steps:
        prog_si, prog_wp = schedule.stage(step)
        batch = shd.host_local_to_global(next(train_iter), mesh)
        state, m = get_step(prog_si)(state, batch, vae_vars, jnp.float32(prog_wp))
        step += 1
        steps_since += 1
        if step % config.log_every == 0 or step == schedule.total_steps:
          m = jax.device_get(m)
          dt = (time.time() - t_last) / steps_since
          ips = config.global_batch_size / dt
          last = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
          for i, (l, a) in enumerate(zip(m['loss_per_scale'], m['acc_per_scale'])):
            last[f'loss_scale{i}'], last[f'acc_scale{i}'] = float(l), float(a)
          last.update(lr=optim.current_lr(config.optim, config.global_batch_size, schedule.total_steps,
                                          schedule.warmup_steps, step - 1),
                      step_time=dt, images_per_s=ips, tokens_per_s=ips * var_cfg.seq_len, prog_si=prog_si)
          if peak:
            last['mfu'] = flops_img * ips / (peak * jax.device_count())
          writer.write(step, last)
          eta = (schedule.total_steps - step) * dt
          logging.info('step %d/%d loss %.4f (last %.4f) acc %.2f%% (last %.2f%%) gnorm %.3f lr %.3g %.1f img/s '
                       'ETA %s', step, schedule.total_steps, last['loss'], last['loss_last'], last['acc'],
                       last['acc_last'], last['grad_norm'], last['lr'], ips, loop_common.fmt_eta(eta))
          t_last, steps_since = time.time(), 0
        if config.eval_every > 0 and (step % config.eval_every == 0 or step == schedule.total_steps):
          ev = evaluate(config, eval_fn, state.params, vae_vars, mesh)
          writer.write(step, ev, prefix='eval')
          logging.info('eval step %d: %s', step, ' '.join(f'{k} {v:.4f}' for k, v in ev.items()))
        if config.sample_every > 0 and (step % config.sample_every == 0 or step == schedule.total_steps):
          path = _sample_grid(config, vae_cfg, var_cfg, state, vae_vars, workdir, step, sampler_cache)
          if path:
            logging.info('wrote %s', path)
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
  if step >= schedule.total_steps and jax.process_count() == 1 and '://' not in workdir:
    # a self-contained model for `python -m var_jax.sample --checkpoint=<workdir>/model` / VARPipeline.from_checkpoint
    checkpoint.save_model(os.path.join(workdir, 'model'), vae_cfg, var_cfg, jax.device_get(vae_vars),
                          {'params': jax.device_get(state.params)})
    logging.info('wrote %s', os.path.join(workdir, 'model'))
  last['wall_time_s'] = time.time() - t_start
  return last


def _write_run_info(workdir: str, var_cfg: VARConfig, params, config):
  import json
  leaves = jax.tree_util.tree_leaves_with_path(params)
  n_params = sum(int(np.prod(x.shape)) for _, x in leaves)
  n_embed = sum(int(np.prod(x.shape)) for p, x in leaves
                if any(getattr(k, 'key', None) in ('class_emb', 'pos_1LC', 'lvl_embed', 'pos_start') for k in p))
  info = {'n_params': n_params, 'n_params_non_embedding': n_params - n_embed, 'depth': var_cfg.depth,
          'embed_dim': var_cfg.embed_dim, 'seq_len': var_cfg.seq_len,
          'train_flops_per_image': metrics_lib.var_train_flops_per_image(var_cfg),
          'global_batch_size': int(config.global_batch_size)}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'run_info.json'), 'w') as f:
    json.dump(info, f, indent=1)


def evaluate(config, eval_fn, params, vae_vars, mesh) -> Dict[str, float]:
  from var_jax.data import pipeline as data_lib
  per_process = config.global_batch_size // jax.process_count()
  ds = data_lib.make_eval_dataset(config.data, per_process, jax.process_index(), jax.process_count())
  tot = None
  for i, batch in enumerate(ds):
    if 0 <= config.eval_batches <= i:
      break
    out = jax.device_get(eval_fn(params, shd.host_local_to_global(batch, mesh), vae_vars))
    tot = out if tot is None else {k: tot[k] + out[k] for k in tot}
  if not tot or tot['count'] == 0:
    return {}
  n = tot['count']
  return {'loss': tot['loss_sum'] / n, 'acc': 100 * tot['acc_sum'] / n, 'loss_last': tot['loss_last_sum'] / n,
          'acc_last': 100 * tot['acc_last_sum'] / n, 'examples': n}


def _init_from_reference(path, var_cfg, state, shardings):
  from var_jax.interop import reference as ref
  v = ref.import_var(ref.load_state_dict(path), var_cfg)
  params = jax.device_put(v['params'], shardings.params)
  logging.info('initialised the transformer from %s', path)
  return state.replace(params=params)
