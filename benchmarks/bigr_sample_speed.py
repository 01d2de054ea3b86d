"""BiGR sampling speed of var_jax, optionally beside the reference PyTorch code (haoosz/BiGR) on the same machine.

Builds random-weight models at a released size (default BiGR-L with the d24 tokenizer, 256px; the weights do not
change the amount of work: every iteration runs the backbone once and the transcoder ``infer_steps`` times), then
times ``BiGRPipeline.sample`` (the release settings: CFG 3.0, 20 iterations, Gumbel 0.01, 100 of 256 diffusion
steps, temperature 1; BAE decode included): the first call (compilation + one run) separately, then
``--num_batches`` steady-state batches. ``sample`` returns host arrays, so every timed call has finished.

With ``--reference_path`` (a checkout of github:haoosz/BiGR) the same weights are exported with
``pipe.save_torch`` and loaded ``strict=True`` into the reference ``BinaryAutoEncoder`` and ``Transformer``,
imported from that checkout at run time (never copied here), and ``generate_with_cfg`` + ``bae.decode`` (sample.py's
recipe) is timed the same way (one warm-up call, then ``--num_batches`` batches; CUDA when available). The ratio
ours / reference of images/s is printed. On the reference side ``--dtype bfloat16`` means ``torch.autocast``.

Usage:
  python benchmarks/bigr_sample_speed.py --reference_path ~/src/BiGR                  # BiGR-L d24, batch 16
  python benchmarks/bigr_sample_speed.py --size XXL --code_dim 32 --dtype bfloat16
  python benchmarks/bigr_sample_speed.py --size tiny --batch_size 4 --num_batches 2 --reference_path ~/src/BiGR
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import types
import warnings

from absl import app
from absl import flags
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:   # bench_common sits beside this file (sys.path[0] when run as a script)
  sys.path.insert(0, _HERE)
# bench_common puts the checkout first on sys.path and defines the shared flags used here (--seed, --reference_path,
# --tf32, --json_out); its VAR model-shape flags (--depth, --small, --patch_nums, ...) are ignored by this script.
import bench_common as bc  # noqa: E402

FLAGS = flags.FLAGS
SIZES = ('L', 'XL', 'XXL', 'L-512', 'tiny')
flags.DEFINE_enum('size', 'L', SIZES, 'BiGR size (released presets; tiny: dim 64, 2 layers, 32px, for a CPU run).')
flags.DEFINE_integer('code_dim', None, 'Bits per token K of the BAE (released: 24 or 32 at 256px, 32 at 512px; '
                     'default 24, tiny 16).')
flags.DEFINE_integer('batch_size', 16, 'Images per sampling call.')
flags.DEFINE_integer('num_batches', 3, 'Timed batches after the first (compiling / warm-up) call.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype (reference: autocast when bfloat16).')
flags.DEFINE_float('cfg', 3.0, 'CFG scale (the reference needs > 1).')
flags.DEFINE_integer('num_iter', 20, 'Unmasking iterations.')
flags.DEFINE_integer('infer_steps', 100, 'Diffusion steps per iteration (of n_sample_steps 256).')
flags.DEFINE_float('gumbel_temp', 0.01, 'Gumbel noise on the confidences.')
flags.DEFINE_bool('shard', True, 'Shard each batch over all local devices.')
flags.DEFINE_integer('torch_threads', 0, 'Reference on CPU: torch.set_num_threads (0: torch\'s default). On a shared '
                     'or small CPU, 1 avoids thread contention, which slows the many tiny ops of the reference loop '
                     'by 10x or more.')

REFERENCE_FILES = ('llama/gpt.py', 'bae/binaryae.py', 'llama/bindiff/binarylatent.py')


# ----------------------------------------------------------------------------- configs
def build_configs():
  """(BAEConfig, BiGRConfig) for --size / --code_dim with the release recipe (adaLN, p_flip, weighted BCE)."""
  from var_jax.models.bae import BAEConfig
  from var_jax.models.bigr import BiGRConfig, bigr_config
  recipe = dict(num_classes=1000, use_adaLN=True, p_flip=True, focal=0.0, token_dropout_p=0.0, resid_dropout_p=0.0,
                ffn_dropout_p=0.0, infer_steps=FLAGS.infer_steps, n_sample_steps=256)
  if FLAGS.size == 'tiny':
    k = FLAGS.code_dim or 16
    bae = BAEConfig(nf=32, ch_mult=(1, 1, 1, 1), res_blocks=1, attn_resolutions=(4,), resolution=32,
                    codebook_size=k, emb_dim=32)
    bigr = BiGRConfig(dim=64, n_layer=2, n_head=4, multiple_of=64, binary_size=k, seq_len=16, block_size=16,
                      denoise_hidden_dim=64, num_block_mlp=2, **recipe)
    return bae, bigr
  res = 512 if FLAGS.size == 'L-512' else 256
  k = FLAGS.code_dim or (32 if res == 512 else 24)
  seq = (res // 16) ** 2
  # the released tokenizer: nf 128, ch_mult 1,1,2,2,4, 2 res blocks, attention at 16px (none at 512px), norm_first
  bae = BAEConfig(resolution=res, codebook_size=k, attn_resolutions=(16,))
  bigr = bigr_config(f'BiGR-{FLAGS.size}', binary_size=k, seq_len=seq, block_size=seq, **recipe)
  return bae, bigr


# ----------------------------------------------------------------------------- ours
def time_ours(pipe, labels):
  from var_jax.dtypes import parse_dtype
  dtype = parse_dtype(FLAGS.dtype, '--dtype')
  kw = dict(cfg=FLAGS.cfg, num_iter=FLAGS.num_iter, infer_steps=FLAGS.infer_steps, gumbel_temp=FLAGS.gumbel_temp,
            batch_size=FLAGS.batch_size, dtype=dtype, shard=FLAGS.shard)
  t0 = time.perf_counter()
  images, bits = pipe.sample(labels[0], FLAGS.seed, **kw)      # compiles, then runs once
  first = time.perf_counter() - t0
  s = pipe.image_size
  if images.shape != (FLAGS.batch_size, s, s, 3) or not np.isfinite(images).all():
    raise RuntimeError(f'unexpected sample output: shape {images.shape}, finite {np.isfinite(images).all()}')
  lats = []
  for i in range(1, len(labels)):
    t0 = time.perf_counter()
    pipe.sample(labels[i], FLAGS.seed + i, **kw)
    lats.append(time.perf_counter() - t0)
  return bc.timing_stats(first, lats, FLAGS.batch_size)


# ----------------------------------------------------------------------------- the reference
class _StubModule(types.ModuleType):
  """Stands in for a package the reference imports at module level but never calls on the sampling path
  (torchvision, timm, PIL, yaml, tqdm: used by LPIPS, the BinaryGAN training code, data loading and logging).
  Any attribute is a placeholder that raises when called, so a stub that is actually used fails loudly."""

  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    mod = self.__name__

    class _Placeholder:
      def __init__(self, *a, **k):
        raise RuntimeError(f'{mod}.{name} is a benchmark stub: the reference code called it unexpectedly')

      def __call__(self, *a, **k):
        raise RuntimeError(f'{mod}.{name} is a benchmark stub: the reference code called it unexpectedly')
    _Placeholder.__name__ = name
    return _Placeholder


def _stub_missing(names):
  """Register stubs for the packages in ``names`` that are not installed (real packages are left alone)."""
  import importlib
  stubbed = []
  for name in names:
    try:
      importlib.import_module(name)
    except ImportError:
      parts = name.split('.')
      for i in range(1, len(parts) + 1):
        sub = '.'.join(parts[:i])
        if sub not in sys.modules:
          sys.modules[sub] = _StubModule(sub)
          if i > 1:
            setattr(sys.modules['.'.join(parts[:i - 1])], parts[i - 1], sys.modules[sub])
      stubbed.append(name)
  return stubbed


def reference_dir(path):
  path = os.path.abspath(os.path.expanduser(path))
  missing = [f for f in REFERENCE_FILES if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise app.UsageError(f'--reference_path={path} does not look like a haoosz/BiGR checkout (missing {missing})')
  return path


def import_reference(path):
  """The reference ``BinaryAutoEncoder``, ``Transformer`` and ``ModelArgs``, imported from the user's checkout."""
  path = reference_dir(path)
  for top in ('bae', 'llama', 'utils', 'hparams', 'misc'):    # the checkout's top-level packages and modules
    loaded = sys.modules.get(top)
    if loaded is not None and not os.path.abspath(getattr(loaded, '__file__', '') or '').startswith(path):
      raise RuntimeError(f'a different top-level `{top}` module is already imported ({loaded!r})')
  # Module-level imports of the reference that the BAE / BiGR sampling path never calls (see _StubModule).
  stubbed = _stub_missing(['torchvision', 'torchvision.models', 'torchvision.transforms', 'timm', 'timm.models',
                           'timm.models.layers', 'PIL', 'PIL.Image', 'yaml', 'tqdm'])
  if path not in sys.path:
    sys.path.insert(0, path)
  from bae.binaryae import BinaryAutoEncoder   # noqa: E402
  from llama.gpt import ModelArgs, Transformer  # noqa: E402
  return BinaryAutoEncoder, Transformer, ModelArgs, stubbed


