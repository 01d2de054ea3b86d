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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench_common (when not run as a script)
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
  import jax.numpy as jnp
  dtype = jnp.bfloat16 if dtype_name == 'bfloat16' else jnp.float32
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
  return _stats(first, lats, FLAGS.batch_size)


def _cpu_name():
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _reference_dir(path):
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(os.path.join(path, 'models', 'var.py')) or not os.path.isfile(os.path.join(path, 'dist.py')):
    raise app.UsageError(f'--reference_path={path} does not look like a FoundationVision/VAR checkout '
                         f'(models/var.py and dist.py expected)')
  return path


def import_reference(path):
  """The reference ``VQVAE`` and ``VAR`` classes, imported from the user's checkout (never copied here)."""
  path = _reference_dir(path)
  loaded = sys.modules.get('models')
  if loaded is not None and not os.path.abspath(getattr(loaded, '__file__', '') or '').startswith(path):
    raise RuntimeError(f'a different top-level `models` package is already imported ({loaded!r})')
  try:
    import huggingface_hub  # noqa: F401
  except ImportError:   # only used by the reference's VARHF mixin
    stub = types.ModuleType('huggingface_hub')
    stub.PyTorchModelHubMixin = object
    sys.modules['huggingface_hub'] = stub
  sys.path.insert(0, path)
  from models.var import VAR as RefVAR        # noqa: E402  (imports the reference's dist.py: device fixed there)
  from models.vqvae import VQVAE as RefVQVAE  # noqa: E402
  return RefVQVAE, RefVAR


