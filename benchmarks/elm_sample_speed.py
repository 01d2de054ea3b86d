"""ELM AR sampling speed: ours (KV cache, the whole loop one compiled program) vs the reference ``generate_cfg``.

The reference (Pepper-lll/LMforImageGeneration ``llama/ar_model.py``) has no KV cache at sampling time: step s runs
the whole prefix [class, tokens 0..s-1] through the transformer again, so an image of N positions costs
N(N+1)/2 position-forwards; ours prefills the class slot into a preallocated cache and runs one position per step
(N position-forwards), inside one ``lax.scan``. Both sides use the same random weights (ours exported with
``save_torch`` and loaded ``strict=True`` into the reference classes), the same settings (CFG with its schedule,
temperature, top-k) and, by default, decode the tokens to images with the same BAE (``--nodecode``: tokens only).

Times: the first call (ours: compilation + one run; reference: a warm-up run) separately, then ``--num_batches``
timed batches on each side; images/s from the mean latency and the ratio ours/reference. On the reference side
``--dtype bfloat16`` means ``torch.autocast(dtype=torch.bfloat16)``, and float32 matmuls use TF32 on GPU unless
``--notf32``.

Sizes (``--size``): the GPT presets of the reference (B, L, XL, XXL: head_dim 64, 256 positions, the released BAE
architecture nf 128 / ch_mult 1,1,2,2,4 / 2 res blocks / emb_dim 256, 256px) and small ones for CPU runs (tiny,
small, medium: the fixtures' small BAE, nf 32, 5 levels of width 32, 1 res block, emb_dim 32). ``--split a-b``
is token_each a and code_dim b (K = a*b bits per cell, V = 2^b); the release FID model is L with 2-10.

Usage:
  python benchmarks/elm_sample_speed.py --reference_path ~/src/LMforImageGeneration            # GPT-L 2-10
  python benchmarks/elm_sample_speed.py --size L --split 1-16 --dtype bfloat16 --batch_size 32
  python benchmarks/elm_sample_speed.py --size tiny --batch_size 4 --num_batches 2 --reference_path ...  # CPU

The reference is imported at run time from ``--reference_path`` (a checkout; never copied here). Its BAE module
imports torchvision, timm, PIL, yaml and tqdm at module level (LPIPS, data loading, logging) without using them
for encode/decode; the ones that are not installed are replaced by stub modules that raise if anything in them is
called (see ``_stub_missing_modules``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import types

from absl import app
from absl import flags
import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:   # time this checkout's var_jax, not an installed copy
  sys.path.insert(0, REPO_ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_enum('size', 'L', ['tiny', 'small', 'medium', 'B', 'L', 'XL', 'XXL'], 'Model size (see the docstring).')
flags.DEFINE_string('split', '2-10', 'token_each-code_dim, e.g. 2-10 (release FID model), 1-16, 2-8, 2-12.')
flags.DEFINE_integer('num_classes', 1000, 'Number of classes.')
flags.DEFINE_integer('batch_size', 16, 'Images per sampling call.')
flags.DEFINE_integer('num_batches', 3, 'Timed batches after the first (compiling / warm-up) call.')
flags.DEFINE_float('cfg', 4.0, 'CFG scale (release FID: 4.0).')
flags.DEFINE_enum('cfg_schedule', 'linear', ['constant', 'linear', 'cos', 'log', 'square', 'square_root'],
                  'CFG schedule (release FID: linear).')
flags.DEFINE_float('temperature', 1.0, 'Sampling temperature.')
flags.DEFINE_integer('top_k', 1000, 'top-k (release FID: 1000; 0: off).')
flags.DEFINE_bool('decode', True, 'Decode the tokens to images with the BAE (both sides); --nodecode: tokens only.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype (reference: autocast when bfloat16).')
flags.DEFINE_bool('shard', True, 'Shard each batch over all local devices (pipe.sample(shard=...)).')
flags.DEFINE_string('reference_path', '', 'Checkout of Pepper-lll/LMforImageGeneration to time beside ours '
                    '(empty: ours only).')
flags.DEFINE_bool('check_greedy', True, 'With --reference_path: also sample 2 images greedily (top_k 1) on both '
                  'sides and report whether the tokens agree (a check that both run the same model).')
flags.DEFINE_bool('tf32', True, 'Reference on GPU: allow TF32 matmuls in float32.')
flags.DEFINE_integer('torch_threads', 0, 'Reference on CPU: torch.set_num_threads (0: torch default).')
flags.DEFINE_integer('seed', 0, 'Seed for the weights, the labels and the sampling.')
flags.DEFINE_string('json_out', '', 'Optional path to write the results as JSON.')

# (n_layer, dim, n_head, latent grid, BAE)
SIZES = {
    'tiny': (2, 64, 4, 4, 'small'),
    'small': (4, 256, 4, 8, 'small'),
    'medium': (8, 512, 8, 16, 'small'),
    'B': (12, 768, 12, 16, 'release'),
    'L': (24, 1024, 16, 16, 'release'),
    'XL': (36, 1280, 20, 16, 'release'),
    'XXL': (48, 1536, 24, 16, 'release'),
}


# ----------------------------------------------------------------------------- configs and weights
def build_configs():
  from var_jax.models.bae import BAEConfig
  from var_jax.models.elm import ELMConfig
  try:
    token_each, code_dim = (int(x) for x in FLAGS.split.split('-'))
  except ValueError:
    raise app.UsageError(f'--split must look like 2-10 (token_each-code_dim), got {FLAGS.split!r}') from None
  n_layer, dim, n_head, grid, bae_kind = SIZES[FLAGS.size]
  elm = ELMConfig.from_model_args('ar', n_layer=n_layer, dim=dim, n_head=n_head, token_each=token_each,
                                  code_dim=code_dim, block_size=grid * grid, num_classes=FLAGS.num_classes,
                                  multiple_of=256, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
  k = token_each * code_dim
  if bae_kind == 'release':
    bae = BAEConfig(codebook_size=k, resolution=grid * 16)
  else:
    bae = BAEConfig(nf=32, ch_mult=(1, 1, 1, 1, 1), res_blocks=1, attn_resolutions=(grid,), resolution=grid * 16,
                    codebook_size=k, emb_dim=32)
  return bae, elm


def randomize_zero_params(variables, seed, std=0.02):
  """The reference zero-initialises the output heads (and adaLN): re-draw every all-zero matrix from N(0, std) so
  that the logits are not uniform (the amount of work is the same either way)."""
  import jax
  import jax.numpy as jnp
  leaves, treedef = jax.tree.flatten(jax.device_get(variables))
  rng = np.random.default_rng(seed)
  out = [jnp.asarray(rng.normal(0.0, std, a.shape).astype(a.dtype) if a.ndim >= 2 and not a.any() else a)
         for a in leaves]
  return jax.tree.unflatten(treedef, out)


def num_params(tree):
  import jax
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- devices, statistics, output
def cpu_name():
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def describe_jax_devices():
  import jax
  import var_jax
  d0 = jax.devices()[0]
  kind = f'{d0.device_kind} ({cpu_name()}, {os.cpu_count()} cores)' if d0.platform == 'cpu' else d0.device_kind
  line = (f'device: {d0.platform} / {kind} x{len(jax.devices())} | jax {jax.__version__} | python '
          f'{platform.python_version()} | var_jax from {os.path.dirname(var_jax.__file__)}')
  return line, dict(platform=d0.platform, device_kind=d0.device_kind, count=len(jax.devices()), jax=jax.__version__)


def timing_stats(first_s, times, batch_size):
  t = np.asarray(times, np.float64)
  mean = float(t.mean())
  return {'first_call_s': first_s, 'latency_mean_s': mean, 'latency_min_s': float(t.min()),
          'latencies_s': [float(x) for x in t], 'images_per_s': batch_size / mean,
          'images_per_s_best': batch_size / float(t.min())}


def fmt_run(name, r):
  return (f'{name:<10} first call {r["first_call_s"]:.2f} s | latency/batch mean {r["latency_mean_s"] * 1e3:.1f} ms, '
          f'min {r["latency_min_s"] * 1e3:.1f} ms | {r["images_per_s"]:.3f} images/s '
          f'(best {r["images_per_s_best"]:.3f})')


# ----------------------------------------------------------------------------- ours
def time_ours(pipe, labels):
  import jax
  import jax.numpy as jnp
  from var_jax.sampling import elm as es
  from var_jax.sampling.common import per_sample_keys
  from var_jax.dtypes import parse_dtype
  dtype = parse_dtype(FLAGS.dtype, '--dtype')
  top_k = FLAGS.top_k or None
  if FLAGS.decode:
    kw = dict(cfg=FLAGS.cfg, cfg_schedule=FLAGS.cfg_schedule, temperature=FLAGS.temperature, top_k=top_k,
              batch_size=FLAGS.batch_size, dtype=dtype, shard=FLAGS.shard)
    run = lambda i: pipe.sample(labels[i], FLAGS.seed + i, **kw)[1]          # host arrays: synchronous
  else:
    from var_jax.interop.elm import elm_model
    fn = es.make_ar_sampler(elm_model(pipe.elm_config, dtype=dtype), cfg_scale=FLAGS.cfg,
                            cfg_schedule=FLAGS.cfg_schedule, temperature=FLAGS.temperature, top_k=top_k)
    params = pipe.elm_variables if FLAGS.dtype == 'float32' else jax.tree.map(lambda a: a.astype(dtype),
                                                                              pipe.elm_variables)
    run = lambda i: np.asarray(fn(params, jnp.asarray(labels[i]),
                                  per_sample_keys(FLAGS.seed + i, labels.shape[1]))['tokens'])
  t0 = time.perf_counter()
  tokens = run(0)
  first = time.perf_counter() - t0
  if tokens.shape != (FLAGS.batch_size, pipe.seq_len, pipe.token_each):
    raise RuntimeError(f'unexpected token shape {tokens.shape}')
  lats = []
  for i in range(1, labels.shape[0]):
    t0 = time.perf_counter()
    run(i)
    lats.append(time.perf_counter() - t0)
  return timing_stats(first, lats, FLAGS.batch_size)


# ----------------------------------------------------------------------------- the reference (PyTorch)
class _Unavailable:
  """Stands in for anything taken from a stubbed module: raises when called."""

  def __init__(self, name):
    self._name = name

  def __getattr__(self, attr):
    return _Unavailable(f'{self._name}.{attr}')

  def __call__(self, *args, **kwargs):
    raise RuntimeError(f'{self._name} belongs to a stubbed module (not installed): the benchmark did not expect '
                       f'the reference to call it')


class _StubModule(types.ModuleType):
  def __getattr__(self, attr):
    if attr.startswith('__'):
      raise AttributeError(attr)
    return _Unavailable(f'{self.__name__}.{attr}')


def _stub_missing_modules():
  """Stub the packages the reference imports at module level but never uses for the BAE and the GPT: torchvision
  (LPIPS's VGG, datasets, transforms in bae/lpips.py and utils/*.py), timm (drop_path in bae/transformer*.py),
  PIL, yaml, tqdm (utils/*.py). Only packages that are not installed are stubbed (with their submodules)."""
  stubbed = []
  for name in ('torchvision', 'torchvision.transforms', 'torchvision.models', 'torchvision.datasets',
               'torchvision.utils', 'timm', 'timm.models', 'timm.models.layers', 'PIL', 'PIL.Image', 'yaml',
               'tqdm'):
    top = name.split('.')[0]
    if top in sys.modules and not isinstance(sys.modules[top], _StubModule):
      continue
    if name in sys.modules or (top == name and importlib.util.find_spec(name) is not None):
      continue
    if top != name and not isinstance(sys.modules.get(top), _StubModule):
      continue
    mod = _StubModule(name)
    mod.__path__ = []            # a package, so that `from x.y import z` resolves
    sys.modules[name] = mod
    if top != name:
      setattr(sys.modules[name.rsplit('.', 1)[0]], name.rsplit('.', 1)[1], mod)
    stubbed.append(name)
  return stubbed


def import_reference(path):
  """(Transformer, ModelArgs, BinaryAutoEncoder, stubbed module names) from the user's checkout."""
  path = os.path.abspath(os.path.expanduser(path))
  for f in ('llama/ar_model.py', 'bae/binaryae.py', 'utils/vqgan_utils.py'):
    if not os.path.isfile(os.path.join(path, f)):
      raise app.UsageError(f'--reference_path={path} does not look like a Pepper-lll/LMforImageGeneration '
                           f'checkout ({f} missing)')
  for top in ('llama', 'bae', 'utils', 'hparams', 'misc'):    # the checkout's top-level names
    loaded = sys.modules.get(top)
    if loaded is not None and not os.path.abspath(getattr(loaded, '__file__', '') or
                                                  next(iter(getattr(loaded, '__path__', [''])), '')).startswith(path):
      raise RuntimeError(f'a different top-level `{top}` is already imported ({loaded!r})')
  stubbed = _stub_missing_modules()
  if path not in sys.path:
    sys.path.insert(0, path)
  from llama.ar_model import ModelArgs, Transformer   # noqa: E402
  from bae.binaryae import BinaryAutoEncoder          # noqa: E402
  return Transformer, ModelArgs, BinaryAutoEncoder, stubbed


def torch_device():
  import torch
  dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  if FLAGS.torch_threads > 0:
    torch.set_num_threads(FLAGS.torch_threads)
  if dev.type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = FLAGS.tf32
    torch.backends.cudnn.allow_tf32 = FLAGS.tf32
  return dev


def load_reference_models(pipe, path, dev):
  """Our weights exported with ``save_torch`` and loaded ``strict=True`` into fresh reference modules."""
  import torch
  Transformer, ModelArgs, BinaryAutoEncoder, stubbed = import_reference(path)
  c, b = pipe.elm_config, pipe.bae_config
  names = {f.name for f in dataclasses.fields(ModelArgs)}
  args = ModelArgs(**{n: getattr(c, n) for n in names})
  h = types.SimpleNamespace(n_channels=b.in_channels, nf=b.nf, res_blocks=b.res_blocks, codebook_size=b.codebook_size,
                            emb_dim=b.emb_dim, ch_mult=list(b.ch_mult), img_size=b.resolution,
                            attn_resolutions=list(b.attn_resolutions), quantizer='binary', beta=0.0,
                            deterministic=True, use_tanh=False, gen_mul=b.gen_mul, norm_first=b.norm_first)
  with tempfile.TemporaryDirectory(prefix='var_jax_elm_bench_') as tmp:
    bae_path, model_path = os.path.join(tmp, 'binaryae.th'), os.path.join(tmp, 'model.pth')
    pipe.save_torch(bae_path, model_path)
    model = Transformer(args)
    model.load_state_dict(torch.load(model_path, map_location='cpu', weights_only=True), strict=True)
    # the reference Generator calls .cuda() on its unused ELBO head while it is built: a no-op without CUDA
    cuda = torch.nn.Module.cuda
    if not torch.cuda.is_available():
      torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
      bae = BinaryAutoEncoder(h)
    finally:
      torch.nn.Module.cuda = cuda
    sd = torch.load(bae_path, map_location='cpu', weights_only=True)
    bae.load_state_dict({k[len('ae.'):]: v for k, v in sd.items() if k.startswith('ae.')}, strict=True)
  return model.to(dev).eval(), bae.to(dev).eval(), stubbed


def greedy_ours(pipe, labels):
  import jax.numpy as jnp
  from var_jax.sampling import elm as es
  from var_jax.sampling.common import per_sample_keys
  fn = es.make_ar_sampler(pipe.model, cfg_scale=FLAGS.cfg, cfg_schedule=FLAGS.cfg_schedule, top_k=1)
  return np.asarray(fn(pipe.elm_variables, jnp.asarray(labels), per_sample_keys(0, len(labels)))['tokens'])


def time_reference(pipe, labels):
  import torch
  dev = torch_device()
  t0 = time.perf_counter()
  model, bae, stubbed = load_reference_models(pipe, FLAGS.reference_path, dev)
  setup_s = time.perf_counter() - t0
  c = pipe.elm_config
  g, cd = c.grid, c.code_dim
  shifts = torch.arange(cd - 1, -1, -1, device=dev)
  sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
  use_amp = FLAGS.dtype == 'bfloat16'

  def run(i):
    torch.manual_seed(FLAGS.seed + i)
    lab = torch.as_tensor(labels[i], dtype=torch.long, device=dev)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
      idx, _ = model.generate_cfg(idx=None, cond=lab, num_iter=c.seq_len, temperature=FLAGS.temperature,
                                  top_k=FLAGS.top_k or None, cfg_scale=FLAGS.cfg, cfg_schedule=FLAGS.cfg_schedule)
      if FLAGS.decode:   # sub-tokens -> MSB-first bits (B, K, h, w) -> bae.decode, as sample.py
        bits = (idx[..., None] >> shifts) & 1
        bits = bits.reshape(idx.shape[0], g, g, -1).permute(0, 3, 1, 2).float()
        bae.decode(bits, is_bin=True)
    sync()
    return idx

  t0 = time.perf_counter()
  idx = run(0)                     # warm-up
  first = time.perf_counter() - t0
  if tuple(idx.shape) != (FLAGS.batch_size, c.seq_len, c.token_each):
    raise RuntimeError(f'unexpected reference token shape {tuple(idx.shape)}')
  lats = []
  for i in range(1, labels.shape[0]):
    t0 = time.perf_counter()
    run(i)
    lats.append(time.perf_counter() - t0)
  out = timing_stats(first, lats, FLAGS.batch_size)
  if FLAGS.check_greedy:
    lab = labels[0, :2]
    with torch.inference_mode():
      ref_tokens, _ = model.generate_cfg(idx=None, cond=torch.as_tensor(lab, dtype=torch.long, device=dev),
                                         num_iter=c.seq_len, top_k=1, cfg_scale=FLAGS.cfg,
                                         cfg_schedule=FLAGS.cfg_schedule)
    ours = greedy_ours(pipe, lab)
    out['greedy_tokens_equal'] = float(np.mean(ours == ref_tokens.cpu().numpy()))
  out.update(setup_s=setup_s, torch=torch.__version__, torch_device=str(dev),
             torch_device_name=torch.cuda.get_device_name(dev) if dev.type == 'cuda' else cpu_name(),
             torch_threads=torch.get_num_threads(), autocast_bf16=use_amp,
             tf32=bool(FLAGS.tf32 and dev.type == 'cuda'), stubbed_modules=stubbed)
  return out


# ----------------------------------------------------------------------------- main
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.batch_size < 1 or FLAGS.num_batches < 1:
    raise app.UsageError('--batch_size and --num_batches must be >= 1')
  if FLAGS.reference_path:
    # JAX would otherwise reserve most of the GPU memory at start-up and leave little to PyTorch
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  import jax
  from var_jax.pipelines.elm import ELMPipeline

  bae_cfg, elm_cfg = build_configs()
  device_line, device = describe_jax_devices()
  print(device_line)
  t0 = time.perf_counter()
  pipe = ELMPipeline.init_random(bae_cfg, elm_cfg, jax.random.key(FLAGS.seed))
  pipe.elm_variables = randomize_zero_params(pipe.elm_variables, FLAGS.seed)
  jax.block_until_ready((pipe.bae_variables, pipe.elm_variables))
  init_s = time.perf_counter() - t0
  n_elm, n_bae = num_params(pipe.elm_variables['params']), num_params(pipe.bae_variables['params'])
  c = elm_cfg
  config = dict(size=FLAGS.size, n_layer=c.n_layer, dim=c.dim, n_head=c.n_head, token_each=c.token_each,
                code_dim=c.code_dim, vocab=c.codebook_size, seq_len=c.seq_len, num_classes=c.num_classes,
                elm_params=n_elm, bae_params=n_bae, image_size=pipe.image_size, batch_size=FLAGS.batch_size,
                num_batches=FLAGS.num_batches, cfg=FLAGS.cfg, cfg_schedule=FLAGS.cfg_schedule,
                temperature=FLAGS.temperature, top_k=FLAGS.top_k, decode=FLAGS.decode, dtype=FLAGS.dtype,
                shard=FLAGS.shard, seed=FLAGS.seed)
  print(f'config: ELM AR {FLAGS.size} ({c.n_layer} layers, dim {c.dim}, {c.n_head} heads, {n_elm / 1e6:.1f}M '
        f'params), split {c.token_each}-{c.code_dim} (V={c.codebook_size}), N={c.seq_len} | '
        f'BAE K={bae_cfg.codebook_size} nf={bae_cfg.nf} ({n_bae / 1e6:.1f}M params), {pipe.image_size}px | '
        f'decode {FLAGS.decode}')
  print(f'sampling: batch {FLAGS.batch_size} x {FLAGS.num_batches} timed batches | {FLAGS.dtype} | cfg {FLAGS.cfg} '
        f'{FLAGS.cfg_schedule}, temperature {FLAGS.temperature}, top_k {FLAGS.top_k} | random-weight init '
        f'{init_s:.1f} s', flush=True)

  rng = np.random.default_rng(FLAGS.seed)
  labels = rng.integers(0, c.num_classes, size=(FLAGS.num_batches + 1, FLAGS.batch_size)).astype(np.int32)
  results = dict(device=device, config=config)
  results['ours'] = ours = time_ours(pipe, labels)
  print(fmt_run('ours:', ours), flush=True)
  if FLAGS.reference_path:
    results['reference'] = refr = time_reference(pipe, labels)
    print(f'reference: torch {refr["torch"]} on {refr["torch_device"]} ({refr["torch_device_name"]}, '
          f'{refr["torch_threads"]} threads) | autocast bf16 {refr["autocast_bf16"]} | tf32 {refr["tf32"]} | '
          f'build + strict load {refr["setup_s"]:.1f} s | stubbed imports: '
          f'{", ".join(refr["stubbed_modules"]) or "none"}')
    print(fmt_run('reference:', refr))
    if 'greedy_tokens_equal' in refr:
      print(f'greedy check (2 images, top_k 1, {FLAGS.dtype} reference / float32 ours): '
            f'{100 * refr["greedy_tokens_equal"]:.1f}% of the sub-tokens equal')
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
