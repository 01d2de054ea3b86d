"""Tokenizer (stage 1) training: the multi-scale VQVAE with reconstruction, VQ/commitment, LPIPS and GAN losses.

One jitted step updates the generator (VQVAE) and the discriminator with separate optimizers:

  generator:     L_G = w_l1 |x - x'| + w_l2 (x - x')^2 + w_lpips LPIPS(x, x') + w_vq L_vq
                       + adopt(w_gan, disc_start) * lambda * (-E[D(x')])
                 lambda = ||dL_nll/dW_last|| / (||dL_gan/dW_last|| + 1e-4) (VQGAN's adaptive weight, W_last = the
                 decoder's last conv); one forward and one full backward: the adaptive weight only needs the
                 gradients at the last layer, computed from d(loss)/d(x') through that conv alone.
  discriminator: hinge (or vanilla) loss on D(x) and D(sg(x')), from disc_start on.

Codebook health: the EMA of per-scale code hits (the reference's ``ema_vocab_hit_SV`` schedule: copy, then 0.9,
then 0.99), per-scale usage (% of codes whose EMA hits reach 8% of a uniform share, as the reference's margin) and
perplexity, logged every ``log_every`` steps from step 1; optional dead-code restart (codes whose EMA hits fall
below the margin are re-drawn from the batch's encoder features) and cosine (l2-normalised) code lookup
(``vae.using_znorm``) against collapse.
"""
from __future__ import annotations

import logging as std_logging
import os
import time
from typing import Any, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.core import meta

from var_jax import sharding as shd
from var_jax.models.configs import VQVAEConfig
from var_jax.models.discriminator import DiscriminatorConfig, NLayerDiscriminator
from var_jax.models.layers import Conv
from var_jax.models.vqvae import VQVAE
from var_jax.train import gan_losses
from var_jax.train import loop_common
from var_jax.train import metrics as metrics_lib

logging = std_logging.getLogger('var_jax.train')


@flax.struct.dataclass
class TokenizerState:
  step: jax.Array
  g_params: Any
  g_opt: Any
  vq_stats: Any          # {'quantize': {'ema_vocab_hit_SV': (S, V)}}
  d_params: Any
  d_stats: Any           # discriminator batch_stats ({} without BatchNorm)
  d_opt: Any


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  """Adam(W) with linear warmup then constant or cosine decay; optional global-norm clipping."""
  warm = int(cfg.get('warmup_steps', 0))
  if cfg.get('schedule', 'constant') == 'cosine':
    lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(warm, 1), max(total_steps, warm + 1),
                                            cfg.lr * cfg.get('end_ratio', 0.0))
  else:
    lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, max(warm, 1)), optax.constant_schedule(cfg.lr)],
                              [max(warm, 1)])
  parts = []
  if cfg.get('grad_clip', 0) > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.get('weight_decay', 0.0)))
  return optax.chain(*parts)


def psnr(x, y):
  """PSNR in dB of images in [-1, 1] (measured on [0, 1])."""
  mse = jnp.mean(jnp.square((jnp.clip(x, -1, 1) - jnp.clip(y, -1, 1)) / 2), axis=(1, 2, 3))
  return jnp.mean(10 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)))


def update_code_ema(ema, hits, step):
  """The reference's ema_vocab_hit_SV update: copy at the first step, 0.9/0.1 below 100 steps, then 0.99/0.01."""
  decay = jnp.where(step == 0, 0.0, jnp.where(step < 100, 0.9, 0.99))
  return ema * decay + hits * (1 - decay)


def usage_margins(vae_cfg: VQVAEConfig, global_batch: int) -> np.ndarray:
  """Per-scale hit threshold: 8% of a uniform share of that scale's tokens per step (the reference's margin)."""
  return np.array([global_batch * p * p / vae_cfg.vocab_size * 0.08 for p in vae_cfg.patch_nums], np.float32)