def load_reference_models(pipe, path, dev):
  """Export ``pipe`` with ``save_torch`` and load it ``strict=True`` into fresh reference models (eval mode)."""
  import torch
  RefBAE, RefTransformer, ModelArgs, stubbed = import_reference(path)
  bc_, gc = pipe.bae_config, pipe.bigr_config
  h = types.SimpleNamespace(n_channels=bc_.in_channels, nf=bc_.nf, res_blocks=bc_.res_blocks,
                            codebook_size=bc_.codebook_size, emb_dim=bc_.emb_dim, ch_mult=list(bc_.ch_mult),
                            img_size=bc_.resolution, attn_resolutions=list(bc_.attn_resolutions), quantizer='binary',
                            beta=0.25, deterministic=True, use_tanh=False, gen_mul=bc_.gen_mul,
                            norm_first=bc_.norm_first)
  # ``Generator.__init__`` calls ``.cuda()`` on its unused ``logsigma`` head; without CUDA that call is made a
  # no-op while the BAE is built (the head is never used by encode / decode).
  cuda = torch.nn.Module.cuda
  if not torch.cuda.is_available():
    torch.nn.Module.cuda = lambda self, *a, **k: self
  try:
    bae = RefBAE(h)
  finally:
    torch.nn.Module.cuda = cuda
  args = {k: v for k, v in gc.model_args().items()}
  gpt = RefTransformer(ModelArgs(**args))
  with tempfile.TemporaryDirectory(prefix='bigr_bench_') as tmp:
    bae_path, bigr_path = os.path.join(tmp, 'binaryae.th'), os.path.join(tmp, 'bigr.pt')
    with warnings.catch_warnings():
      warnings.filterwarnings('ignore', message='The given NumPy array is not writable')
      pipe.save_torch(bae_path, bigr_path)
    sd = torch.load(bae_path, map_location='cpu', weights_only=True)
    bae.load_state_dict({k.split('.', 1)[1]: v for k, v in sd.items() if k.startswith('ae.')}, strict=True)
    gpt.load_state_dict(torch.load(bigr_path, map_location='cpu', weights_only=True)['ema'], strict=True)
  return bae.to(dev).eval(), gpt.to(dev).eval(), stubbed


