"""VAR (stage 2): next-scale prediction on the tokens of a frozen multi-scale VQVAE.

Step: tokens from the frozen VQVAE on device inside the step (or read from ``config.data.token_cache``, built once by
``var_jax.data.token_cache``), teacher-forcing input, label-smoothed CE with 1/L token weights (progressive
training: up to the stage's scale, the newest scale's weight ramped), class-label dropout and drop path from the
step key, gradient accumulation, the reference AdamW recipe. Eval: CE / accuracy
overall and at the last scale. Periodic output: a sample grid. Export: ``<workdir>/model`` (``VARPipeline.
from_checkpoint`` / ``python -m var_jax.sample --checkpoint``) and ``run_info.json`` for scaling-law fits.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from var_jax import fileio
from var_jax import sharding as shd
from var_jax.losses.tokens import label_smoothed_cross_entropy
from var_jax.models.var import VAR
from var_jax.models.var_config import VARConfig, VQVAEConfig
from var_jax.models.vqvae import VQVAE
from var_jax.dtypes import parse_dtype
from var_jax.train import metrics as metrics_lib
from var_jax.train import optim
from var_jax.train import rng as rng_lib
from var_jax.train.state import unbox
from var_jax.train.tasks import base

EMBEDDING_PARAMS = ('class_emb', 'pos_1LC', 'lvl_embed', 'pos_start')


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


@dataclasses.dataclass(frozen=True)
class Schedule(base.Schedule):
  """``total_steps`` optimizer steps; the lr / wd / progressive schedules count *iterations*: optimizer steps
  (``optim.schedule_unit='step'``, ``iters_per_step == 1``) or micro-batches ('micro_batch': the reference's
  counting, ``iters_per_step == grad_accum``). ``warmup_steps`` / ``prog_warmup_steps`` / ``total_iters`` are in
  iterations; optimizer step ``s`` is at iteration ``(s + 1) x iters_per_step - 1`` (its last micro-batch)."""
  warmup_steps: float
  prog_fraction: float
  prog_start: int
  prog_warmup_steps: float
  num_scales: int
  iters_per_step: int = 1
  total_iters: int = -1         # -1: total_steps

  @property
  def schedule_total(self) -> int:
    return self.total_steps if self.total_iters < 0 else self.total_iters

  def stage(self, step: int) -> Tuple[int, float]:
    """Progressive training (the reference's pg/pg0/pgwp): (scale index to train up to or -1 for all, the
    loss weight ramp of the newest scale), at the step's (last) iteration."""
    if self.prog_fraction <= 0:
      return -1, 1.0
    total = self.schedule_total

    def si_at(it):
      if it <= self.warmup_steps:
        return self.prog_start
      if it >= total * self.prog_fraction:
        return self.num_scales - 1
      delta = self.num_scales - 1 - self.prog_start
      progress = min(max((it - self.warmup_steps) / (total * self.prog_fraction - self.warmup_steps), 0), 1)
      return self.prog_start + round(progress * delta)

    it = int(optim.schedule_iteration(step, self.iters_per_step))
    si = si_at(it)
    start = it
    while start > 0 and si_at(start - 1) == si:
      start -= 1
      if it - start > self.prog_warmup_steps + 1:
        break
    ramp = 1.0 if si == self.prog_start else max(min((it - start + 1) / max(self.prog_warmup_steps, 1e-9), 1),
                                                 0.01)
    return (-1 if si == self.num_scales - 1 else si), ramp


