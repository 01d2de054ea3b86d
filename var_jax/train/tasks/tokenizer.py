"""Tokenizer (stage 1) training: the multi-scale VQVAE of VAR or the binary autoencoder (BAE) of ELM/BiGR, with
reconstruction, LPIPS and GAN losses plus the tokenizer's own term (VQ/commitment, or the BAE's code-book term).

``config.tokenizer`` picks the generator: ``'vqvae'`` (default; ``var_jax.models.vqvae.VQVAE``, ``config.vae``) or
``'bae'`` (``var_jax.models.bae.BinaryAutoEncoder``, ``config.bae``). One jitted step updates the generator and the
discriminator with separate optimizers:

  generator:     L_G = w_l1 |x - x'| + w_l2 (x - x')^2 + w_lpips LPIPS(x, x') + w_aux L_aux
                       + adopt(w_gan, disc_start) * lambda * (-E[D(x')])
                 L_aux = the VQ + commitment loss (``loss.vq``) or the BAE's ``code_book_loss`` (``loss.code``, the
                 reference's ``code_weight``); lambda = min(||dL_nll/dW_last|| / (||dL_gan/dW_last|| + 1e-4),
                 ``loss.disc_weight_max``) (VQGAN's adaptive weight, W_last = the decoder's last conv); one forward
                 and one full backward: the adaptive weight only needs the gradients at the last layer, computed
                 from d(loss)/d(x') through that conv alone.
  discriminator: hinge (or vanilla) loss on D(x) and D(sg(x')), from disc_start on.

Image ranges: the data pipeline gives [-1, 1]; the VQVAE works there. The BAE works on [0, 1] (the reference's
``ToTensor()`` range): it gets ``(x + 1) / 2``, its L1/L2 are measured on [0, 1] and its discriminator sees [0, 1]
images, as the reference ``BinaryGAN`` (so released ``disc.*`` weights fit). The reference BinaryGAN also feeds
LPIPS the [0, 1] images as they are (``loss.lpips_signed_input=False``, the default); ``True`` maps them to
LPIPS's intended [-1, 1] first. PSNR is always on [0, 1].

The BAE's training bits are Bernoulli samples (the reference ``encode()`` samples unless ``--deterministic``) drawn
from the key ``rng.stream(rng.step_key(seed, step), 'bernoulli_bits')``: reproducible, resumable, and independent of the
mesh (threefry keys are partitionable).

Codebook health: VQVAE: the EMA of per-scale code hits (the reference's ``ema_vocab_hit_SV`` schedule: copy, then
0.9, then 0.99), per-scale usage (% of codes whose EMA hits reach 8% of a uniform share, as the reference's
margin) and perplexity, logged every ``log_every`` steps from step 1; optional dead-code restart (codes whose EMA
hits fall below the margin are re-drawn from the batch's encoder features) and cosine (l2-normalised) code lookup
(``vae.using_znorm``) against collapse. BAE: per-channel mean bit activation, the number of channels that are not
constant over the batch (the reference's "unique codes used"), the mean binary entropy of the channel means, the
fraction of probabilities within 0.1 of 0.5 and the mean confidence |2p - 1|.

Optional EMA of the generator params (``config.ema.decay`` > 0: ``ema = decay * ema + (1 - decay) * params`` after
the optimizer step of every step s >= ``ema.start`` with s % ``ema.every`` == 0; the reference BAE recipe: 0.995
every 10 from step 1). At
the end the trained tokenizer is written into the workdir in the reference layout: ``vqvae.safetensors``, or
``binaryae.safetensors`` (+ ``binaryae.th`` when torch is installed; ``ae.*`` and ``disc.*`` keys, as the released
``binaryae*.th``), plus ``*_ema.*`` with the EMA params. ``init_from`` fine-tunes from a reference file; for the
BAE the ``disc.*`` tensors go into the discriminator where they fit and ``perceptual.*`` supplies LPIPS when
``loss.lpips_path`` is empty (what is skipped is logged by name).
"""
from __future__ import annotations