def time_reference(pipe, labels, dtype_name):
  import torch
  vae_cfg, var_cfg = pipe.vae_config, pipe.var_config
  RefVQVAE, RefVAR = import_reference(FLAGS.reference_path)
  dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  if dev.type == 'cuda':
    torch.backends.cudnn.allow_tf32 = FLAGS.tf32
    torch.backends.cuda.matmul.allow_tf32 = FLAGS.tf32
    torch.set_float32_matmul_precision('high' if FLAGS.tf32 else 'highest')
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix='var_jax_bench_') as tmp:
    vae_path, var_path = os.path.join(tmp, 'vae.pth'), os.path.join(tmp, 'var.pth')
    with warnings.catch_warnings():   # torch.from_numpy on read-only arrays: harmless here, the copy is saved
      warnings.filterwarnings('ignore', message='The given NumPy array is not writable')
      pipe.save_torch(vae_path, var_path)
    vae = RefVQVAE(vocab_size=vae_cfg.vocab_size, z_channels=vae_cfg.z_channels, ch=vae_cfg.ch, test_mode=True,
                   share_quant_resi=vae_cfg.share_quant_resi, v_patch_nums=vae_cfg.patch_nums)
    var = RefVAR(vae_local=vae, num_classes=var_cfg.num_classes, depth=var_cfg.depth, embed_dim=var_cfg.embed_dim,
                 num_heads=var_cfg.num_heads, mlp_ratio=var_cfg.mlp_ratio, norm_eps=var_cfg.norm_eps,
                 shared_aln=var_cfg.shared_aln, attn_l2_norm=True, patch_nums=var_cfg.patch_nums,
                 flash_if_available=True, fused_if_available=True)
    vae.load_state_dict(torch.load(vae_path, map_location='cpu', weights_only=True), strict=True)
    var.load_state_dict(torch.load(var_path, map_location='cpu', weights_only=True), strict=True)
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
  out = _stats(first, lats, FLAGS.batch_size)
  out.pop('compile_s_est')
  out.update(setup_s=setup_s, torch=torch.__version__, torch_device=str(dev),
             torch_device_name=torch.cuda.get_device_name(dev) if dev.type == 'cuda' else _cpu_name(),
             torch_threads=torch.get_num_threads(), autocast_bf16=use_amp,
             tf32=bool(FLAGS.tf32 and dev.type == 'cuda'))
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
  if FLAGS.reference_path:
    _reference_dir(FLAGS.reference_path)   # fail before the (long) JAX part
    # JAX would otherwise reserve 75% of the GPU memory at start-up and leave little to PyTorch.
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  import jax
  import var_jax
  from var_jax import VARPipeline

  vae_cfg, var_cfg = build_configs()
  devs = jax.devices()
  d0 = devs[0]
  kind = f'{d0.device_kind} ({_cpu_name()}, {os.cpu_count()} cores)' if d0.platform == 'cpu' else d0.device_kind
  print(f'device: {d0.platform} / {kind} x{len(devs)} (local {jax.local_device_count()}) | jax {jax.__version__} | '
        f'python {platform.python_version()} | var_jax from {os.path.dirname(var_jax.__file__)}')

  t0 = time.perf_counter()
  pipe = VARPipeline.init_random(vae_cfg, var_cfg, jax.random.key(FLAGS.seed))
  jax.block_until_ready((pipe.vae_variables, pipe.var_variables))
  init_s = time.perf_counter() - t0
  n_var = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(pipe.var_variables['params']))
  n_vae = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(pipe.vae_variables['params']))
  config = dict(depth=var_cfg.depth, embed_dim=var_cfg.embed_dim, num_heads=var_cfg.num_heads,
                shared_aln=var_cfg.shared_aln, patch_nums=list(var_cfg.patch_nums), seq_len=var_cfg.seq_len,
                vae_ch=vae_cfg.ch, vocab_size=vae_cfg.vocab_size, z_channels=vae_cfg.z_channels,
                num_classes=var_cfg.num_classes, image_size=vae_cfg.image_size, var_params=n_var, vae_params=n_vae,
                batch_size=FLAGS.batch_size, num_batches=FLAGS.num_batches, dtype=FLAGS.dtype, cfg=FLAGS.cfg,
                top_k=FLAGS.top_k, top_p=FLAGS.top_p, shard=FLAGS.shard, seed=FLAGS.seed)
  print(f'config: VAR-d{var_cfg.depth} (C={var_cfg.embed_dim}, heads={var_cfg.num_heads}, '
        f'{n_var / 1e6:.1f}M params{", shared AdaLN" if var_cfg.shared_aln else ""}), '
        f'patch_nums={var_cfg.patch_nums} (L={var_cfg.seq_len}) | VQVAE ch={vae_cfg.ch} V={vae_cfg.vocab_size} '
        f'Cvae={vae_cfg.z_channels} ({n_vae / 1e6:.1f}M params), {vae_cfg.image_size}px')
  print(f'sampling: batch {FLAGS.batch_size} x {FLAGS.num_batches} timed batches | {FLAGS.dtype} | cfg={FLAGS.cfg} '
        f'top_k={FLAGS.top_k} top_p={FLAGS.top_p} | random-weight init {init_s:.1f} s')

  rng = np.random.default_rng(FLAGS.seed)
  labels = rng.integers(0, var_cfg.num_classes, size=(FLAGS.num_batches + 1, FLAGS.batch_size)).astype(np.int32)

  results = dict(device=dict(platform=d0.platform, device_kind=d0.device_kind, count=len(devs), jax=jax.__version__),
                 config=config)
  results['ours'] = ours = time_ours(pipe, labels, FLAGS.dtype)
  print(_fmt_run('ours:', ours), flush=True)

  if FLAGS.reference_path:
    results['reference'] = refr = time_reference(pipe, labels, FLAGS.dtype)
    print(f'reference: torch {refr["torch"]} on {refr["torch_device"]} ({refr["torch_device_name"]}, '
          f'{refr["torch_threads"]} threads) | autocast bf16 {refr["autocast_bf16"]} | tf32 {refr["tf32"]} | '
          f'build + strict load {refr["setup_s"]:.1f} s')
    print(_fmt_run('reference:', refr))
    results['ratio_ours_over_reference'] = ratio = ours['images_per_s'] / refr['images_per_s']
    results['ratio_ours_over_reference_best'] = ours['images_per_s_best'] / refr['images_per_s_best']
    print(f'ratio ours/reference (images/s, mean latency): {ratio:.2f}x '
          f'(best-batch: {results["ratio_ours_over_reference_best"]:.2f}x)')

  if FLAGS.json_out:
    with open(FLAGS.json_out, 'w') as f:
      json.dump(results, f, indent=2)
    print(f'wrote {FLAGS.json_out}')


if __name__ == '__main__':
  app.run(main)