def time_reference(pipe, labels):
  import torch
  dev = bc.torch_device()
  if FLAGS.torch_threads > 0:
    torch.set_num_threads(FLAGS.torch_threads)
  t0 = time.perf_counter()
  bae, gpt, stubbed = load_reference_models(pipe, FLAGS.reference_path, dev)
  setup_s = time.perf_counter() - t0
  # weights check: the reference forward_full_image (last layer, token mean) against ours on random bits
  bits = np.random.default_rng(FLAGS.seed).integers(0, 2, (2, pipe.bigr_config.seq_len, pipe.binary_size))
  lab = labels[0][:2] if labels.shape[1] >= 2 else np.repeat(labels[0], 2)
  with torch.inference_mode():
    theirs = gpt.forward_full_image(torch.as_tensor(bits, dtype=torch.float32, device=dev),
                                    torch.as_tensor(lab, device=dev), pipe.num_layers - 1).mean(1).cpu().numpy()
  ours = np.asarray(pipe.features(bits, layer=pipe.num_layers - 1, label=lab))
  weights_rel_err = float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-12))
  print(f'reference: same weights check: last-layer features max rel err {weights_rel_err:.2e}', flush=True)
  sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
  use_amp = FLAGS.dtype == 'bfloat16'
  g, k = pipe.latent_size, pipe.binary_size

  def run(i):
    torch.manual_seed(FLAGS.seed + i)
    np.random.seed(FLAGS.seed + i)
    y = torch.as_tensor(labels[i], dtype=torch.long, device=dev)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
      seq = gpt.generate_with_cfg(cond=y, max_new_tokens=g * g, cond_padding=gpt.cls_token_num,
                                  num_iter=FLAGS.num_iter, out_dim=k, cfg_scale=FLAGS.cfg, cfg_schedule='constant',
                                  gumbel_temp=FLAGS.gumbel_temp, gumbel_schedule='constant')
      img = bae.decode(seq.float().transpose(1, 2).reshape(y.shape[0], -1, g, g))      # sample.py's recipe
    sync()
    return img

  t0 = time.perf_counter()
  img = run(0)
  first = time.perf_counter() - t0
  if tuple(img.shape) != (FLAGS.batch_size, 3, pipe.image_size, pipe.image_size):
    raise RuntimeError(f'unexpected reference output shape {tuple(img.shape)}')
  lats = []
  for i in range(1, len(labels)):
    t0 = time.perf_counter()
    run(i)
    lats.append(time.perf_counter() - t0)
  out = bc.timing_stats(first, lats, FLAGS.batch_size)
  out.pop('compile_s_est')
  out.update(setup_s=setup_s, **bc.torch_info(dev), autocast_bf16=use_amp,
             tf32=bool(FLAGS.tf32 and dev.type == 'cuda'), stubbed_imports=stubbed,
             weights_check_rel_err=weights_rel_err)
  return out