import importlib.util
from typing import Any, Dict, List, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from var_jax import sharding as shd
from var_jax.interop import gan as gan_io
from var_jax.dtypes import parse_dtype
from var_jax.eval.codebook import bit_statistics, psnr, update_code_ema, usage_margins
from var_jax.losses import gan as gan_losses
from var_jax.models.bae import UNUSED, BAEConfig, BAEGenerator, BinaryAutoEncoder
from var_jax.models.discriminator import DiscriminatorConfig, NLayerDiscriminator
from var_jax.models.layers import Conv
from var_jax.models.var_config import VQVAEConfig
from var_jax.models.vqvae import VQVAE
from var_jax.train import optim
from var_jax.train import rng as rng_lib
from var_jax.train import state as state_lib
from var_jax.train.tasks import base

logging = base.logging

TOKENIZERS = ('vqvae', 'bae')


@flax.struct.dataclass
class TokenizerState:
  step: jax.Array
  g_params: Any
  g_opt: Any
  vq_stats: Any          # the generator's other variables: VQVAE {'quantize': {'ema_vocab_hit_SV': (S, V)}};
  #                        BAE the 'unused' collection (tensors the reference stores but never reads)
  d_params: Any
  d_stats: Any           # discriminator batch_stats ({} without BatchNorm)
  d_opt: Any
  g_ema: Any = flax.struct.field(default_factory=dict)   # EMA of g_params ({} when config.ema is off)


