"""Shared config pieces. Each ``configs/<name>.py`` has ``get_config()`` returning an ``ml_collections.ConfigDict``;
every value can be overridden on the command line: ``--config=configs/var_d16.py --config.optim.base_lr=8e-5``.
"""
import dataclasses

import ml_collections

from var_jax.data.pipeline import default_data_config
from var_jax.train.optim import REFERENCE_NOWD_KEYS
from var_jax.models.var_config import PATCH_NUMS_256, PATCH_NUMS_512, VARConfig, VQVAEConfig


def _fields(cls, **overrides):
  d = {f.name: f.default for f in dataclasses.fields(cls)}
  d.update(overrides)
  return d   # tuples stay tuples: overridable from the command line as --config.x='(1, 2)'


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = 'var'                # var_jax.train.tasks: 'var' | 'tokenizer' | 'elm_ar' | 'elm_mlm' | 'bigr'
  c.seed = 0

  # ---- data (var_jax.data) ----
  c.data = default_data_config()   # every field documented there
  c.data.update(name='folder',      # 'folder' (train/<class>/*), 'tfds' (ArrayRecord via tfds.data_source), 'digits'
                tfds_data_dir='', num_workers=8)

  # ---- stage 1: the frozen tokenizer ----
  c.vae = ml_collections.ConfigDict(_fields(VQVAEConfig))
  c.vae_ckpt = ''               # reference .pth/.safetensors, or a var_jax model checkpoint dir; '' = random init
  c.vae_dtype = 'float32'       # tokenisation precision (argmin over codes: keep float32)

  # ---- stage 2: the transformer ----
  c.model = ml_collections.ConfigDict(_fields(VARConfig))
  c.init_from = ''              # optional reference VAR .pth/.safetensors to fine-tune from

  # ---- optimisation (the reference recipe) ----
  c.global_batch_size = 768
  c.epochs = 200.0
  c.total_steps = -1            # -1: train `epochs` epochs; > 0 overrides epochs; 0 is an error (not 'no training')
  c.grad_accum = 1              # micro-batches per optimizer step (global_batch_size is per step)
  c.label_smoothing = 0.0       # the reference's default (--ls)
  c.dtype = 'bfloat16'          # transformer compute dtype ('float16': with dynamic loss scaling, optim.loss_scale);
                                # params and optimizer state stay float32
  c.optim = ml_collections.ConfigDict(dict(
      base_lr=1e-4, lr_batch_ref=256,        # lr = base_lr * global_batch_size / 256
      b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.05, weight_decay_end=-1.0,   # -1: same as weight_decay (cosine from wd to wd_end)
      schedule='lin0', warmup_epochs=-1.0,   # -1: epochs / 50
      warmup_start=0.005, end_ratio=0.01,    # wp0, wpe
      grad_clip=2.0,
      nowd_keys=REFERENCE_NOWD_KEYS,         # no weight decay on params whose path contains one of these
      # what the schedules count with grad_accum > 1: 'step' (optimizer steps) or 'micro_batch' (the reference:
      # lr/wd of the step's last micro-batch, warmup/total in micro-batch iterations); equal when grad_accum == 1
      schedule_unit='step',
      # dtype='float16' only: torch GradScaler as the reference's AmpOptimizer (a scale > max is reset to max)
      loss_scale=dict(init=2.0 ** 11, growth_interval=1000, growth_factor=2.0, backoff_factor=0.5, max=2.0 ** 15),
  ))
  # EMA of the params (0: off): ema <- decay * ema + (1 - decay) * params at steps s >= start, s % every == 0
  c.ema = ml_collections.ConfigDict(dict(decay=0.0, every=1, start=0))
  # progressive training (the reference's --pg/--pg0/--pgwp): grow the number of scales over [0, fraction]
  c.progressive = ml_collections.ConfigDict(dict(fraction=0.0, start_stage=4, warmup_epochs=-1.0))
  # a reference train.py command line ('--depth=16 --bs=768 --ep=200 --fp16=1 ...'), applied with the reference's
  # defaults and meanings when training starts (var_jax.train.reference_args; README "Training" has the table)
  c.reference_args = ''

  # ---- sharding (var_jax.sharding) ----
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = ()     # () = var_jax.sharding.LOGICAL_AXIS_RULES; else ((logical, mesh axes), ...)

  # ---- loop ----
  c.log_every = 50
  c.ckpt_every = 1000
  c.keep_ckpts = 3
  # a non-finite loss / grad norm: 'stop' (exit with an error naming the step; nothing non-finite is saved) or
  # 'skip' (the update is dropped and counted); var_jax.train.nonfinite
  c.nonfinite = 'stop'
  c.eval_every = 5000
  c.eval_batches = -1           # -1: the whole eval split
  c.sample_every = 5000
  c.sample_classes = (207, 360, 387, 974, 88, 979, 417, 279)
  c.sample = ml_collections.ConfigDict(dict(cfg=1.5, top_k=900, top_p=0.96))
  # the digits quality score (var_jax.eval.digits: class accuracy, Frechet distance) of this many samples per class
  # at every sample_every step, in metrics.jsonl / TensorBoard as quality/*; 0: off. Built-in digits only
  c.quality_per_class = 0

  # ---- a run's identity (var_jax.train.identity): a rerun resumes a workdir's checkpoint only when its config and
  # frozen inputs (tokenizer / LPIPS weights by sha256, the data's split size and classes, the token cache's
  # manifest) are the checkpoint's, except for these dotted keys (a key covers its sub-tree):
  # resume_safe: what may always change (how long, how often, how fast / on what hardware; not what is learnt)
  c.resume_safe = ('total_steps,epochs,log_every,ckpt_every,keep_ckpts,eval_every,eval_batches,sample_every,'
                   'sample_classes,sample,quality_per_class,nonfinite,global_batch_size,grad_accum,mesh,'
                   'logical_axis_rules,model.remat,init_from,reference_args,export_name,data.num_workers,'
                   'data.worker_buffer_size,data.read_threads,data.read_buffer_size,data.max_skip_fraction,'
                   'data.eval_split')
  # resume_changes: what this rerun may change besides (e.g. 'optim.base_lr,vae_ckpt'; '*': anything)
  c.resume_changes = ''
  return c


