"""Sampling speed of var_jax (class-conditional, CFG, top-k/top-p), optionally beside the reference PyTorch VAR.

Builds random-weight models at a released size (default: VAR-d16 + the vae_ch160v4096z32 tokenizer, 256px; the
weights do not change the amount of work), then times ``VARPipeline.sample``: the first call (compilation + one
run) separately, then ``--num_batches`` steady-state batches (latency mean/min and images/s; ``sample`` returns
host arrays, so every timed call has finished on the device).

With ``--reference_path`` (a checkout of FoundationVision/VAR) the same random weights are exported with
``pipe.save_torch``, loaded ``strict=True`` into the reference ``VQVAE``/``VAR`` classes imported from that path at run
time, and ``VAR.autoregressive_infer_cfg`` is timed the same way (one warm-up call, then ``--num_batches`` batches,
CUDA when available); the ratio ours/reference of images/s is printed. On the reference side ``--dtype bfloat16``
means ``torch.autocast(dtype=torch.bfloat16)``, and float32 matmuls use TF32 on GPU as in the reference demo
(``--notf32`` for full float32; JAX's default GPU matmul precision is TF32-like as well).

Usage:
  python benchmarks/sample_speed.py                                          # d16, 5 batches of 16, float32
  python benchmarks/sample_speed.py --depth 30 --dtype bfloat16 --batch_size 32 --json_out /tmp/d30.json
  python benchmarks/sample_speed.py --small --num_batches 2 --batch_size 4   # tiny 64px model: CPU smoke run
  python benchmarks/sample_speed.py --reference_path ~/src/VAR --dtype bfloat16   # side by side with PyTorch
  python benchmarks/sample_speed.py --depth 12 --patch_nums 1,2,3,4,6,8 --vae_ch 64   # custom smaller model
"""
from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:   # bench_common sits beside this file (sys.path[0] when run as a script)
  sys.path.insert(0, _HERE)
import bench_common as bc  # noqa: E402  (also puts the checkout first on sys.path and defines the shared flags)

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch_size', 16, 'Images per sampling call.')
flags.DEFINE_integer('num_batches', 5, 'Timed batches after the first (compiling / warm-up) call.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype (reference: autocast when bfloat16).')
flags.DEFINE_float('cfg', 1.5, 'Classifier-free guidance ratio.')
flags.DEFINE_integer('top_k', 900, 'top-k filtering (0: off).')
flags.DEFINE_float('top_p', 0.95, 'top-p filtering (0: off).')
flags.DEFINE_bool('shard', True, 'Shard each batch over all local devices (pipe.sample(shard=...)).')


def time_ours(pipe, labels, dtype_name):
  from var_jax.dtypes import parse_dtype
  dtype = parse_dtype(dtype_name, '--dtype')
  kw = dict(cfg=FLAGS.cfg, top_k=FLAGS.top_k, top_p=FLAGS.top_p, batch_size=FLAGS.batch_size, dtype=dtype,
            shard=FLAGS.shard)
  t0 = time.perf_counter()
  images, tokens = pipe.sample(labels[0], FLAGS.seed, **kw)      # compiles, then runs once
  first = time.perf_counter() - t0
  s = pipe.vae_config.image_size
  if images.shape != (FLAGS.batch_size, s, s, 3) or not np.isfinite(images).all():
    raise RuntimeError(f'unexpected sample output: shape {images.shape}, finite {np.isfinite(images).all()}')
  lats = []
  for i in range(1, len(labels)):
    t0 = time.perf_counter()
    images, tokens = pipe.sample(labels[i], FLAGS.seed + i, **kw)   # host numpy: synchronous
    lats.append(time.perf_counter() - t0)
  return bc.timing_stats(first, lats, FLAGS.batch_size)