def make_schedule(config, num_train_examples: int) -> Schedule:
  """'step' unit: ``ceil(n / global_batch)`` steps per epoch, warmups in those steps. 'micro_batch' unit (the
  reference under ``--ac``): an epoch is ``ceil(n / (global_batch / accum))`` micro-batch iterations, the run
  ``round(epochs x that)`` iterations (or ``total_steps x accum``) and ``iterations // accum`` optimizer steps,
  the warmups ``wp x iterations per epoch``."""
  s = base.total_steps(config, num_train_examples)
  unit = optim.schedule_unit(config.optim)
  accum = int(config.grad_accum) if unit == 'micro_batch' else 1
  pg = config.progressive
  if accum == 1:
    spe_it, total_it, total = s.steps_per_epoch, s.total_steps, s.total_steps
  else:
    from var_jax.data.pipeline import epoch_steps
    spe_it = epoch_steps(num_train_examples, config.global_batch_size // accum)
    total_it = (int(config.total_steps) * accum if config.total_steps > 0
                else max(int(round(config.epochs * spe_it)), accum))
    total = total_it // accum
  epochs = total_it / spe_it
  wp_ep = config.optim.warmup_epochs if config.optim.warmup_epochs >= 0 else epochs / 50
  pgwp_ep = pg.warmup_epochs if pg.warmup_epochs >= 0 else epochs / 300
  return Schedule(s.steps_per_epoch, total, wp_ep * spe_it, float(pg.fraction), int(pg.start_stage),
                  pgwp_ep * spe_it, len(config.model.patch_nums), accum, total_it)


DEFAULT_SCHEDULE = 'lin0'   # the reference's --sche default (and configs.common.base()'s)


def lr_schedule_name(config) -> str:
  """The lr schedule the run uses. With progressive training (``progressive.fraction = pg > 0``) the reference
  replaces ``--sche`` by ``lin<pg>`` (``utils/arg_util.py``): so do we when ``optim.schedule`` is the default
  'lin0' (or already ``lin<pg>``); any other schedule with ``pg > 0`` is an error rather than silently dropped."""
  sche, pg = str(config.optim.schedule), float(config.progressive.fraction)
  if pg <= 0:
    return sche
  derived = f'lin{pg:g}'
  if sche in (DEFAULT_SCHEDULE, derived):
    return derived
  raise ValueError(f'config.progressive.fraction={pg:g} makes the reference use schedule {derived!r} '
                   f'(arg_util.py: sche = lin<pg>), but config.optim.schedule={sche!r}: set it to '
                   f'{DEFAULT_SCHEDULE!r} or {derived!r}')


def tokens(vae: VQVAE, vae_vars, images):
  """Images -> (all scales' token ids (B, L), the teacher-forcing input (B, L - first_l, Cvae))."""
  idx = vae.apply(vae_vars, images, method=VQVAE.img_to_idx)
  x_in = vae.apply(vae_vars, idx, method=VQVAE.idx_to_var_input)
  return jnp.concatenate(idx, axis=1), jax.lax.stop_gradient(x_in)


def batch_tokens(vae: VQVAE, vae_vars, batch):
  """``tokens`` of a batch: its cached ``'tokens'`` (B, L) (``config.data.token_cache``: no encoder pass) or
  its ``'image'`` encoded."""
  if 'tokens' not in batch:
    return tokens(vae, vae_vars, batch['image'])
  bounds = np.cumsum([0] + [p * p for p in vae.config.patch_nums])
  idx = [batch['tokens'][:, b:e] for b, e in zip(bounds[:-1], bounds[1:])]
  return batch['tokens'], jax.lax.stop_gradient(vae.apply(vae_vars, idx, method=VQVAE.idx_to_var_input))


def load_tokenizer(config, vae_cfg: VQVAEConfig, mesh):
  """The frozen VQVAE's variables, replicated: from a reference file, our checkpoint dir, or a seeded init."""
  from var_jax.interop import state_dict as sd_io
  from var_jax.interop import var as var_io
  path = config.vae_ckpt
  if not path:
    s = vae_cfg.image_size
    v = base.random_tokenizer('vae_ckpt', config.seed, lambda k: VQVAE(vae_cfg).init(
        k, jnp.zeros((1, s, s, vae_cfg.in_channels)), method=VQVAE.init_all))
  elif fileio.isdir(path):           # our model directory (local or gs://)
    from var_jax import checkpoint
    cfg_ckpt, _, v, _ = checkpoint.load_model(path)
    if cfg_ckpt != vae_cfg:
      raise ValueError(f'{path}: the tokenizer checkpoint config {cfg_ckpt} differs from config.vae {vae_cfg}')
  else:
    sd = sd_io.load_state_dict(path)
    got = var_io.vae_config_from_state_dict(sd, patch_nums=vae_cfg.patch_nums)
    if (got.vocab_size, got.z_channels, got.ch) != (vae_cfg.vocab_size, vae_cfg.z_channels, vae_cfg.ch):
      raise ValueError(f'{path}: tokenizer V/Cvae/ch = {got.vocab_size}/{got.z_channels}/{got.ch}, config.vae has '
                       f'{vae_cfg.vocab_size}/{vae_cfg.z_channels}/{vae_cfg.ch}')
    v = var_io.import_vae(sd, vae_cfg)
  return jax.device_put({'params': v['params']}, shd.replicated(mesh))


def _scale_stats(per_tok, correct, var_cfg: VARConfig, ed: int):
  """Per-scale mean CE and accuracy over the scales up to ``ed``, (K',) each."""
  out_l, out_a = [], []
  for b, e in var_cfg.begin_ends:
    if e <= ed:
      out_l.append(per_tok[:, b:e].mean())
      out_a.append(correct[:, b:e].mean())
  return jnp.stack(out_l), jnp.stack(out_a)


class VARTask(base.Task):
  name = 'VAR'
  vector_metrics = {'loss_per_scale': 'loss_scale{}', 'acc_per_scale': 'acc_scale{}'}
  has_eval = True
  has_periodic_output = True
  frozen_input_keys = ('vae_ckpt',)

  def __init__(self, config, mesh, num_train_examples: int, rules=None):
    from var_jax.train import reference_args
    if config.get('reference_args', '') and reference_args.resolve(config).to_dict() != config.to_dict():
      # the loop reads global_batch_size, grad_accum and data before building the task: resolve first
      raise ValueError('config.reference_args is not applied to this config: pass '
                       'var_jax.train.reference_args.resolve(config) (the loop must resolve before it reads '
                       'the batch size and data settings)')
    super().__init__(config, mesh, rules)
    self.vae_cfg, self.var_cfg = model_configs(config)
    if config.data.token_cache:                      # before any work: crop recipe, source, VQVAE config
      from var_jax.data import token_cache
      token_cache.check_config(config)
    self.schedule = sch = make_schedule(config, num_train_examples)
    dtype = parse_dtype(config.dtype, 'config.dtype')
    self.var = VAR(self.var_cfg, dtype=dtype)
    self.vae = VQVAE(self.vae_cfg, dtype=parse_dtype(config.vae_dtype, 'config.vae_dtype'))
    kw = dict(schedule=lr_schedule_name(config), accum=sch.iters_per_step)
    # float16 compute: dynamic loss scaling (bfloat16 / float32 need none)
    loss_scale = config.optim.get('loss_scale', {}) if dtype == jnp.float16 else None
    self.tx = optim.make_optimizer(config.optim, config.global_batch_size, sch.schedule_total, sch.warmup_steps,
                                   loss_scale=loss_scale, **kw)
    self.lr_schedule = optim.lr_schedule(config.optim, config.global_batch_size, sch.schedule_total,
                                         sch.warmup_steps, **kw)
    self.train_flops_per_example = metrics_lib.var_train_flops_per_image(self.var_cfg)
    self.tokens_per_example = self.var_cfg.seq_len
    self._set_state_shapes(jax.eval_shape(self._init_boxed, jax.random.key(0))['params'])
    self._sampler = None
    base.check_quality_config(config, self.var_cfg.num_classes)

  def load_frozen(self):
    v = load_tokenizer(self.config, self.vae_cfg, self.mesh)
    if self.config.data.token_cache:                 # the cache's tokens come from these weights
      from var_jax.data import token_cache
      token_cache.check_vae(self.config.data.token_cache, v)
    return v

  def _init_boxed(self, rng):
    c = self.var_cfg
    return self.var.init(rng, jnp.zeros((1,), jnp.int32), jnp.zeros((1, c.seq_len - c.first_l, c.z_channels)))

  def init_params(self, rng):
    return unbox(self._init_boxed(rng)['params']), None

  def init_from(self, state, path):
    from var_jax.interop import state_dict as sd_io
    from var_jax.interop import var as var_io
    v = var_io.import_var(sd_io.load_state_dict(path), self.var_cfg)
    base.logging.info('initialised the transformer from %s', path)
    params = jax.device_put(v['params'], self.shardings.params)
    return state.replace(params=params, opt_state=jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)(
        params), ema=params if self._ema_fn() else state.ema)

  # ---- steps
  def stage(self, step):
    si, ramp = self.schedule.stage(step)
    return si, (jnp.float32(ramp),)

  def train_step(self, prog_si: int):
    cfg, config = self.var_cfg, self.config
    ed = cfg.seq_len if prog_si < 0 else cfg.begin_ends[prog_si][1]
    bg = 0 if prog_si < 0 else cfg.begin_ends[prog_si][0]
    accum, ls, seed = int(config.grad_accum), float(config.label_smoothing), int(config.seed)
    last_b = cfg.begin_ends[prog_si if prog_si >= 0 else -1][0]

    def step_fn(state, batch, vae_vars, prog_wp):
      lw = jnp.full((ed,), 1.0 / cfg.seq_len, jnp.float32)
      if prog_si >= 0:
        lw = lw.at[bg:ed].multiply(jnp.clip(prog_wp, 0.0, 1.0))
      scale = optim.loss_scale_of(state.opt_state)     # float16: differentiate loss x scale

      def micro(params, mb, key):
        gt, x_in = batch_tokens(self.vae, vae_vars, mb)
        gt, x_in = gt[:, :ed], x_in[:, :ed - cfg.first_l]

        def loss_fn(p):
          logits = self.var.apply({'params': p}, mb['label'], x_in, deterministic=False, rngs={'dropout': key})
          per_tok = label_smoothed_cross_entropy(logits, gt, ls)
          loss = jnp.mean(jnp.sum(per_tok * lw, axis=-1))
          return (loss if scale is None else loss * scale), (loss, logits)

        (_, (loss, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        ce = label_smoothed_cross_entropy(logits, gt, 0.0)
        correct = (jnp.argmax(logits, -1) == gt).astype(jnp.float32)
        sl, sa = _scale_stats(ce, correct, cfg, ed)
        return grads, {'train_loss': loss, 'loss': ce.mean(), 'acc': correct.mean() * 100,
                       'loss_last': ce[:, last_b:].mean(), 'acc_last': correct[:, last_b:].mean() * 100,
                       'loss_per_scale': sl, 'acc_per_scale': sa * 100}

      grads, m = base.accumulate(micro, state.params, batch, rng_lib.step_key(seed, state.step), accum)
      m['grad_norm'] = optax.tree.norm(grads)
      if scale is not None:                            # grads are of loss x scale; the optimizer unscales
        m['grad_norm'] = m['grad_norm'] / scale
        m['loss_scale'] = scale
      return self.apply_gradients(state, grads), m

    return step_fn

  def eval_step(self):
    cfg = self.var_cfg
    lb = cfg.begin_ends[-1][0]

    def eval_fn(params, batch, vae_vars, key):
      del key
      gt, x_in = tokens(self.vae, vae_vars, batch['image'])
      logits = self.var.apply({'params': params}, batch['label'], x_in)
      ce = label_smoothed_cross_entropy(logits, gt, 0.0)
      correct = (jnp.argmax(logits, -1) == gt).astype(jnp.float32)
      w = batch['mask'].astype(jnp.float32)
      n = jnp.sum(w)
      return {'loss': (jnp.sum(ce.mean(1) * w), n), 'acc': (100 * jnp.sum(correct.mean(1) * w), n),
              'loss_last': (jnp.sum(ce[:, lb:].mean(1) * w), n),
              'acc_last': (100 * jnp.sum(correct[:, lb:].mean(1) * w), n), 'examples': (n, 1.0)}

    return eval_fn

  # ---- reporting and outputs
  def describe(self, state):
    unit = 'steps' if self.schedule.iters_per_step == 1 else 'micro-batch iterations'
    return f'{super().describe(state)}, warmup {self.schedule.warmup_steps:.0f} {unit}'

  def step_metrics(self, step, stage):
    return dict(super().step_metrics(step, stage), prog_si=stage)

  def log_line(self, m):
    return (f'loss {m["loss"]:.4f} (last {m["loss_last"]:.4f}) acc {m["acc"]:.2f}% (last {m["acc_last"]:.2f}%) '
            f'gnorm {m["grad_norm"]:.3f} lr {m["lr"]:.3g}')

  def periodic_output(self, state, batch, step, workdir):
    """A grid of ``config.sample_classes`` and (``config.quality_per_class`` > 0) the digits quality score of the
    exported weights (the EMA when kept), both at the ``config.sample`` settings with keys ``fold_in(seed, i)``."""
    from var_jax import images as images_lib
    from var_jax.sampling import var as sampling
    config = self.config
    if self._sampler is None:
      opts = sampling.SamplingOptions(cfg=config.sample.cfg, top_k=config.sample.top_k, top_p=config.sample.top_p)
      self._sampler = sampling.make_sampler(self.vae_cfg, self.var_cfg, opts)
    variables = self.export_tree(state)

    def sample(labels):
      labels = np.asarray(labels, np.int32) % self.var_cfg.num_classes
      keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(config.seed), i))(jnp.arange(len(labels)))
      imgs, _ = self._sampler(self.frozen, variables, jnp.asarray(labels), keys)
      imgs = shd.to_host(imgs)                                 # every process takes part
      return imgs if jax.process_index() == 0 else None

    labels = np.asarray(config.sample_classes, np.int32) % self.var_cfg.num_classes
    imgs = sample(labels)
    scalars = base.quality_scalars(config, sample)
    if jax.process_index() != 0:
      return None
    grid = images_lib.labelled_grid(images_lib.to_uint8(imgs), labels.tolist(),
                                    cols=min(len(labels), 8))
    return base.image_output(workdir, 'samples', step, grid, scalars=scalars)

  def run_info(self, state):
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    n_params = sum(int(np.prod(x.shape)) for _, x in leaves)
    n_embed = sum(int(np.prod(x.shape)) for p, x in leaves if any(getattr(k, 'key', None) in EMBEDDING_PARAMS
                                                                   for k in p))
    c = self.var_cfg
    return {'n_params': n_params, 'n_params_non_embedding': n_params - n_embed, 'depth': c.depth,
            'embed_dim': c.embed_dim, 'seq_len': c.seq_len, 'train_flops_per_image': self.train_flops_per_example,
            'global_batch_size': int(self.config.global_batch_size)}

  def export_tree(self, state):
    return {'params': state.ema if self._ema_fn() else state.params}

  def export(self, host, workdir, step):
    """A self-contained model for ``python -m var_jax.sample --checkpoint=<workdir>/model``."""
    from var_jax import checkpoint
    path = f'{workdir}/model'
    checkpoint.save_model(path, self.vae_cfg, self.var_cfg, jax.device_get(self.frozen), {'params': host['params']})
    return [(path, 'VARPipeline.from_checkpoint / python -m var_jax.sample --checkpoint')]