def _fmt_run(name, r):
  first = f'first call {r["first_call_s"]:.2f} s'
  if 'compile_s_est' in r:
    first += f' (compile ~{r["compile_s_est"]:.2f} s)'
  return (f'{name:<10} {first} | latency/batch mean {r["latency_mean_s"] * 1e3:.1f} ms, '
          f'min {r["latency_min_s"] * 1e3:.1f} ms | {r["images_per_s"]:.3f} images/s '
          f'(best {r["images_per_s_best"]:.3f})')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.batch_size < 1 or FLAGS.num_batches < 1:
    raise app.UsageError('--batch_size and --num_batches must be >= 1')
  if FLAGS.reference_path:
    reference_dir(FLAGS.reference_path)                       # fail before the (long) JAX part
    if FLAGS.cfg <= 1.0:
      raise app.UsageError('the reference generate_with_cfg needs --cfg > 1')
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')   # leave GPU memory to PyTorch
  import jax
  from var_jax.pipelines.bigr import BiGRPipeline

  bae_cfg, bigr_cfg = build_configs()
  device_line, device = bc.describe_jax_devices()
  print(device_line)
  t0 = time.perf_counter()
  pipe = BiGRPipeline.init_random(bae_cfg, bigr_cfg, jax.random.key(FLAGS.seed))
  jax.block_until_ready((pipe.bae_variables, pipe.bigr_variables))
  init_s = time.perf_counter() - t0
  n_bigr = bc.num_params(pipe.bigr_variables['params'])
  n_bae = bc.num_params(pipe.bae_variables['params'])
  c = bigr_cfg
  config = dict(size=FLAGS.size, dim=c.dim, n_layer=c.n_layer, n_head=c.n_head, num_block_mlp=c.num_block_mlp,
                denoise_hidden_dim=c.denoise_hidden_dim, binary_size=c.binary_size, seq_len=c.seq_len,
                image_size=pipe.image_size, bigr_params=n_bigr, bae_params=n_bae, batch_size=FLAGS.batch_size,
                num_batches=FLAGS.num_batches, dtype=FLAGS.dtype, cfg=FLAGS.cfg, num_iter=FLAGS.num_iter,
                infer_steps=FLAGS.infer_steps, n_sample_steps=c.n_sample_steps, gumbel_temp=FLAGS.gumbel_temp,
                shard=FLAGS.shard, seed=FLAGS.seed)
  print(f'config: BiGR-{FLAGS.size} (dim {c.dim}, {c.n_layer} layers, {c.n_head} heads, transcoder '
        f'{c.num_block_mlp}x{c.denoise_hidden_dim}, {n_bigr / 1e6:.1f}M params) | BAE K={c.binary_size} '
        f'({n_bae / 1e6:.1f}M params), {pipe.image_size}px, N={c.seq_len}')
  print(f'sampling: batch {FLAGS.batch_size} x {FLAGS.num_batches} timed batches | {FLAGS.dtype} | cfg {FLAGS.cfg}, '
        f'{FLAGS.num_iter} iterations, {FLAGS.infer_steps}/{c.n_sample_steps} diffusion steps, gumbel '
        f'{FLAGS.gumbel_temp} | random-weight init {init_s:.1f} s', flush=True)

  rng = np.random.default_rng(FLAGS.seed)
  labels = rng.integers(0, c.num_classes, size=(FLAGS.num_batches + 1, FLAGS.batch_size)).astype(np.int64)
  results = dict(device=device, config=config)
  results['ours'] = ours = time_ours(pipe, labels)
  print(_fmt_run('ours:', ours), flush=True)
  if FLAGS.reference_path:
    results['reference'] = refr = time_reference(pipe, labels)
    print(bc.reference_line(refr))
    if refr['stubbed_imports']:
      print(f'reference: stubbed (uncalled) imports: {", ".join(refr["stubbed_imports"])}')
    print(_fmt_run('reference:', refr))
    results['ratio_ours_over_reference'] = ratio = ours['images_per_s'] / refr['images_per_s']
    results['ratio_ours_over_reference_best'] = ours['images_per_s_best'] / refr['images_per_s_best']
    print(f'ratio ours/reference (images/s, mean latency): {ratio:.2f}x '
          f'(best-batch: {results["ratio_ours_over_reference_best"]:.2f}x)')
  bc.write_json(results, FLAGS.json_out)


if __name__ == '__main__':
  app.run(main)