def time_reference(pipe, labels, dtype_name):
  import torch
  vae_cfg, var_cfg = pipe.vae_config, pipe.var_config
  bc.import_reference(FLAGS.reference_path)
  dev = bc.torch_device()
  t0 = time.perf_counter()
  vae, var = bc.load_reference_models(pipe, FLAGS.reference_path)
  vae, var = vae.to(dev).eval(), var.to(dev).eval()
  setup_s = time.perf_counter() - t0

  sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
  use_amp = dtype_name == 'bfloat16'
  top_k = min(FLAGS.top_k, var_cfg.vocab_size)   # torch.topk rejects k > V; ours clips the same way

  def run(i):
    lab = torch.as_tensor(labels[i], dtype=torch.long, device=dev)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
      img = var.autoregressive_infer_cfg(B=lab.shape[0], label_B=lab, cfg=FLAGS.cfg, top_k=top_k, top_p=FLAGS.top_p,
                                         g_seed=FLAGS.seed + i)
    sync()
    return img

  t0 = time.perf_counter()
  img = run(0)                                    # warm-up (cuDNN autotuning, allocator, lazy init)
  first = time.perf_counter() - t0
  if tuple(img.shape) != (FLAGS.batch_size, 3, vae_cfg.image_size, vae_cfg.image_size):
    raise RuntimeError(f'unexpected reference output shape {tuple(img.shape)}')
  lats = []
  for i in range(1, len(labels)):
    t0 = time.perf_counter()
    run(i)
    lats.append(time.perf_counter() - t0)
  out = bc.timing_stats(first, lats, FLAGS.batch_size)
  out.pop('compile_s_est')
  out.update(setup_s=setup_s, **bc.torch_info(dev), autocast_bf16=use_amp, tf32=bool(FLAGS.tf32 and dev.type == 'cuda'))
  return out


def _fmt_run(name, r):
  first = f'first call {r["first_call_s"]:.2f} s'
  if 'compile_s_est' in r:
    first += f' (compile ~{r["compile_s_est"]:.2f} s)'
  return (f'{name:<10} {first} | latency/batch mean {r["latency_mean_s"] * 1e3:.1f} ms, '
          f'min {r["latency_min_s"] * 1e3:.1f} ms | {r["images_per_s"]:.2f} images/s '
          f'(best {r["images_per_s_best"]:.2f})')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.batch_size < 1 or FLAGS.num_batches < 1:
    raise app.UsageError('--batch_size and --num_batches must be >= 1')
  bc.prepare_reference()
  import jax
  from var_jax import VARPipeline

  vae_cfg, var_cfg = bc.build_configs()
  device_line, device = bc.describe_jax_devices()
  print(device_line)

  t0 = time.perf_counter()
  pipe = VARPipeline.init_random(vae_cfg, var_cfg, jax.random.key(FLAGS.seed))
  jax.block_until_ready((pipe.vae_variables, pipe.var_variables))
  init_s = time.perf_counter() - t0
  n_var = bc.num_params(pipe.var_variables['params'])
  n_vae = bc.num_params(pipe.vae_variables['params'])
  config = dict(depth=var_cfg.depth, embed_dim=var_cfg.embed_dim, num_heads=var_cfg.num_heads,
                shared_aln=var_cfg.shared_aln, patch_nums=list(var_cfg.patch_nums), seq_len=var_cfg.seq_len,
                vae_ch=vae_cfg.ch, vocab_size=vae_cfg.vocab_size, z_channels=vae_cfg.z_channels,
                num_classes=var_cfg.num_classes, image_size=vae_cfg.image_size, var_params=n_var, vae_params=n_vae,
                batch_size=FLAGS.batch_size, num_batches=FLAGS.num_batches, dtype=FLAGS.dtype, cfg=FLAGS.cfg,
                top_k=FLAGS.top_k, top_p=FLAGS.top_p, shard=FLAGS.shard, seed=FLAGS.seed)
  print(f'config: {bc.model_summary(vae_cfg, var_cfg, n_var, n_vae)}')
  print(f'sampling: batch {FLAGS.batch_size} x {FLAGS.num_batches} timed batches | {FLAGS.dtype} | cfg={FLAGS.cfg} '
        f'top_k={FLAGS.top_k} top_p={FLAGS.top_p} | random-weight init {init_s:.1f} s')

  rng = np.random.default_rng(FLAGS.seed)
  labels = rng.integers(0, var_cfg.num_classes, size=(FLAGS.num_batches + 1, FLAGS.batch_size)).astype(np.int32)

  results = dict(device=device, config=config)
  results['ours'] = ours = time_ours(pipe, labels, FLAGS.dtype)
  ours['peak_memory_gib'] = bc.jax_peak_memory_gib()
  print(_fmt_run('ours:', ours), flush=True)

  if FLAGS.reference_path:
    results['reference'] = refr = time_reference(pipe, labels, FLAGS.dtype)
    refr['peak_memory_gib'] = bc.torch_peak_memory_gib()
    print(bc.reference_line(refr))
    print(_fmt_run('reference:', refr))
    results['ratio_ours_over_reference'] = ratio = ours['images_per_s'] / refr['images_per_s']
    results['ratio_ours_over_reference_best'] = ours['images_per_s_best'] / refr['images_per_s_best']
    print(f'ratio ours/reference (images/s, mean latency): {ratio:.2f}x '
          f'(best-batch: {results["ratio_ours_over_reference_best"]:.2f}x)')

  bc.write_json(results, FLAGS.json_out)


if __name__ == '__main__':
  app.run(main)
