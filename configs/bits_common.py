"""Shared base of the ELM (AR / MLM) and BiGR training configs: ``python -m var_jax.train --config=configs/<x>.py``
with ``task`` = 'elm_ar' | 'elm_mlm' | 'bigr' (``var_jax.train.tasks.bits``).

Not a config itself (no ``get_config``): the ``configs/elm_*.py`` / ``configs/bigr_*.py`` files load it by path and
call ``base(task)``, ``elm_recipe(...)`` or ``bigr_recipe(...)``. Every value stays overridable on the command line
(``--config.optim.lr=2e-4 --config.model.token_each=1 --config.bae_ckpt=/ckpt/binaryae_ema.th``).

Recipes (the reference training scripts, read at the commits the fixtures use):

* ELM, Pepper-lll/LMforImageGeneration ``train_ddp.py`` + ``train.sh``: AdamW(0.9, 0.95) (betas hard-coded),
  lr 1e-4 constant (``--lr_decay`` off), weight decay 0.05 on parameters with ndim > 1 that are not biases, grad
  clip 1.0, global batch 256, 400 epochs, bf16 autocast, EMA 0.9999 of every step, token/residual/FFN dropout 0.1,
  label dropout 0.1 (``class_dropout_prob``), ``--hm-dist 0`` (plain cross-entropy), MLM ``smoothing`` =
  ``--smoothing`` = 0.0 and ``gen_iter`` = ``--gen_iter_num`` (default 10), center crop + random flip, the BAE's
  Bernoulli-sampled bits.
* BiGR, haoosz/BiGR ``train_ddp.py`` + ``script/train.sh``: AdamW(0.9, 0.95), lr 1e-4 constant (``--warmup 0``),
  weight decay 2e-2 (same groups, and none on ``denoise_mlp``), grad clip 1.0 (``--max-grad-norm``), global batch
  512, bf16, EMA 0.9999, residual/FFN dropout 0.1, token dropout 0.0, label dropout 0.1, ``--p_flip --focal 0.0``
  (alpha -1: the weighted BCE), ``--use_adaLN``, T = 256 diffusion steps. train.sh asks for 10000 epochs (run until
  stopped by hand); ``epochs = 400`` here is our default, not the script's.
"""
import dataclasses
import importlib.util
import os

import ml_collections

from var_jax.models.bae import BAEConfig
from var_jax.models.bigr import BIGR_PRESETS, BiGRConfig
from var_jax.models.elm import GPT_PRESETS, ELMConfig

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_common', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py'))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)   # configs are loaded by path (--config=configs/x.py), not as a package

TASKS = ('elm_ar', 'elm_mlm', 'bigr')
# VAR-only entries of common.base() that the bits trainer does not read
_VAR_ONLY = ('vae', 'vae_ckpt', 'vae_dtype', 'model', 'init_from', 'optim', 'progressive', 'label_smoothing',
             'sample')


def _fields(cls, drop=(), **overrides):
  d = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in drop}
  unknown = sorted(set(overrides) - set(d))
  if unknown:
    raise KeyError(f'{cls.__name__} has no field(s) {unknown}')
  d.update(overrides)
  return d