def make_step(vae: VQVAE, disc: NLayerDiscriminator, tx_g, tx_d, config, use_lpips: bool, margins):
  lc = config.loss
  vae_cfg = vae.config
  restart_every = int(config.codebook.restart_every)

  from var_jax.models.lpips import lpips_distance

  def step_fn(state: TokenizerState, batch, lpips_params):
    x = batch['image']
    lpips_fn = (lambda a, b: lpips_distance(lpips_params, a, b, keepdims=False)) if use_lpips else None
    rng = jax.random.fold_in(jax.random.key(int(config.seed)), state.step)
    gan_w = gan_losses.adopt_weight(lc.gan, state.step, lc.disc_start)

    def forward(g_params):
      rec, aux = vae.apply({'params': g_params, 'vq_stats': state.vq_stats}, x, True, rngs={'dropout': rng})
      return (rec, aux['pre_out'], aux['vq_loss']), aux

    (rec, pre_out, vq_loss), vjp_fn, aux = jax.vjp(forward, state.g_params, has_aux=True)

    def nll_fn(r):
      l = lc.l1 * jnp.mean(jnp.abs(x - r)) + lc.l2 * jnp.mean(jnp.square(x - r))
      if lpips_fn is not None:
        l = l + lc.lpips * jnp.mean(lpips_fn(x, r))
      return l

    def gan_fn(r):
      logits, _ = disc.apply({'params': state.d_params, **state.d_stats}, r, True, mutable=['batch_stats'])
      return gan_losses.generator_loss(logits)

    nll, g_nll = jax.value_and_grad(nll_fn)(rec)
    g_loss, g_gan = jax.value_and_grad(gan_fn)(rec)
    # adaptive weight from the gradients at the decoder's last conv only
    last = state.g_params['decoder']['conv_out']
    conv = Conv(vae_cfg.in_channels, 3, dtype=vae.dtype)
    _, conv_vjp = jax.vjp(lambda k: conv.apply({'params': {'kernel': k, 'bias': last['bias']}}, pre_out),
                         last['kernel'])
    if lc.adaptive:
      d_weight = gan_losses.adaptive_generator_weight(optax.tree.norm(conv_vjp(g_nll)[0]),
                                                      optax.tree.norm(conv_vjp(g_gan)[0]))
    else:
      d_weight = jnp.float32(1.0)
    (g_grads,) = vjp_fn((g_nll + d_weight * gan_w * g_gan, jnp.zeros_like(pre_out), jnp.float32(lc.vq)))
    g_upd, g_opt = tx_g.update(g_grads, state.g_opt, state.g_params)
    g_params = optax.apply_updates(state.g_params, g_upd)

    # discriminator
    def d_loss_fn(d_params):
      lr_, st = disc.apply({'params': d_params, **state.d_stats}, x, True, mutable=['batch_stats'])
      lf, st = disc.apply({'params': d_params, **st}, jax.lax.stop_gradient(rec), True, mutable=['batch_stats'])
      loss_fn = gan_losses.hinge_d_loss if lc.disc_loss == 'hinge' else gan_losses.vanilla_d_loss
      return gan_w * loss_fn(lr_, lf), (st, lr_.mean(), lf.mean())

    (d_loss, (d_stats, real_m, fake_m)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state.d_params)
    d_upd, d_opt = tx_d.update(d_grads, state.d_opt, state.d_params)
    active = gan_w > 0     # before disc_start the discriminator (and its BatchNorm stats) stay untouched
    d_params = jax.tree.map(lambda n, o: jnp.where(active, n, o), optax.apply_updates(state.d_params, d_upd),
                            state.d_params)
    d_opt = jax.tree.map(lambda n, o: jnp.where(active, n, o), d_opt, state.d_opt)
    d_stats = jax.tree.map(lambda n, o: jnp.where(active, n, o), d_stats, state.d_stats)

    # codebook health
    hits = aux['hits']                                         # (S, V) this step
    ema = update_code_ema(state.vq_stats['quantize']['ema_vocab_hit_SV'], hits, state.step)
    if restart_every > 0:
      g_params, ema = _restart_dead_codes(g_params, ema, aux['features'], margins, state.step, restart_every, rng)
    probs = hits / jnp.maximum(hits.sum(-1, keepdims=True), 1)
    perplexity = jnp.exp(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-10)), -1))
    usage = jnp.mean(ema >= jnp.asarray(margins)[:, None], axis=-1) * 100
    m = {'l1': jnp.mean(jnp.abs(x - rec)), 'l2': jnp.mean(jnp.square(x - rec)), 'psnr': psnr(x, rec),
         'nll': nll, 'vq_loss': vq_loss, 'g_loss': g_loss, 'd_weight': d_weight, 'gan_weight': gan_w,
         'd_loss': d_loss, 'logits_real': real_m, 'logits_fake': fake_m, 'usage_per_scale': usage,
         'perplexity_per_scale': perplexity, 'g_grad_norm': optax.tree.norm(g_grads)}
    if lpips_fn is not None:
      m['lpips'] = jnp.mean(lpips_fn(x, jax.lax.stop_gradient(rec)))
    new = TokenizerState(step=state.step + 1, g_params=g_params, g_opt=g_opt,
                         vq_stats={'quantize': {'ema_vocab_hit_SV': ema}}, d_params=d_params, d_stats=d_stats,
                         d_opt=d_opt)
    return new, m

  return step_fn