# ----------------------------------------------------------------------------- the generator being trained
class VQVAETokenizer:
  """The multi-scale VQVAE as the trainer's generator (images in [-1, 1])."""
  kind = 'vqvae'
  aux_loss_name = 'vq_loss'
  stats_collection = 'vq_stats'
  vector_metrics = {'usage_per_scale': 'usage_scale{}', 'perplexity_per_scale': 'perplexity_scale{}'}

  def __init__(self, model: VQVAE, config, margins=None):
    self.model, self.config = model, model.config
    self.image_size, self.in_channels = model.config.image_size, model.config.in_channels
    self.margins = usage_margins(model.config, config.global_batch_size) if margins is None else margins
    self.restart_every = int(config.codebook.restart_every)
    self.aux_weight = float(config.loss.vq)

  def init(self, rng, x):
    return self.model.init(rng, x, method=VQVAE.init_all)

  def to_model(self, x):
    return x

  def to_signed(self, y):
    return y

  def lpips_view(self, y):
    return y

  def forward(self, params, stats, x, rng):
    rec, aux = self.model.apply({'params': params, 'vq_stats': stats}, x, True, rngs={'dropout': rng})
    return (rec, aux['pre_out'], aux['vq_loss']), aux

  def last_conv(self, params):
    return Conv(self.config.in_channels, 3, dtype=self.model.dtype), params['decoder']['conv_out']

  def after_update(self, g_params, stats, aux, step, rng):
    hits = aux['hits']                                         # (S, V) this step
    ema = update_code_ema(stats['quantize']['ema_vocab_hit_SV'], hits, step)
    if self.restart_every > 0:
      g_params, ema = _restart_dead_codes(g_params, ema, aux['features'], self.margins, step, self.restart_every,
                                          rng)
    probs = hits / jnp.maximum(hits.sum(-1, keepdims=True), 1)
    perplexity = jnp.exp(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-10)), -1))
    usage = jnp.mean(ema >= jnp.asarray(self.margins)[:, None], axis=-1) * 100
    return g_params, {'quantize': {'ema_vocab_hit_SV': ema}}, {'usage_per_scale': usage,
                                                               'perplexity_per_scale': perplexity}

  def reconstruct_signed(self, params, x):
    return self.model.apply({'params': params}, x, method=VQVAE.img_to_reconstructed_img)

  def code_histograms(self, params, stats, x):
    """TensorBoard histograms of codebook usage, per scale: each code's EMA hits over a uniform share (1: used
    uniformly, 0: dead)."""
    del params, x
    ema = stats['quantize']['ema_vocab_hit_SV']
    share = ema / jnp.maximum(ema.mean(-1, keepdims=True), 1e-12)
    return {f'codebook/usage_scale/{i:02d}': share[i] for i in range(ema.shape[0])}

  def log_line(self, m) -> str:
    usage = ' '.join(f'{m[f"usage_scale{i}"]:.0f}' for i in range(len(self.config.patch_nums)))
    return (f'l1 {m["l1"]:.4f} psnr {m["psnr"]:.2f} vq {m["vq_loss"]:.4f} g {m["g_loss"]:.3f} d {m["d_loss"]:.3f} '
            f'(w {m["d_weight"]:.3g}) usage/scale {usage}')

  def load_init(self, path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    from var_jax.interop import state_dict as sd_io
    from var_jax.interop import var as ref
    v = ref.import_vae(sd_io.load_state_dict(path), self.config)
    return {'params': v['params'], 'stats': v['vq_stats']}, {}

  def export(self, params, stats, disc_vars, path_stem: str) -> List[str]:
    from var_jax.interop import state_dict as sd_io
    from var_jax.interop import var as ref
    out = path_stem + '.safetensors'
    sd_io.save_state_dict(ref.export_vae({'params': params, 'vq_stats': stats}, self.config), out)
    return [out]

  export_stem = 'vqvae'
  export_hint = '--config.vae_ckpt for VAR training, or the reference code'


def _is_generator_norm_out(mdl, method_name: str) -> bool:
  return method_name == '__call__' and mdl.name == 'norm_out' and isinstance(mdl.parent, BAEGenerator)


class BAETokenizer:
  """The binary autoencoder as the trainer's generator (model images in [0, 1]; see the module doc)."""
  kind = 'bae'
  aux_loss_name = 'codebook_loss'
  stats_collection = UNUSED
  vector_metrics = {'bit_mean_per_channel': 'bit_mean_{}'}
  export_stem = 'binaryae'
  export_hint = "reference layout, 'ae.'/'disc.' keys: var_jax.interop.bae.load_bae or the reference load_pretrain"

  def __init__(self, model: BinaryAutoEncoder, config):
    self.model, self.config = model, model.config
    self.image_size, self.in_channels = model.config.resolution, model.config.in_channels
    self.aux_weight = float(config.loss.code)
    self.signed_lpips = bool(config.loss.lpips_signed_input)
    self.train_bits = config.train_bits
    if self.train_bits not in ('bernoulli', 'threshold'):
      raise ValueError(f"config.train_bits must be 'bernoulli' or 'threshold', got {self.train_bits!r}")

  def init(self, rng, x):
    return self.model.init(rng, self.to_model(x), train=False)

  def to_model(self, x):
    return (x + 1) * 0.5

  def to_signed(self, y):
    return y * 2 - 1

  def lpips_view(self, y):
    return y * 2 - 1 if self.signed_lpips else y

  def forward(self, params, stats, x, rng):
    del stats     # the 'unused' collection is never read
    (rec, aux), inter = self.model.apply({'params': params}, x, True, rng_lib.stream(rng, 'bernoulli_bits'),
                                         mode=self.train_bits, capture_intermediates=_is_generator_norm_out,
                                         mutable=['intermediates'])
    pre_out = inter['intermediates']['generator']['norm_out']['__call__'][0]
    return (rec, pre_out, aux['codebook_loss']), aux

  def last_conv(self, params):
    return Conv(self.config.in_channels, 3, dtype=self.model.dtype), params['generator']['conv_out']

  def after_update(self, g_params, stats, aux, step, rng):
    return g_params, stats, bit_statistics(aux['bits'], aux['probs'])

  def reconstruct_signed(self, params, x):
    rec, _ = self.model.apply({'params': params}, self.to_model(x), train=False)
    return self.to_signed(rec)

  def code_histograms(self, params, stats, x):
    """TensorBoard histograms of the codes of batch ``x``: each bit channel's mean (0 or 1: a constant bit) and the
    bit probabilities (near 0.5: undecided)."""
    del stats
    probs = self.model.apply({'params': params}, self.to_model(x), train=False)[1]['probs']
    return {'codebook/bit_mean': probs.reshape(-1, probs.shape[-1]).mean(0), 'codebook/bit_prob': probs}

  def log_line(self, m) -> str:
    bm = np.asarray([m[f'bit_mean_{i}'] for i in range(self.config.codebook_size)])
    return (f'l1 {m["l1"]:.4f} psnr {m["psnr"]:.2f} cb {m["codebook_loss"]:.4f} g {m["g_loss"]:.3f} '
            f'd {m["d_loss"]:.3f} (w {m["d_weight"]:.3g}) bits used {m["bits_used"]:.0f}/{bm.size} '
            f'mean {bm.min():.2f}..{bm.max():.2f} H {m["bit_entropy"]:.3f} near-0.5 {100 * m["probs_near_half"]:.1f}%')

  def load_init(self, path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    from var_jax.interop import bae as ibae
    from var_jax.interop import state_dict as sd_io
    own, extras = ibae.split_bae_state_dict(sd_io.load_state_dict(path), what=str(path))
    v = sd_io.import_state_dict(own, ibae.bae_table(self.config), f'BAE {path}')
    return {'params': v['params'], 'stats': v[UNUSED]}, extras

  def export(self, params, stats, disc_vars, path_stem: str) -> List[str]:
    """``ae.*`` (the BAE) and ``disc.*`` (taming layout) keys, like the released ``binaryae*.th``."""
    from var_jax.interop import bae as ibae
    from var_jax.interop import state_dict as sd_io
    sd = ibae.export_bae({'params': params, UNUSED: stats}, self.config, prefix=ibae.AE_PREFIX)
    if disc_vars is not None:
      sd.update(gan_io.export_discriminator(disc_vars[0], disc_vars[1], disc_vars[2], prefix='disc.'))
    paths = [path_stem + '.safetensors']
    if importlib.util.find_spec('torch') is not None:     # the .th the reference's load_pretrain reads
      paths.append(path_stem + '.th')
    for p in paths:
      sd_io.save_state_dict(sd, p)
    return paths


Tokenizer = Any   # VQVAETokenizer | BAETokenizer


def as_generator(model, config, margins=None) -> Tokenizer:
  """Wrap a ``VQVAE`` / ``BinaryAutoEncoder`` module (or pass an already wrapped one) for the trainer."""
  if isinstance(model, (VQVAETokenizer, BAETokenizer)):
    return model
  if isinstance(model, VQVAE):
    return VQVAETokenizer(model, config, margins)
  if isinstance(model, BinaryAutoEncoder):
    return BAETokenizer(model, config)
  raise TypeError(f'the tokenizer trainer trains a VQVAE or a BinaryAutoEncoder, got {type(model).__name__}')


# ----------------------------------------------------------------------------- the step
def make_step(generator, disc: NLayerDiscriminator, tx_g, tx_d, config, use_lpips: bool, margins=None):
  """The jittable ``step_fn(state, batch, lpips_params) -> (state, metrics)``. ``generator``: a ``VQVAE`` or
  ``BinaryAutoEncoder`` module (``margins``: the VQVAE's usage margins, default from the config)."""
  gen = as_generator(generator, config, margins)
  lc = config.loss
  max_weight = float(lc.disc_weight_max)
  ema = (float(config.ema.decay), int(config.ema.every), int(config.ema.start))

  from var_jax.models.lpips import lpips_distance

  def step_fn(state: TokenizerState, batch, lpips_params):
    x_signed = batch['image']
    x = gen.to_model(x_signed)
    lpips_fn = ((lambda a, b: lpips_distance(lpips_params, gen.lpips_view(a), gen.lpips_view(b), keepdims=False))
                if use_lpips else None)
    rng = rng_lib.step_key(config.seed, state.step)
    gan_w = gan_losses.adopt_weight(lc.gan, state.step, lc.disc_start)

    def forward(g_params):
      return gen.forward(g_params, state.vq_stats, x, rng)

    (rec, pre_out, aux_loss), vjp_fn, aux = jax.vjp(forward, state.g_params, has_aux=True)

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
    conv, last = gen.last_conv(state.g_params)
    _, conv_vjp = jax.vjp(lambda k: conv.apply({'params': {'kernel': k, 'bias': last['bias']}}, pre_out),
                          last['kernel'])
    if lc.adaptive:
      d_weight = gan_losses.adaptive_generator_weight(optax.tree.norm(conv_vjp(g_nll)[0]),
                                                      optax.tree.norm(conv_vjp(g_gan)[0]), max_weight)
    else:
      d_weight = jnp.float32(1.0)
    (g_grads,) = vjp_fn((g_nll + d_weight * gan_w * g_gan, jnp.zeros_like(pre_out), jnp.float32(gen.aux_weight)))
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

    # codebook health (VQVAE: code EMA, restart, usage; BAE: bit statistics)
    g_params, g_stats, health = gen.after_update(g_params, state.vq_stats, aux, state.step, rng)
    g_ema = state_lib.update_ema(state.g_ema, g_params, state.step, *ema) if ema[0] > 0 else state.g_ema
    m = {'l1': jnp.mean(jnp.abs(x - rec)), 'l2': jnp.mean(jnp.square(x - rec)),
         'psnr': psnr(x_signed, gen.to_signed(rec)), 'nll': nll, gen.aux_loss_name: aux_loss, 'g_loss': g_loss,
         'd_weight': d_weight, 'gan_weight': gan_w, 'd_loss': d_loss, 'logits_real': real_m, 'logits_fake': fake_m,
         'g_grad_norm': optax.tree.norm(g_grads), **health}
    if lpips_fn is not None:
      m['lpips'] = jnp.mean(lpips_fn(x, jax.lax.stop_gradient(rec)))
    new = TokenizerState(step=state.step + 1, g_params=g_params, g_opt=g_opt, vq_stats=g_stats, d_params=d_params,
                         d_stats=d_stats, d_opt=d_opt, g_ema=g_ema)
    return new, m

  return step_fn


def _restart_dead_codes(g_params, ema, features, margins, step, every, rng):
  """Every ``every`` steps, codes whose EMA hits are below the margin at every scale are re-initialised from
  random encoder feature vectors of the batch (plus a little noise); their EMA is reset to the margin."""
  emb = g_params['quantize']['embedding']
  v, c = emb.shape
  dead = jnp.all(ema < jnp.asarray(margins)[:, None], axis=0)                      # (V,)
  pool = features.reshape(-1, c)
  k1, k2 = jax.random.split(rng_lib.stream(rng, 'codebook_restart'))
  pick = pool[jax.random.randint(k1, (v,), 0, pool.shape[0])]
  pick = pick + 0.01 * jnp.std(pool) * jax.random.normal(k2, pick.shape)
  do = jnp.logical_and((step + 1) % every == 0, dead)
  new_emb = jnp.where(do[:, None], jax.lax.stop_gradient(pick), emb)
  new_ema = jnp.where(do[None, :], jnp.asarray(margins)[:, None], ema)
  g_params = dict(g_params)
  g_params['quantize'] = dict(g_params['quantize'], embedding=new_emb)
  return g_params, new_ema


# ----------------------------------------------------------------------------- setup
def tokenizer_kind(config) -> str:
  kind = config.tokenizer
  if kind not in TOKENIZERS:
    raise ValueError(f'config.tokenizer={kind!r}: expected one of {TOKENIZERS}')
  return kind


def tokenizer_configs(config) -> Tuple[Any, DiscriminatorConfig]:
  """(VQVAEConfig or BAEConfig as ``config.tokenizer`` says, DiscriminatorConfig), checked against the data."""
  disc_cfg = DiscriminatorConfig(**config.disc.to_dict())
  size = config.data.image_size
  if tokenizer_kind(config) == 'bae':
    gen_cfg = BAEConfig(**config.bae.to_dict())
    gen_cfg.check_image_size(size)
  else:
    gen_cfg = VQVAEConfig(**config.vae.to_dict())
    if gen_cfg.image_size != size:
      raise ValueError(f'config.data.image_size={size} but the tokenizer maps {gen_cfg.image_size}px'
                       f' images to patch_nums {gen_cfg.patch_nums}')
  if disc_cfg.output_size(size) < 1:
    raise ValueError(f'the discriminator ({disc_cfg}) has no output for {size}px images: use fewer layers')
  return gen_cfg, disc_cfg


def build_generator(config, gen_cfg=None, margins=None) -> Tokenizer:
  """The trainer's generator for ``config`` (the model in ``config.dtype``)."""
  if gen_cfg is None:
    gen_cfg, _ = tokenizer_configs(config)
  dtype = parse_dtype(config.dtype, 'config.dtype')
  if isinstance(gen_cfg, BAEConfig):
    return BAETokenizer(BinaryAutoEncoder(gen_cfg, dtype=dtype), config)
  return VQVAETokenizer(VQVAE(gen_cfg, dtype=dtype), config, margins)


def load_lpips(config, extras: Optional[Mapping[str, Any]] = None):
  """The frozen LPIPS-VGG params (host arrays), or None when its weight is 0. They enter the jitted step as an
  argument (not a closure constant, which would bake ~59 MB of weights into the compiled program).

  Taken from ``config.loss.lpips_path``, else from the ``perceptual.*`` tensors of a released BAE file
  (``extras``, the ``disc.*``/``perceptual.*`` part of ``config.init_from``)."""
  if config.loss.lpips <= 0:
    return None
  from var_jax.interop import lpips as lpips_io
  if config.loss.lpips_path:
    return lpips_io.load_converted(config.loss.lpips_path)
  if extras and any(k.startswith('perceptual.') for k in extras):
    return gan_io.lpips_from_perceptual(extras)
  raise ValueError('config.loss.lpips > 0 needs config.loss.lpips_path: convert the torchvision VGG16 and LPIPS '
                   'weights once with `python -m var_jax.interop.lpips --vgg=... --lin=... --out=...` (a released '
                   'BAE file given as config.init_from also carries them as perceptual.*)')




def init_fn(generator, disc: NLayerDiscriminator, tx_g, tx_d, config, mesh, rules):
  """(init(rng) -> TokenizerState, its abstract value, its shardings): generator and discriminator params sharded
  by their logical axis names, each optimizer state following its params, the EMA its generator params.
  ``generator``: a ``VQVAE`` / ``BinaryAutoEncoder`` module or a wrapped one (``as_generator``)."""
  gen = as_generator(generator, config)
  s = gen.image_size
  x = jnp.zeros((2, s, s, gen.in_channels))
  ema_on = float(config.ema.decay) > 0
  col = gen.stats_collection

  def init_boxed(rng):
    k1, k2 = jax.random.split(rng)
    return gen.init(k1, x), disc.init(k2, gen.to_model(x), False)

  boxed_g, boxed_d = jax.eval_shape(init_boxed, jax.random.key(0))
  g_sh = shd.logical_to_shardings(boxed_g, mesh, rules)
  d_sh = shd.logical_to_shardings(boxed_d, mesh, rules)

  def init(rng):
    gv, dv = state_lib.unbox(init_boxed(rng))
    g_params, d_params = gv['params'], dv['params']
    return TokenizerState(step=jnp.zeros((), jnp.int32), g_params=g_params, g_opt=tx_g.init(g_params),
                          vq_stats=gv.get(col, {}), d_params=d_params,
                          d_stats={k: v for k, v in dv.items() if k != 'params'}, d_opt=tx_d.init(d_params),
                          g_ema=jax.tree.map(lambda p: p + 0, g_params) if ema_on else {})

  abstract = jax.eval_shape(init, jax.random.key(0))
  rep = shd.replicated(mesh)

  def opt_sh(tx, opt_abstract, param_sh):
    return optax.tree_map_params(tx, lambda _, s_: s_, opt_abstract, param_sh, transform_non_params=lambda _: rep)

  shardings = TokenizerState(
      step=rep, g_params=g_sh['params'], g_opt=opt_sh(tx_g, abstract.g_opt, g_sh['params']),
      vq_stats=g_sh.get(col, {}), d_params=d_sh['params'], d_stats={k: v for k, v in d_sh.items() if k != 'params'},
      d_opt=opt_sh(tx_d, abstract.d_opt, d_sh['params']), g_ema=g_sh['params'] if ema_on else {})
  return init, abstract, shardings


def init_from(gen, state: TokenizerState, shardings, disc_cfg, config, path: str = None) -> TokenizerState:
  """``path`` (default ``config.init_from``) into a fresh state: the generator strictly, discriminator tensors
  where they fit (the rest named in a warning)."""
  path = path or config.init_from
  g, extras = gen.load_init(path)
  state = state.replace(g_params=jax.device_put(g['params'], shardings.g_params),
                        vq_stats=jax.device_put(g['stats'], shardings.vq_stats))
  if float(config.ema.decay) > 0:
    state = state.replace(g_ema=jax.device_put(g['params'], shardings.g_ema))
  logging.info('initialised the %s from %s', gen.kind, path)
  disc_sd = {k[len('disc.'):]: v for k, v in extras.items() if k.startswith('disc.')}
  if disc_sd:
    d_params, d_stats, imported, skipped = gan_io.import_discriminator_partial(disc_sd, disc_cfg, state.d_params,
                                                                              state.d_stats)
    state = state.replace(d_params=jax.device_put(d_params, shardings.d_params),
                          d_stats=jax.device_put(d_stats, shardings.d_stats))
    logging.info('init_from: %d disc.* tensors imported into the discriminator', len(imported))
    if skipped:
      logging.warning('init_from: skipped disc.* tensors that do not fit the discriminator: %s',
                      ', '.join('disc.' + s for s in skipped))
  n_perc = sum(k.startswith('perceptual.') for k in extras)
  loss = config.loss
  if n_perc and (loss.lpips <= 0 or loss.lpips_path):
    logging.warning('init_from: %d perceptual.* tensors not used (%s)', n_perc,
                    'LPIPS is off' if loss.lpips <= 0 else f'LPIPS comes from {loss.lpips_path}')
  return state


def make_optimizers(config, total_steps: int):
  """(generator, discriminator) optimizers from ``config.optim_g`` / ``config.optim_d`` (no decay mask: every
  parameter, as ``optax.adamw``)."""
  return tuple(optim.make_optimizer(o, config.global_batch_size, total_steps, float(o.warmup_steps), mask=None)
               for o in (config.optim_g, config.optim_d))


class TokenizerTask(base.Task):
  """The VQVAE or the BAE with its discriminator. Its state is a ``TokenizerState`` (two models with two optimizers:
  ``TrainState`` holds one) built from the same pieces: the optimizer factory, the EMA rule, born sharded."""
  has_periodic_output = True

  def __init__(self, config, mesh, num_train_examples: int, rules=None):
    super().__init__(config, mesh, rules)
    if config.grad_accum != 1:
      raise ValueError(f'config.grad_accum={config.grad_accum}: the tokenizer step does not micro-batch (use 1)')
    self.gen_cfg, self.disc_cfg = tokenizer_configs(config)
    self.gen = build_generator(config, self.gen_cfg)
    self.name = self.gen.kind
    self.vector_metrics = self.gen.vector_metrics
    self.disc = NLayerDiscriminator(self.disc_cfg)
    self.schedule = base.total_steps(config, num_train_examples)
    self.tx_g, self.tx_d = make_optimizers(config, self.schedule.total_steps)
    self._init, self.abstract, self.shardings = init_fn(self.gen, self.disc, self.tx_g, self.tx_d, config, mesh,
                                                        self.rules)
    self._recon = jax.jit(self.gen.reconstruct_signed)
    self._histograms = jax.jit(self.gen.code_histograms)
    self._lr = {f'lr_{k}': optim.lr_schedule(o, config.global_batch_size, self.schedule.total_steps,
                                             float(o.warmup_steps)) for k, o in (('g', config.optim_g),
                                                                                 ('d', config.optim_d))}

  @property
  def frozen_input_keys(self):
    """LPIPS's weights file, or the released BAE file (``init_from``) whose perceptual.* tensors it takes."""
    loss = self.config.loss
    if loss.lpips <= 0:
      return ()
    if loss.lpips_path or not (self.gen.kind == 'bae' and self.config.init_from):
      return ('loss.lpips_path',)
    return ('init_from',)

  def load_frozen(self):
    """The frozen LPIPS weights ({} when LPIPS is off), replicated."""
    config, extras = self.config, {}
    if self.gen.kind == 'bae' and config.init_from and config.loss.lpips > 0 and not config.loss.lpips_path:
      extras = self.gen.load_init(config.init_from)[1]
    lpips = load_lpips(config, extras)
    if extras and lpips is not None:
      logging.info('LPIPS from the perceptual.* tensors of %s', config.init_from)
    return {} if lpips is None else jax.device_put(lpips, shd.replicated(self.mesh))

  def frozen_shapes(self):
    """LPIPS-VGG's shapes from its layout table (no weights file needed), {} when LPIPS is off."""
    from var_jax.interop import lpips as lpips_io
    return lpips_io.abstract_params() if self.config.loss.lpips > 0 else {}

  def init_state(self):
    return state_lib.born_sharded(self._init, self.shardings, self.config.seed)

  def init_from(self, state, path):
    return init_from(self.gen, state, self.shardings, self.disc_cfg, self.config, path)

  def train_step(self, stage):
    return make_step(self.gen, self.disc, self.tx_g, self.tx_d, self.config, self.config.loss.lpips > 0)

  def describe(self, state):
    return (f'{self.gen.kind.upper()} params {state_lib.num_params(state.g_params) / 1e6:.2f}M, discriminator '
            f'{state_lib.num_params(state.d_params) / 1e6:.2f}M')

  def log_line(self, m):
    return self.gen.log_line(m)

  def step_metrics(self, step, stage):
    return {k: float(f(step)) for k, f in self._lr.items()}

  def periodic_output(self, state, batch, step, workdir):
    """Originals (top row) over reconstructions (bottom row)."""
    from var_jax import images as images_lib
    x = batch['image'][:min(8, batch['image'].shape[0])]
    x, rec, hists = shd.to_host((x, self._recon(state.g_params, x),     # every process takes part
                                 self._histograms(state.g_params, state.vq_stats, x)))
    if jax.process_index() != 0:
      return None
    top, bot = images_lib.to_uint8((np.asarray(x) + 1) / 2), images_lib.to_uint8((np.asarray(rec) + 1) / 2)
    grid = np.concatenate([np.concatenate(list(top), 1), np.concatenate(list(bot), 1)], 0)
    return base.image_output(workdir, 'reconstructions', step, grid, hists)

  def export_tree(self, state):
    return {'g_params': state.g_params, 'vq_stats': state.vq_stats, 'd_params': state.d_params,
            'd_stats': state.d_stats, 'g_ema': state.g_ema}

  def export(self, host, workdir, step):
    paths = export_tokenizer(self.gen, host, self.disc_cfg, workdir)
    return [(p, self.gen.export_hint) for p in paths]


def export_tokenizer(gen, state, disc_cfg: DiscriminatorConfig, workdir: str) -> List[str]:
  """Write the trained tokenizer (and its EMA, if kept) into ``workdir`` in the reference layout; -> paths.
  ``state``: a ``TokenizerState`` or the dict of its fields (host arrays)."""
  get = (lambda k: state[k]) if isinstance(state, dict) else (lambda k: getattr(state, k))
  params, stats = jax.device_get(get('g_params')), jax.device_get(get('vq_stats'))
  disc_vars = (disc_cfg, jax.device_get(get('d_params')), jax.device_get(get('d_stats')).get('batch_stats', {}))
  paths = gen.export(params, stats, disc_vars, f'{workdir}/{gen.export_stem}')
  if jax.tree.leaves(get('g_ema')):
    paths += gen.export(jax.device_get(get('g_ema')), stats, disc_vars, f'{workdir}/{gen.export_stem}_ema')
  return paths