def base(task: str) -> ml_collections.ConfigDict:
  """The reference recipe of ``task`` at the ImageNet 256px settings, for a model size the caller fills in."""
  if task not in TASKS:
    raise ValueError(f'task must be one of {TASKS}, got {task!r}')
  elm = task != 'bigr'
  c = common.base()                      # seed, data, mesh, logical_axis_rules, loop settings
  for k in _VAR_ONLY:
    del c[k]
  c.task = task

  # ---- data: ToTensor() range [0, 1] is what the BAE sees ((x + 1) / 2 of the pipeline's [-1, 1]) ----
  # The reference crops ADM-style (BOX halving, BICUBIC resize of the shorter side, center crop) and flips; the
  # shared pipeline resizes with Lanczos and crops at random along the longer side (mid_reso=1: no margin).
  c.data.update(mid_reso=1.0, hflip=True)

  # ---- the frozen tokenizer: the released 256px BAE architecture (BAEConfig defaults) ----
  c.bae = ml_collections.ConfigDict(_fields(BAEConfig, drop=('use_tanh',)))
  c.bae_ckpt = ''                        # reference binaryae*.th / .safetensors; '' = a random-init BAE
  c.bae_dtype = 'float32'                # the bits are thresholds of probabilities: keep float32
  c.bae_bits = 'bernoulli'               # training bits: 'bernoulli' (u < p, the references) or 'threshold' (p > 0.5)

  # ---- the model: the reference ModelArgs fields, as train_ddp.py passes them ----
  if elm:
    c.model = ml_collections.ConfigDict(_fields(
        ELMConfig, drop=('modeling',), num_classes=1000, block_size=256, token_dropout_p=0.1,
        resid_dropout_p=0.1, ffn_dropout_p=0.1, drop_path_rate=0.0, class_dropout_prob=0.1, smoothing=0.0,
        gen_iter=10))
    c.hm_dist = 0                        # --hm-dist: 0 = cross-entropy (train.sh); > 0 the Hamming soft labels
  else:
    c.model = ml_collections.ConfigDict(_fields(
        BiGRConfig, num_classes=1000, block_size=256, seq_len=256, cls_token_num=1, token_dropout_p=0.0,
        resid_dropout_p=0.1, ffn_dropout_p=0.1, drop_path_rate=0.0, class_dropout_prob=0.1, p_flip=True,
        focal=0.0, alpha=-1.0, aux=0.0, n_sample_steps=256, infer_steps=100, use_adaLN=True))
  c.init_from = ''                       # a reference checkpoint (model.pth / bigr.pt) to fine-tune from

  # ---- optimisation ----
  c.global_batch_size = 256 if elm else 512
  c.epochs = 400.0
  c.total_steps = -1                     # > 0 overrides epochs
  c.grad_accum = 1                       # micro-batches per optimizer step
  c.dtype = 'bfloat16'                   # model compute dtype (the reference's bf16 autocast); params stay f32
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4,                           # absolute (no batch-size scaling in either reference)
      b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.05 if elm else 2e-2, weight_decay_end=-1.0,   # -1: constant
      schedule='constant',               # 'constant' (after warmup), or var_jax.train.optim's 'cos', 'lin0', ...
      warmup_steps=0, warmup_start=0.0,  # linear warmup from warmup_start * lr (the references: from 0)
      end_ratio=0.01,                    # final lr / lr for the decaying schedules (ELM --min_lr 1e-6 = 0.01)
      grad_clip=1.0,
  ))
  c.ema = ml_collections.ConfigDict(dict(decay=0.9999, every=1, start=0))   # 0 disables; the export holds the EMA

  # ---- loop / output ----
  c.log_every = 100
  c.ckpt_every = 10000
  c.eval_every = 10000
  c.eval_batches = 50                    # -1: the whole eval split
  # sample grids every sample_every steps (and at the end; 0: none) of sample_classes (mod num_classes), to
  # <workdir>/samples and TensorBoard: ELMPipeline / BiGRPipeline.sample with these keyword arguments over its
  # release settings (e.g. cfg, top_k, num_iter)
  c.sample = ml_collections.ConfigDict()
  c.export_name = 'model.pth' if elm else 'bigr.pt'   # reference layout; '.safetensors' works without torch
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c


def elm_recipe(size: str, modeling: str, token_each: int, code_dim: int) -> ml_collections.ConfigDict:
  """ELM ``GPT-{size}`` ('L', 'XL', 'XXL', '2B') with ``modeling`` 'ar' or 'mlm' and a token_each-code_dim
  vocabulary on the K = token_each * code_dim bit BAE of that release."""
  c = base('elm_' + modeling)
  n_layer, dim, n_head = GPT_PRESETS[f'GPT-{size}']
  c.model.update(n_layer=n_layer, dim=dim, n_head=n_head, token_each=token_each, code_dim=code_dim)
  k = token_each * code_dim
  c.bae.codebook_size = k
  c.bae_ckpt = f'ckpts/bae/bae_{k}/binaryae_ema.th'      # the released tokenizer's path in the reference scripts
  if size != 'L':
    c.mesh.update(data=1, fsdp=-1)       # >= 0.7B parameters: shard params and optimizer state over all devices
  return c