def _restart_dead_codes(g_params, ema, features, margins, step, every, rng):
  """Every ``every`` steps, codes whose EMA hits are below the margin at every scale are re-initialised from
  random encoder feature vectors of the batch (plus a little noise); their EMA is reset to the margin."""
  emb = g_params['quantize']['embedding']
  v, c = emb.shape
  dead = jnp.all(ema < jnp.asarray(margins)[:, None], axis=0)                      # (V,)
  pool = features.reshape(-1, c)
  k1, k2 = jax.random.split(jax.random.fold_in(rng, 1))
  pick = pool[jax.random.randint(k1, (v,), 0, pool.shape[0])]
  pick = pick + 0.01 * jnp.std(pool) * jax.random.normal(k2, pick.shape)
  do = jnp.logical_and((step + 1) % every == 0, dead)
  new_emb = jnp.where(do[:, None], jax.lax.stop_gradient(pick), emb)
  new_ema = jnp.where(do[None, :], jnp.asarray(margins)[:, None], ema)
  g_params = dict(g_params)
  g_params['quantize'] = dict(g_params['quantize'], embedding=new_emb)
  return g_params, new_ema


# ----------------------------------------------------------------------------- setup
def tokenizer_configs(config) -> Tuple[VQVAEConfig, DiscriminatorConfig]:
  vae_cfg = VQVAEConfig(**config.vae.to_dict())
  if vae_cfg.image_size != config.data.image_size:
    raise ValueError(f'config.data.image_size={config.data.image_size} but the tokenizer maps {vae_cfg.image_size}px'
                     f' images to patch_nums {vae_cfg.patch_nums}')
  return vae_cfg, DiscriminatorConfig(**config.disc.to_dict())


def load_lpips(config):
  """The frozen LPIPS-VGG params (host arrays), or None when its weight is 0. They enter the jitted step as an
  argument (not a closure constant, which would bake ~59 MB of weights into the compiled program)."""
  if config.loss.lpips <= 0:
    return None
  if not config.loss.lpips_path:
    raise ValueError('config.loss.lpips > 0 needs config.loss.lpips_path: convert the torchvision VGG16 and LPIPS '
                     'weights once with `python -m var_jax.models.lpips --vgg=... --lin=... --out=...`')
  from var_jax.models import lpips as lpips_lib
  return lpips_lib.load_converted(config.loss.lpips_path)


