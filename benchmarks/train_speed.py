"""Training speed of var_jax (step time, images/s, tokens/s, MFU) on random data, optionally beside the reference.

Builds the training config the way the trainer does (``configs/common.py``'s ``var_recipe(depth)`` for the released
depths 16/20/24/30/36 and other depths with d16's recipe; with ``--small``, ``configs/quickstart.py``), with the
model and tokenizer shapes from the same model flags as ``sample_speed.py`` (``--depth --small --patch_nums --vae_ch
--vocab_size --z_channels --num_classes``; the tokenizer is always the reference's encoder/decoder layout so the
reference can load it) and a random tokenizer (``config.vae_ckpt=''``), then overrides the global batch
(``--batch_size``), ``--dtype``, ``--grad_accum``, the mesh (``--mesh_data/--mesh_fsdp/--mesh_tensor``) and
``--remat``. Ours is the real trainer: the VAR task (``var_jax.train.tasks.build``: the sharded train state, the
tokenizer, the optimizer) and its train step jitted with the task's shardings (and, as in its loop, the state
donated; ``--nodonate`` to keep it), run under ``mesh_context`` on global batches from ``host_local_to_global``
(random images in [-1, 1] and labels, put on the devices before timing: the host->device copy is not timed). The
first step (compilation + one run) is timed separately, then ``--num_steps`` steps, each waited for with
``jax.block_until_ready`` on its loss: step time mean/min, images/s, tokens/s (images/s x seq_len) and the model
FLOPs utilisation, ``var_train_flops_per_image(model) x images/s / (peak x devices)`` with the device's dense bf16
peak (``var_jax.train.metrics``; 'n/a' where unknown, e.g. on CPU, and measured against the bf16 peak even with
``--dtype float32``). The step includes the tokenizer's encoding of the images (as in training), which the model
FLOPs do not count. ``--token_cache`` then times the same step on the batches a ``config.data.token_cache`` run
reads (the token ids of the same images, encoded once beforehand): the transformer and the teacher-forcing input
only, continuing from the state the first run left.

With ``--reference_path`` (a checkout of FoundationVision/VAR) our initial random weights (the train state's params
and the tokenizer) are exported with ``VARPipeline.save_torch``, loaded ``strict=True`` into the reference
``VQVAE``/``VAR`` classes imported from that path at run time (VAR in train mode: drop path and class-condition
dropout as configured), and the reference trainer's step is timed on the same batches, before ours (on a GPU PyTorch
hands its memory back when done, while JAX's allocator keeps what it has grown to): ``vae.img_to_idxBl`` ->
``quantize.idxBl_to_var_input`` -> ``var(label, x)`` -> ``CrossEntropyLoss(label_smoothing, reduction='none')``
weighted 1/L, summed over tokens, averaged -> backward (per micro-batch with ``--grad_accum``) ->
``clip_grad_norm_`` -> ``torch.optim.AdamW`` (betas 0.9/0.95, one parameter group; fused on CUDA as the reference's
default) -> ``zero_grad``. One warm-up step, then ``--ref_num_steps`` (default ``--num_steps``) timed steps,
synchronising CUDA after each; on one device (with several JAX devices the ratio compares all of ours with one of
the reference's) and in a single process. ``--dtype bfloat16`` means ``torch.autocast(bfloat16)`` around the forward
and the loss (the reference's ``--fp16 2``; on the CPU too); float32 matmuls use TF32 on GPU unless ``--notf32``
(the reference's default).

Usage:
  python benchmarks/train_speed.py                                   # VAR-d16, batch 32, bfloat16, 10 steps
  python benchmarks/train_speed.py --depth 30 --batch_size 64 --remat --json_out /tmp/train_d30.json
  python benchmarks/train_speed.py --depth 16 --batch_size 256 --grad_accum 4 --mesh_fsdp 8   # 8 devices, FSDP
  python benchmarks/train_speed.py --small --batch_size 8 --num_steps 3 --reference_path ~/src/VAR   # CPU smoke
  python benchmarks/train_speed.py --reference_path ~/src/VAR --dtype bfloat16       # side by side with PyTorch
  python benchmarks/train_speed.py --reference_path ~/src/VAR --token_cache   # + ours on cached tokens (ratios)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging as std_logging
import os
import sys
import time
import warnings

from absl import app
from absl import flags
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:   # bench_common sits beside this file (sys.path[0] when run as a script)
  sys.path.insert(0, _HERE)
import bench_common as bc  # noqa: E402  (also puts the checkout first on sys.path and defines the shared flags)

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch_size', 32, 'Global batch size (images per optimizer step, over all devices).')
flags.DEFINE_integer('num_steps', 10, 'Timed steps after the first (compiling / warm-up) step.')
flags.DEFINE_integer('ref_num_steps', -1, 'Timed reference steps after its warm-up step (-1: --num_steps).')
flags.DEFINE_enum('dtype', 'bfloat16', ['float32', 'bfloat16'],
                  'Transformer compute dtype, config.dtype (reference: autocast when bfloat16).')
flags.DEFINE_integer('grad_accum', 1, 'Micro-batches per optimizer step (config.grad_accum).')
flags.DEFINE_integer('mesh_data', -1, 'Mesh axis "data" size (-1: the devices left over).')
flags.DEFINE_integer('mesh_fsdp', 1, 'Mesh axis "fsdp" size (-1: the devices left over).')
flags.DEFINE_integer('mesh_tensor', 1, 'Mesh axis "tensor" size (-1: the devices left over).')
flags.DEFINE_bool('remat', False, 'Rematerialise each transformer block in the backward pass (config.model.remat).')
flags.DEFINE_bool('donate', True, 'Donate the train state to the step, as the trainer\'s loop does.')
flags.DEFINE_bool('token_cache', False, 'Also time our step on cached tokens (config.data.token_cache: the batches '
                  'carry the VQVAE\'s token ids of the same images, the step skips the encoder) and print the ratios '
                  'cached / tokenized in the step (/ the reference).')

RECIPE_DEPTHS = (16, 20, 24, 30, 36)
# VARConfig fields that set the architecture / the training-time regularisation (taken from the model flags)
ARCH_FIELDS = ('vocab_size', 'z_channels', 'num_classes', 'depth', 'embed_dim', 'num_heads', 'mlp_ratio',
               'drop_rate', 'drop_path_rate', 'norm_eps', 'shared_aln', 'cond_drop_rate', 'attn_l2_norm',
               'patch_nums')
NUM_TRAIN_EXAMPLES = 1_281_167   # ImageNet-1k train: only sets the (untimed) lr schedule's length


def _load_config_module(name):
  spec = importlib.util.spec_from_file_location(f'var_jax_configs_{name}',
                                                os.path.join(bc.REPO_ROOT, 'configs', f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)   # configs are loaded by path, as the trainer's --config and the tests do
  return mod


def _recipe_depth(depth):
  return depth if depth in RECIPE_DEPTHS else 16


def _recipe_name(depth):
  return 'configs/quickstart.py' if FLAGS.small else f'var_recipe({_recipe_depth(depth)})'


def build_train_config():
  """The trainer's ml_collections config for the flags (see the module docstring)."""
  vae_cfg, var_cfg = bc.build_configs()
  if FLAGS.small:
    c = _load_config_module('quickstart').get_config()
  else:
    c = _load_config_module('common').var_recipe(_recipe_depth(var_cfg.depth))
  c.model.update({k: getattr(var_cfg, k) for k in ARCH_FIELDS})
  c.model.remat = FLAGS.remat
  c.vae.update(dataclasses.asdict(vae_cfg))
  c.data.image_size = vae_cfg.image_size
  c.vae_ckpt = ''                # random tokenizer
  c.init_from = ''
  c.seed = FLAGS.seed
  c.global_batch_size = FLAGS.batch_size
  c.dtype = FLAGS.dtype
  c.grad_accum = FLAGS.grad_accum
  c.mesh.update(data=FLAGS.mesh_data, fsdp=FLAGS.mesh_fsdp, tensor=FLAGS.mesh_tensor)
  return c