def bigr_recipe(preset: str, code_bits: int = 24) -> ml_collections.ConfigDict:
  """BiGR ``preset`` ('BiGR-L', 'BiGR-XL', 'BiGR-XXL') on the ``code_bits``-bit BAE (d24 by default)."""
  c = base('bigr')
  c.model.update(BIGR_PRESETS[preset])
  c.model.binary_size = code_bits
  c.bae.codebook_size = code_bits
  c.bae_ckpt = f'ckpts/bae/bae_d{code_bits}/binaryae_ema.th'
  if preset != 'BiGR-L':
    c.mesh.update(data=1, fsdp=-1)
  return c


def tiny_quickstart(task: str) -> ml_collections.ConfigDict:
  """A tiny model on scikit-learn's bundled digits (upsampled 8x8 -> 32x32) that trains on a 2-core CPU in a few
  minutes: the generator stage of ``configs/digits.py:elm`` / ``:bigr``, which trains its tokenizer
  (``configs/bae_quickstart.py``: K = 16 bits on a 4x4 grid) first. Alone, the BAE is randomly initialised unless
  ``bae_ckpt`` points at a trained one (``<workdir>/binaryae_ema.safetensors``). ELM uses 2 sub-tokens of 8 bits
  (V = 256).

  The recipe, chosen by the digits quality score (``var_jax.eval.digits``: class accuracy, Frechet distance over the
  real data's; 50 samples per class, on one trained BAE, the release sampling settings unless noted; README's quality
  table has the final numbers):
    ELM AR  the first quickstart (dim 64, 2 layers, dropouts 0.1, 300 steps)                  10.0%  3.33x
            dim 128, 4 layers, no dropout, 1000 steps, config.bae_bits='threshold'            89.8%  1.82x
            the same with the references' Bernoulli training bits (kept)                       99.2%  2.20x
    BiGR    the first quickstart (dim 64, 2 layers, 300 steps, transcoder 64 wide x 2)          10.6%  3.81x
            dim 128, 4 layers, no dropout, 1000 steps, 'threshold' bits                        65.6%  3.25x
            + transcoder 256 wide x 3 blocks, lr 2e-3                                          98.6%  3.20x
            the same with Bernoulli bits (kept)                                                97.2%  3.50x
            + sampling at cfg 1.5 (the release's 3.0 narrows the samples)                      99.2%  2.66x
            + 8 iterations of 8 diffusion steps (the release's 20 x 16 here: 4x slower)        99.6%  2.55x
  Too small a model, trained too briefly with the ImageNet recipe's dropouts, learnt no class; BiGR's per-token
  transcoder (it denoises the 16 bits of a token jointly) needed the width."""
  c = base(task)
  c.data.update(name='digits', image_size=32, num_workers=0, eval_split='val', hflip=False)
  c.bae.update(nf=32, ch_mult=(1, 1, 2, 2), res_blocks=1, attn_resolutions=(4,), resolution=32, codebook_size=16,
               emb_dim=32)
  c.bae_ckpt = ''
  c.model.update(dim=128, n_layer=4, n_head=4, multiple_of=32, num_classes=10, block_size=16, resid_dropout_p=0.0,
                 ffn_dropout_p=0.0, token_dropout_p=0.0)
  if task == 'bigr':
    c.model.update(seq_len=16, binary_size=16, denoise_hidden_dim=256, num_block_mlp=3, n_sample_steps=64,
                   infer_steps=16)
  else:
    c.model.update(token_each=2, code_dim=8)
  c.dtype = 'float32'
  c.global_batch_size = 64
  c.total_steps = 1000
  c.optim.update(lr=2e-3 if task == 'bigr' else 1e-3, warmup_steps=20)
  c.ema.decay = 0.99
  c.log_every = 50
  c.ckpt_every = 250
  c.eval_every = 250
  c.eval_batches = 4
  c.sample_every = 0                     # e.g. 500 for sample grids (configs/digits.py sets it, with the score)
  c.sample_classes = tuple(range(10))
  if task == 'bigr':
    c.sample.update(cfg=1.5, num_iter=8, infer_steps=8)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c