def init_state(vae: VQVAE, disc: NLayerDiscriminator, tx_g, tx_d, config, mesh, rules):
  s = vae.config.image_size
  x = jnp.zeros((2, s, s, vae.config.in_channels))

  def init_boxed(rng):
    k1, k2 = jax.random.split(rng)
    gv = vae.init(k1, x, method=VQVAE.init_all)
    dv = disc.init(k2, x, False)
    return gv, dv

  boxed_g, boxed_d = jax.eval_shape(init_boxed, jax.random.key(0))
  g_sh = shd.logical_to_shardings(boxed_g, mesh, rules)
  d_sh = shd.logical_to_shardings(boxed_d, mesh, rules)

  def init(rng):
    gv, dv = meta.unbox(init_boxed(rng))
    g_params, d_params = gv['params'], dv['params']
    d_stats = {k: v for k, v in dv.items() if k != 'params'}
    return TokenizerState(step=jnp.zeros((), jnp.int32), g_params=g_params, g_opt=tx_g.init(g_params),
                          vq_stats=gv['vq_stats'], d_params=d_params, d_stats=d_stats, d_opt=tx_d.init(d_params))

  abstract = jax.eval_shape(init, jax.random.key(0))
  rep = shd.replicated(mesh)
  shardings = TokenizerState(
      step=rep, g_params=g_sh['params'],
      g_opt=optax.tree_map_params(tx_g, lambda _, s_: s_, abstract.g_opt, g_sh['params'],
                                  transform_non_params=lambda _: rep),
      vq_stats=g_sh['vq_stats'], d_params=d_sh['params'], d_stats={k: v for k, v in d_sh.items() if k != 'params'},
      d_opt=optax.tree_map_params(tx_d, lambda _, s_: s_, abstract.d_opt, d_sh['params'],
                                  transform_non_params=lambda _: rep))
  return init, abstract, shardings


def _recon_grid(vae_fn, state, batch, workdir, step):
  """Originals (top row) over reconstructions (bottom row)."""
  from PIL import Image
  from var_jax.sample import to_uint8
  n = min(8, batch['image'].shape[0])
  x = np.asarray(jax.device_get(batch['image']))[:n]
  rec = np.asarray(jax.device_get(vae_fn(state.g_params, jnp.asarray(x))))
  top, bot = to_uint8((x + 1) / 2), to_uint8((rec + 1) / 2)
  grid = np.concatenate([np.concatenate(list(top), 1), np.concatenate(list(bot), 1)], 0)
  return loop_common.write_png(workdir, 'reconstructions', step, Image.fromarray(grid))