def _host_batches(config, var_cfg, n, per_process):
  rng = np.random.default_rng(FLAGS.seed)
  s = config.data.image_size
  return [{'image': rng.uniform(-1, 1, (per_process, s, s, 3)).astype(np.float32),
           'label': rng.integers(0, var_cfg.num_classes, (per_process,)).astype(np.int32)} for _ in range(n)]


def setup_ours(config):
  """The trainer's pieces: the VAR task (mesh, models, optimizer, shardings), its sharded state, the tokenizer
  and its jitted step."""
  import jax
  from var_jax import sharding as shd
  from var_jax.train import tasks

  mesh = shd.make_mesh(config.mesh.to_dict())
  shd.global_batch_size_ok(config.global_batch_size, mesh)
  task = tasks.build(config, mesh, NUM_TRAIN_EXAMPLES)
  t0 = time.perf_counter()
  state = task.init_state()
  log = std_logging.getLogger('var_jax.train')
  level = log.level
  log.setLevel(std_logging.ERROR)   # the 'vae_ckpt is empty: random tokenizer' warning: intended here
  try:
    vae_vars = task.frozen
  finally:
    log.setLevel(level)
  jax.block_until_ready((state, vae_vars))
  init_s = time.perf_counter() - t0
  step = task.jit_step(-1) if FLAGS.donate else jax.jit(
      task.train_step(-1), in_shardings=(task.shardings, shd.batch_sharding(mesh), shd.replicated(mesh), None),
      out_shardings=(task.shardings, shd.replicated(mesh)))
  return dict(state=state, vae_vars=vae_vars, step=step, mesh=mesh, rules=task.rules, init_s=init_s)