def var_recipe(depth: int, **kw) -> ml_collections.ConfigDict:
  """The reference README's training command for VAR-d{depth} on ImageNet."""
  c = base()
  is512 = depth == 36
  pn = PATCH_NUMS_512 if is512 else PATCH_NUMS_256
  c.vae.patch_nums = pn
  c.vae_ckpt = 'vae_ch160v4096z32.pth'
  c.data.image_size = 512 if is512 else 256
  c.model.update(_fields(VARConfig, depth=depth, embed_dim=64 * depth, num_heads=depth,
                         drop_path_rate=0.1 * depth / 24, shared_aln=is512, patch_nums=pn))
  recipe = {   # depth: (global batch, epochs, base lr, init_adaln_gamma, end_ratio (wpe), final wd)
      16: (768, 200, 1e-4, 1e-3, 0.1, -1.0),
      20: (768, 250, 1e-4, 1e-3, 0.1, -1.0),
      24: (768, 350, 8e-5, 1e-4, 0.01, -1.0),
      30: (1024, 350, 8e-5, 1e-5, 0.01, 0.08),
      36: (768, 350, 8e-5, 5e-6, 0.01, 0.08),
  }[depth]
  c.global_batch_size, c.epochs, c.optim.base_lr, c.model.init_adaln_gamma, c.optim.end_ratio, \
      c.optim.weight_decay_end = recipe
  # Defaults from the AOT table (docs/aot.md): d16/d20 replicate (3.5 / 6.7 GiB of f32 params + AdamW + EMA per
  # chip), d24+ shard them over every chip (FSDP: 11.5-26.3 GiB replicated, more than a v5e's 16 GiB), and d30/d36
  # rematerialise their blocks (on v5e-64 without remat the recipe's activations alone take 25 / 22+ GiB per chip).
  # VAR-d30's 1920 channels do not split 256 ways: on 256 chips --config.mesh.fsdp=128 --config.mesh.data=-1.
  if depth >= 24:
    c.mesh.update(data=1, fsdp=-1, tensor=1)
  else:
    c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.model.remat = depth >= 30
  for k, v in kw.items():
    c[k] = v
  return c


def tokenizer_base() -> ml_collections.ConfigDict:
  """Tokenizer (VQVAE) training: ``python -m var_jax.train --config=configs/vqvae_*.py`` (``task='tokenizer'``)."""
  c = base()
  c.task = 'tokenizer'
  c.tokenizer = 'vqvae'         # the generator: 'vqvae' (config.vae) or 'bae' (config.bae)
  for k in ('model', 'init_from', 'vae_ckpt', 'vae_dtype', 'optim', 'progressive', 'label_smoothing',
            'sample_classes', 'sample', 'eval_every', 'eval_batches', 'reference_args', 'quality_per_class'):
    del c[k]
  c.grad_accum = 1              # the tokenizer step takes the whole batch (no micro-batching)
  c.init_from = ''              # a reference VQVAE .pth/.safetensors to fine-tune (e.g. vae_ch160v4096z32.pth)
  c.dtype = 'float32'
  c.loss = ml_collections.ConfigDict(dict(
      l1=1.0, l2=0.0, vq=1.0,
      lpips=1.0, lpips_path='',  # converted LPIPS-VGG weights (python -m var_jax.interop.lpips ...); 0 disables
      gan=0.5, disc_start=20000, disc_loss='hinge', adaptive=True,
      disc_weight_max=1e4,       # clip of VQGAN's adaptive weight
  ))
  c.disc = ml_collections.ConfigDict(dict(ndf=64, n_layers=3, norm='batch', in_channels=3))
  for name in ('optim_g', 'optim_d'):   # absolute lr; var_jax.train.optim's schedules ('constant', 'cos', ...)
    c[name] = ml_collections.ConfigDict(dict(lr=1e-4, b1=0.5, b2=0.9, eps=1e-8, weight_decay=0.0,
                                             weight_decay_end=-1.0, warmup_steps=0, warmup_start=0.0,
                                             schedule='constant', end_ratio=0.0, grad_clip=0.0))
  c.ema = ml_collections.ConfigDict(dict(decay=0.0, every=1, start=1))   # of the generator
  # codebook health: restart dead codes every N steps (0: off)
  c.codebook = ml_collections.ConfigDict(dict(restart_every=0))
  return c