def train_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Train the VQVAE as ``config`` says, in ``workdir`` (resumes automatically). Returns the last metrics."""
  from var_jax import checkpoint
  from var_jax.data import pipeline as data_lib
  from var_jax.interop import reference as ref

  mesh, rules = loop_common.setup_mesh(config)
  per_process = config.global_batch_size // jax.process_count()
  n_train = len(data_lib.make_source(config.data, config.data.train_split))
  spe = data_lib.epoch_steps(n_train, config.global_batch_size)
  total = int(config.total_steps) if config.total_steps > 0 else max(int(round(config.epochs * spe)), 1)
  train_iter = iter(data_lib.make_train_dataset(config.data, per_process, config.seed, jax.process_index(),
                                                jax.process_count()))

  vae_cfg, disc_cfg = tokenizer_configs(config)
  dtype = jnp.bfloat16 if config.dtype == 'bfloat16' else jnp.float32
  vae, disc = VQVAE(vae_cfg, dtype=dtype), NLayerDiscriminator(disc_cfg)
  tx_g, tx_d = make_optimizer(config.optim_g, total), make_optimizer(config.optim_d, total)
  init_fn, abstract, shardings = init_state(vae, disc, tx_g, tx_d, config, mesh, rules)
  lpips_params = load_lpips(config)
  lpips_params = {} if lpips_params is None else jax.device_put(lpips_params, shd.replicated(mesh))
  margins = usage_margins(vae_cfg, config.global_batch_size)

  ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, 'checkpoints'), config.ckpt_every, config.keep_ckpts)

  def fresh():
    with shd.mesh_context(mesh, rules):
      state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(config.seed))
    if config.init_from:
      v = ref.import_vae(ref.load_state_dict(config.init_from), vae_cfg)
      state = state.replace(g_params=jax.device_put(v['params'], shardings.g_params),
                            vq_stats=jax.device_put(v['vq_stats'], shardings.vq_stats))
      logging.info('initialised the tokenizer from %s', config.init_from)
    return state

  state, _ = loop_common.restore_or_init(ckpt, abstract, shardings, train_iter, fresh, f'{workdir}/checkpoints')
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.g_params))
  logging.info('VQVAE params %.2fM, discriminator %.2fM; %d steps (%d per epoch)', n_params / 1e6,
               sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.d_params)) / 1e6, total, spe)

  step_fn = jax.jit(make_step(vae, disc, tx_g, tx_d, config, bool(lpips_params), margins),
                    in_shardings=(shardings, shd.batch_sharding(mesh), shd.replicated(mesh)),
                    out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=(0,))
  recon_fn = jax.jit(lambda g, x: vae.apply({'params': g}, x, method=VQVAE.img_to_reconstructed_img))
  writer = metrics_lib.MetricWriter(metrics_lib.local_logdir(workdir))
  preempt = loop_common.Preemption()
  step = int(jax.device_get(state.step))
  t_last, since, last, t0 = time.time(), 0, {}, time.time()
  try:
    with shd.mesh_context(mesh, rules):
      while step < total:
        batch = shd.host_local_to_global(next(train_iter), mesh)
        state, m = step_fn(state, batch, lpips_params)
        step += 1
        since += 1
        if step % config.log_every == 0 or step == total or step == 1:
          m = jax.device_get(m)
          dt = (time.time() - t_last) / since
          last = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
          for i, (u, p) in enumerate(zip(m['usage_per_scale'], m['perplexity_per_scale'])):
            last[f'usage_scale{i}'], last[f'perplexity_scale{i}'] = float(u), float(p)
          last.update(step_time=dt, images_per_s=config.global_batch_size / dt)
          writer.write(step, last)
          logging.info('step %d/%d l1 %.4f psnr %.2f vq %.4f g %.3f d %.3f (w %.3g) usage/scale %s %.1f img/s ETA %s',
                       step, total, last['l1'], last['psnr'], last['vq_loss'], last['g_loss'], last['d_loss'],
                       last['d_weight'], ' '.join(f'{u:.0f}' for u in m['usage_per_scale']),
                       last['images_per_s'], loop_common.fmt_eta((total - step) * dt))
          t_last, since = time.time(), 0
        if config.sample_every > 0 and (step % config.sample_every == 0 or step == total):
          path = _recon_grid(recon_fn, state, batch, workdir, step)
          if path:
            logging.info('wrote %s', path)
        stop = loop_common.should_stop(preempt, ckpt, step)
        ckpt.maybe_save(step, state, train_iter, config, force=step == total or stop)
        if stop:
          ckpt.wait()
          logging.warning('preempted at step %d: checkpoint saved, exiting', step)
          break
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
    preempt.restore()
  if step >= total and jax.process_count() == 1 and '://' not in workdir:
    out = os.path.join(workdir, 'vqvae.safetensors')
    v = {'params': jax.device_get(state.g_params), 'vq_stats': jax.device_get(state.vq_stats)}
    ref.save_state_dict(ref.export_vae(v, vae_cfg), out)
    logging.info('wrote %s (reference layout: --config.vae_ckpt for VAR training, or the reference code)', out)
  last['wall_time_s'] = time.time() - t0
  return last