def time_ours(ours, config, host_batches):
  import jax
  import jax.numpy as jnp
  from var_jax import sharding as shd
  mesh, step, vae_vars = ours['mesh'], ours['step'], ours['vae_vars']
  state = ours.pop('state')   # donated to the step: no other reference may keep it alive
  batches = [shd.host_local_to_global(b, mesh) for b in host_batches]
  jax.block_until_ready(batches)
  prog_wp = jnp.float32(1.0)
  losses, times = [], []
  with shd.mesh_context(mesh, ours['rules']):
    t0 = time.perf_counter()
    state, m = step(state, batches[0], vae_vars, prog_wp)   # compiles, then runs once
    losses.append(float(jax.block_until_ready(m['train_loss'])))
    first = time.perf_counter() - t0
    for i in range(FLAGS.num_steps):
      t0 = time.perf_counter()
      state, m = step(state, batches[(i + 1) % len(batches)], vae_vars, prog_wp)
      jax.block_until_ready(m['train_loss'])
      times.append(time.perf_counter() - t0)
      losses.append(float(m['train_loss']))
  ours['state'] = state   # --token_cache: the cached-token steps continue from it
  if not np.isfinite(losses).all():
    raise RuntimeError(f'non-finite training loss: {losses}')
  out = bc.timing_stats(first, times, config.global_batch_size, name='step_time', plural='step_times')
  out.update(init_s=ours['init_s'], losses=losses, mesh=dict(mesh.shape), donate=FLAGS.donate)
  return out


def cached_token_batches(config, ours, host_batches):
  """The batches the trainer reads with ``config.data.token_cache``: the frozen VQVAE's token ids of the same images
  (``var_jax.data.token_cache`` stores them per image and flip; encoded here once, untimed) and the labels."""
  import jax
  from var_jax.models.vqvae import VQVAE
  from var_jax.models.var_config import VQVAEConfig
  from var_jax.train.tasks import var as var_task
  vae = VQVAE(VQVAEConfig(**config.vae.to_dict()))
  enc = jax.jit(lambda v, x: var_task.tokens(vae, v, x)[0])
  return [{'tokens': np.asarray(enc(ours['vae_vars'], b['image'])), 'label': b['label']} for b in host_batches]


def time_reference(config, vae_cfg, var_cfg, params, vae_vars, host_batches):
  import torch
  from var_jax import VARPipeline
  bc.import_reference(FLAGS.reference_path)
  dev = bc.torch_device()
  t0 = time.perf_counter()
  pipe = VARPipeline(vae_cfg, var_cfg, vae_vars, {'params': params})
  vae, var = bc.load_reference_models(pipe, FLAGS.reference_path, drop_rate=var_cfg.drop_rate,
                                      drop_path_rate=var_cfg.drop_path_rate, cond_drop_rate=var_cfg.cond_drop_rate)
  del pipe
  vae, var = vae.to(dev), var.to(dev).train()   # the VQVAE stays frozen in eval mode (test_mode=True)
  setup_s = time.perf_counter() - t0

  use_amp = config.dtype == 'bfloat16'
  sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
  B, V, L = config.global_batch_size, var_cfg.vocab_size, var_cfg.seq_len
  accum = int(config.grad_accum)
  mb = B // accum
  train_loss = torch.nn.CrossEntropyLoss(label_smoothing=float(config.label_smoothing), reduction='none')
  loss_weight = torch.ones(1, L, device=dev) / L
  paras = [p for p in var.parameters() if p.requires_grad]
  lr = config.optim.base_lr * B / config.optim.lr_batch_ref
  opt = torch.optim.AdamW(paras, lr=lr, betas=(config.optim.b1, config.optim.b2), eps=config.optim.eps,
                          weight_decay=config.optim.weight_decay, fused=True if dev.type == 'cuda' else None)
  data = [(torch.from_numpy(b['image'].transpose(0, 3, 1, 2).copy()).to(dev),
           torch.from_numpy(b['label'].astype(np.int64)).to(dev)) for b in host_batches]

  def run(i):
    inp_B3HW, label_B = data[i % len(data)]
    for j in range(accum):   # the reference's AmpOptimizer: loss / ac per micro-batch, step on the last
      x, lab = inp_B3HW[j * mb:(j + 1) * mb], label_B[j * mb:(j + 1) * mb]
      gt_idx_Bl = vae.img_to_idxBl(x)
      gt_BL = torch.cat(gt_idx_Bl, dim=1)
      x_BLCv_wo_first_l = vae.quantize.idxBl_to_var_input(gt_idx_Bl)
      with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp, cache_enabled=True):
        logits_BLV = var(lab, x_BLCv_wo_first_l)
        loss = train_loss(logits_BLV.view(-1, V), gt_BL.view(-1)).view(mb, -1)
        loss = loss.mul(loss_weight).sum(dim=-1).mean()
      loss.mul(1.0 / accum).backward(retain_graph=False, create_graph=False)
      logits_BLV.data.argmax(dim=-1)   # pred_BL: computed on every step by the reference trainer
    torch.nn.utils.clip_grad_norm_(paras, config.optim.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return loss.item()

  n = FLAGS.num_steps if FLAGS.ref_num_steps < 0 else FLAGS.ref_num_steps
  losses, times = [], []
  with warnings.catch_warnings():   # the reference's own torch.cuda.amp.autocast(enabled=False) deprecation
    warnings.filterwarnings('ignore', message=r'.*torch\.cuda\.amp\.autocast', category=FutureWarning)
    t0 = time.perf_counter()
    losses.append(run(0))                            # warm-up (cuDNN autotuning, allocator, lazy init)
    first = time.perf_counter() - t0
    for i in range(n):
      t0 = time.perf_counter()
      losses.append(run(i + 1))
      times.append(time.perf_counter() - t0)
  if not np.isfinite(losses).all():
    raise RuntimeError(f'non-finite reference training loss: {losses}')
  out = bc.timing_stats(first, times, B, name='step_time', plural='step_times')
  out.pop('compile_s_est')
  out.update(setup_s=setup_s, losses=losses, **bc.torch_info(dev), autocast_bf16=use_amp,
             tf32=bool(FLAGS.tf32 and dev.type == 'cuda'), fused_adamw=dev.type == 'cuda')
  if dev.type == 'cuda':
    out['peak_memory_gib'] = torch.cuda.max_memory_allocated(dev) / 2**30
  del vae, var, opt, paras, data
  if dev.type == 'cuda':
    torch.cuda.empty_cache()   # give the memory back before our steps run (JAX's allocator keeps what it grows to)
  return out


def _fmt_run(name, r, seq_len, flops_img=None, peak=None):
  first = f'first step {r["first_call_s"]:.2f} s'
  if 'compile_s_est' in r:
    first += f' (compile ~{r["compile_s_est"]:.2f} s)'
  s = (f'{name:<10} {first} | step mean {r["step_time_mean_s"] * 1e3:.1f} ms, min {r["step_time_min_s"] * 1e3:.1f} ms'
       f' | {r["images_per_s"]:.2f} images/s (best {r["images_per_s_best"]:.2f}) | '
       f'{r["images_per_s"] * seq_len:,.0f} tokens/s')
  if flops_img is not None:
    s += f' | model {flops_img * r["images_per_s"] / 1e12:.3f} TFLOP/s, MFU '
    s += f'{100 * r["mfu"]:.1f}%' if r.get('mfu') is not None else 'n/a'
    s += '' if peak else ' (peak FLOP/s of this device unknown)'
  return s


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.batch_size < 1 or FLAGS.num_steps < 1 or FLAGS.grad_accum < 1:
    raise app.UsageError('--batch_size, --num_steps and --grad_accum must be >= 1')
  if FLAGS.batch_size % FLAGS.grad_accum:
    raise app.UsageError(f'--batch_size={FLAGS.batch_size} must be divisible by --grad_accum={FLAGS.grad_accum}')
  bc.prepare_reference()
  import jax
  from var_jax.train import metrics as metrics_lib
  from var_jax.train.tasks import var as var_task

  config = build_train_config()
  vae_cfg, var_cfg = var_task.model_configs(config)
  if FLAGS.reference_path and bc.reference_compatible(vae_cfg):
    raise app.UsageError(f'the reference VQVAE cannot hold this tokenizer: {bc.reference_compatible(vae_cfg)}')
  if FLAGS.reference_path and jax.process_count() > 1:
    raise app.UsageError('--reference_path: run the side-by-side comparison in a single process')
  if config.global_batch_size % (jax.process_count() * config.grad_accum):
    raise app.UsageError(f'--batch_size={config.global_batch_size} must divide into {jax.process_count()} '
                         f'processes x {config.grad_accum} micro-batches')
  device_line, device = bc.describe_jax_devices()
  print(device_line)
  n_var, n_vae = _param_counts(vae_cfg, var_cfg)
  mesh_flags = dict(data=FLAGS.mesh_data, fsdp=FLAGS.mesh_fsdp, tensor=FLAGS.mesh_tensor)
  flops_img = metrics_lib.var_train_flops_per_image(var_cfg)
  peak = metrics_lib.peak_flops_per_device()
  n_dev = jax.device_count()
  summary = dict(depth=var_cfg.depth, embed_dim=var_cfg.embed_dim, num_heads=var_cfg.num_heads,
                 shared_aln=var_cfg.shared_aln, patch_nums=list(var_cfg.patch_nums), seq_len=var_cfg.seq_len,
                 vae_ch=vae_cfg.ch, vocab_size=vae_cfg.vocab_size, z_channels=vae_cfg.z_channels,
                 num_classes=var_cfg.num_classes, image_size=vae_cfg.image_size, var_params=n_var, vae_params=n_vae,
                 recipe=_recipe_name(var_cfg.depth),
                 batch_size=config.global_batch_size, num_steps=FLAGS.num_steps, dtype=config.dtype,
                 vae_dtype=config.vae_dtype, grad_accum=config.grad_accum, mesh=mesh_flags, remat=var_cfg.remat,
                 drop_path_rate=var_cfg.drop_path_rate, cond_drop_rate=var_cfg.cond_drop_rate,
                 label_smoothing=config.label_smoothing, grad_clip=config.optim.grad_clip, seed=config.seed,
                 train_flops_per_image=flops_img, peak_flops_per_device=peak)
  print(f'config: {bc.model_summary(vae_cfg, var_cfg, n_var, n_vae)}')
  print(f'training: {summary["recipe"]}, global batch {config.global_batch_size} (grad_accum {config.grad_accum}) x '
        f'{FLAGS.num_steps} timed steps | {config.dtype} (tokenizer {config.vae_dtype}) | remat {var_cfg.remat} | '
        f'drop_path {var_cfg.drop_path_rate:.3g} | model {flops_img / 1e9:.1f} GFLOP/image (fwd+bwd, no tokenizer) | '
        f'peak {"n/a" if peak is None else f"{peak / 1e12:.0f} TFLOP/s"} per device')

  per_process = config.global_batch_size // jax.process_count()
  host_batches = _host_batches(config, var_cfg, 2, per_process)
  results = dict(device=device, config=summary)
  ours_setup = setup_ours(config)
  print(f'mesh {dict(ours_setup["mesh"].shape)} on {n_dev} device(s) | state + tokenizer init '
        f'{ours_setup["init_s"]:.1f} s', flush=True)

  if FLAGS.reference_path:   # first: PyTorch gives its GPU memory back afterwards, JAX's allocator would not
    params, vae_vars = jax.device_get((ours_setup['state'].params, ours_setup['vae_vars']))
    results['reference'] = refr = time_reference(config, vae_cfg, var_cfg, params, vae_vars, host_batches)
    del params, vae_vars
    refr['tokens_per_s'] = refr['images_per_s'] * var_cfg.seq_len
    refr['model_tflops_per_s'] = flops_img * refr['images_per_s'] / 1e12
    print(bc.reference_line(refr) + f' | fused AdamW {refr["fused_adamw"]} | '
          f'loss {refr["losses"][0]:.4f} -> {refr["losses"][-1]:.4f}')
    print(_fmt_run('reference:', refr, var_cfg.seq_len), flush=True)

  results['ours'] = ours = time_ours(ours_setup, config, host_batches)
  ours['tokens_per_s'] = ours['images_per_s'] * var_cfg.seq_len
  ours['model_tflops_per_s'] = flops_img * ours['images_per_s'] / 1e12
  ours['mfu'] = flops_img * ours['images_per_s'] / (peak * n_dev) if peak else None
  print(f'ours: train_loss {ours["losses"][0]:.4f} -> {ours["losses"][-1]:.4f}')
  print(_fmt_run('ours:', ours, var_cfg.seq_len, flops_img, peak), flush=True)
  if FLAGS.token_cache:
    results['ours_token_cache'] = cached = time_ours(ours_setup, config,
                                                     cached_token_batches(config, ours_setup, host_batches))
    cached['tokens_per_s'] = cached['images_per_s'] * var_cfg.seq_len
    cached['mfu'] = flops_img * cached['images_per_s'] / (peak * n_dev) if peak else None
    print(f'ours, cached tokens: train_loss {cached["losses"][0]:.4f} -> {cached["losses"][-1]:.4f}')
    print(_fmt_run('cached:', cached, var_cfg.seq_len, flops_img, peak), flush=True)
    results['ratio_cached_over_ours'] = r = cached['images_per_s'] / ours['images_per_s']
    line = (f'ratio cached tokens / tokenized in the step (ours, images/s): {r:.2f}x '
            f'(best step: {cached["images_per_s_best"] / ours["images_per_s_best"]:.2f}x)')
    if FLAGS.reference_path:
      results['ratio_cached_over_reference'] = rr = cached['images_per_s'] / refr['images_per_s']
      line += f' | cached tokens / reference: {rr:.2f}x'
    print(line)

  if FLAGS.reference_path:
    results['ratio_ours_over_reference'] = ratio = ours['images_per_s'] / refr['images_per_s']
    results['ratio_ours_over_reference_best'] = ours['images_per_s_best'] / refr['images_per_s_best']
    print(f'ratio ours/reference (images/s, mean step time): {ratio:.2f}x '
          f'(best step: {results["ratio_ours_over_reference_best"]:.2f}x)')

  bc.write_json(results, FLAGS.json_out)


def _param_counts(vae_cfg, var_cfg):
  """Parameter counts of the transformer and the tokenizer from abstract inits (nothing allocated)."""
  import functools
  import jax
  import jax.numpy as jnp
  from var_jax.models.var import VAR
  from var_jax.models.vqvae import VQVAE
  from flax.core import meta
  s = vae_cfg.image_size
  var_shapes = jax.eval_shape(VAR(var_cfg).init, jax.random.key(0), jnp.zeros((1,), jnp.int32),
                              jnp.zeros((1, var_cfg.seq_len - var_cfg.first_l, var_cfg.z_channels)))
  vae_shapes = jax.eval_shape(functools.partial(VQVAE(vae_cfg).init, method=VQVAE.init_all), jax.random.key(0),
                              jnp.zeros((1, s, s, vae_cfg.in_channels)))
  return bc.num_params(meta.unbox(var_shapes)['params']), bc.num_params(meta.unbox(vae_shapes)['params'])


if __name__ == '__main__':
  app.run(main)
