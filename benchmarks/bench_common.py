"""Pieces shared by the benchmarks (``sample_speed.py``, ``train_speed.py``); not a benchmark itself.

Importing this module puts the checkout's root first on ``sys.path`` (so the benchmarks time this checkout's
``var_jax``, not an installed copy) and defines the shared absl flags: the model shape (``--depth --small
--patch_nums --vae_ch --vocab_size --z_channels --num_classes``), ``--seed``, ``--reference_path``, ``--tf32`` and
``--json_out``. It also holds: building the model configs from those flags, the device / CPU description, timing
statistics, JSON output, and the reference FoundationVision/VAR side (importing its classes from the user's
checkout at run time and loading our exported weights into them with ``strict=True``).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import types
import warnings

from absl import app
from absl import flags
import numpy as np

# Benchmark this checkout's var_jax, not whichever copy is installed (the script's own folder is sys.path[0]).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_integer('depth', 16, 'VAR depth (released presets: 16, 20, 24, 30, 36); width 64*depth, depth heads.')
flags.DEFINE_string('reference_path', '', 'Checkout of FoundationVision/VAR to time beside ours (empty: skip).')
flags.DEFINE_bool('small', False, 'Tiny model for a quick CPU run: depth 2, VQVAE ch 32, patch_nums 1,2,3,4 (64px); '
                  'explicitly given --depth/--vae_ch/--patch_nums still win.')
flags.DEFINE_list('patch_nums', None, 'Scales, e.g. 1,2,3,4 (default: the preset\'s, 256px for depth != 36).')
flags.DEFINE_integer('vae_ch', None, 'VQVAE base channels (default 160; a multiple of 32).')
flags.DEFINE_integer('vocab_size', None, 'Codebook size V (default 4096).')
flags.DEFINE_integer('z_channels', None, 'Codebook dim Cvae (default 32).')
flags.DEFINE_integer('num_classes', 1000, 'Number of classes.')
flags.DEFINE_integer('seed', 0, 'Seed for the weights, the labels / data and the sampling.')
flags.DEFINE_bool('tf32', True, 'Reference on GPU: allow TF32 matmuls/convs in float32 (as the reference demo).')
flags.DEFINE_string('json_out', '', 'Optional path to write the results as JSON.')

SMALL = dict(depth=2, vae_ch=32, patch_nums=(1, 2, 3, 4))


# ----------------------------------------------------------------------------- model configs
def flag_value(name, default=None):
  """An explicitly given flag wins; then the --small value; then the flag's default (or ``default``)."""
  if FLAGS[name].present:
    return FLAGS[name].value
  if FLAGS.small and name in SMALL:
    return SMALL[name]
  return FLAGS[name].value if FLAGS[name].value is not None else default


def build_configs():
  """``(VQVAEConfig, VARConfig)`` from the model flags: ``var_preset(depth)`` with the given overrides."""
  from var_jax.models.var_config import VQVAEConfig, var_preset
  depth = flag_value('depth')
  overrides = dict(num_classes=FLAGS.num_classes)
  for name in ('vocab_size', 'z_channels'):
    if flag_value(name) is not None:
      overrides[name] = flag_value(name)
  pns = flag_value('patch_nums')
  if pns is not None:
    overrides['patch_nums'] = tuple(int(p) for p in pns)
  var_cfg = var_preset(depth, **overrides)
  vae_cfg = VQVAEConfig(vocab_size=var_cfg.vocab_size, z_channels=var_cfg.z_channels, ch=flag_value('vae_ch', 160),
                        patch_nums=var_cfg.patch_nums)
  return vae_cfg, var_cfg


def model_summary(vae_cfg, var_cfg, n_var, n_vae):
  """One line describing the transformer and the tokenizer."""
  return (f'VAR-d{var_cfg.depth} (C={var_cfg.embed_dim}, heads={var_cfg.num_heads}, '
          f'{n_var / 1e6:.1f}M params{", shared AdaLN" if var_cfg.shared_aln else ""}), '
          f'patch_nums={var_cfg.patch_nums} (L={var_cfg.seq_len}) | VQVAE ch={vae_cfg.ch} V={vae_cfg.vocab_size} '
          f'Cvae={vae_cfg.z_channels} ({n_vae / 1e6:.1f}M params), {vae_cfg.image_size}px')


def num_params(tree):
  import jax
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- devices
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
  """``(line, dict)``: the JAX devices (the CPU model and cores on CPU), versions and where var_jax comes from."""
  import jax
  import var_jax
  devs = jax.devices()
  d0 = devs[0]
  kind = f'{d0.device_kind} ({cpu_name()}, {os.cpu_count()} cores)' if d0.platform == 'cpu' else d0.device_kind
  line = (f'device: {d0.platform} / {kind} x{len(devs)} (local {jax.local_device_count()}) | jax {jax.__version__} | '
          f'python {platform.python_version()} | var_jax from {os.path.dirname(var_jax.__file__)}')
  return line, dict(platform=d0.platform, device_kind=d0.device_kind, count=len(devs), jax=jax.__version__)


# ----------------------------------------------------------------------------- statistics and output
def jax_peak_memory_gib():
  """Peak device memory of this process's JAX allocations (``memory_stats()['peak_bytes_in_use']``), or None."""
  import jax
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  peaks = [st['peak_bytes_in_use'] for st in stats if 'peak_bytes_in_use' in st]
  return max(peaks) / 2**30 if peaks else None


def torch_peak_memory_gib():
  """``torch.cuda.max_memory_allocated`` on CUDA, else None."""
  import torch
  return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def timing_stats(first_s, times, batch_size, name='latency', plural='latencies'):
  """First call (compile + run) and the steady-state times: ``{name}_mean_s``, ``{name}_min_s``, ``{plural}_s``,
  images/s from the mean and from the best time."""
  t = np.asarray(times, np.float64)
  mean = float(t.mean())
  return {'first_call_s': first_s, 'compile_s_est': max(first_s - mean, 0.0), f'{name}_mean_s': mean,
          f'{name}_min_s': float(t.min()), f'{plural}_s': [float(x) for x in t],
          'images_per_s': batch_size / mean, 'images_per_s_best': batch_size / float(t.min())}


def write_json(results, path):
  if path:
    with open(path, 'w') as f:
      json.dump(results, f, indent=2)
    print(f'wrote {path}')


# ----------------------------------------------------------------------------- the reference (PyTorch)
def reference_dir(path):
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(os.path.join(path, 'models', 'var.py')) or not os.path.isfile(os.path.join(path, 'dist.py')):
    raise app.UsageError(f'--reference_path={path} does not look like a FoundationVision/VAR checkout '
                         f'(models/var.py and dist.py expected)')
  return path


def prepare_reference():
  """Before importing JAX: check --reference_path and keep JAX from reserving most of the GPU memory."""
  if FLAGS.reference_path:
    reference_dir(FLAGS.reference_path)   # fail before the (long) JAX part
    # JAX would otherwise reserve 75% of the GPU memory at start-up and leave little to PyTorch.
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')


def import_reference(path):
  """The reference ``VQVAE`` and ``VAR`` classes, imported from the user's checkout (never copied here)."""
  path = reference_dir(path)
  loaded = sys.modules.get('models')
  if loaded is not None and not os.path.abspath(getattr(loaded, '__file__', '') or '').startswith(path):
    raise RuntimeError(f'a different top-level `models` package is already imported ({loaded!r})')
  try:
    import huggingface_hub  # noqa: F401
  except ImportError:   # only used by the reference's VARHF mixin
    stub = types.ModuleType('huggingface_hub')
    stub.PyTorchModelHubMixin = object
    sys.modules['huggingface_hub'] = stub
  if path not in sys.path:
    sys.path.insert(0, path)
  from models.var import VAR as RefVAR        # noqa: E402  (imports the reference's dist.py: device fixed there)
  from models.vqvae import VQVAE as RefVQVAE  # noqa: E402
  return RefVQVAE, RefVAR


def reference_compatible(vae_cfg):
  """Why the reference ``VQVAE`` (which hard-codes its encoder/decoder layout) cannot hold this tokenizer, or ''."""
  fixed = dict(ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, in_channels=3, using_sa=True, using_mid_sa=True)
  bad = [f'{k}={getattr(vae_cfg, k)} (reference: {v})' for k, v in fixed.items() if getattr(vae_cfg, k) != v]
  return ', '.join(bad)


def torch_device():
  """The reference's device (CUDA when available) with --tf32 applied on GPU."""
  import torch
  dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  if dev.type == 'cuda':
    torch.backends.cudnn.allow_tf32 = FLAGS.tf32
    torch.backends.cuda.matmul.allow_tf32 = FLAGS.tf32
    torch.set_float32_matmul_precision('high' if FLAGS.tf32 else 'highest')
  return dev


def load_reference_models(pipe, reference_path, **var_kwargs):
  """Export ``pipe``'s weights with ``save_torch`` and load them ``strict=True`` into fresh reference ``VQVAE``
  (test mode: frozen, eval) and ``VAR`` instances (on the CPU; ``var_kwargs`` e.g. ``drop_path_rate``)."""
  import torch
  vae_cfg, var_cfg = pipe.vae_config, pipe.var_config
  why = reference_compatible(vae_cfg)
  if why:
    raise ValueError(f'the reference VQVAE cannot hold this tokenizer: {why}')
  RefVQVAE, RefVAR = import_reference(reference_path)
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
                 flash_if_available=True, fused_if_available=True, **var_kwargs)
    vae.load_state_dict(torch.load(vae_path, map_location='cpu', weights_only=True), strict=True)
    var.load_state_dict(torch.load(var_path, map_location='cpu', weights_only=True), strict=True)
  return vae, var


def torch_info(dev):
  import torch
  return dict(torch=torch.__version__, torch_device=str(dev),
              torch_device_name=torch.cuda.get_device_name(dev) if dev.type == 'cuda' else cpu_name(),
              torch_threads=torch.get_num_threads())


def reference_line(refr):
  return (f'reference: torch {refr["torch"]} on {refr["torch_device"]} ({refr["torch_device_name"]}, '
          f'{refr["torch_threads"]} threads) | autocast bf16 {refr["autocast_bf16"]} | tf32 {refr["tf32"]} | '
          f'build + strict load {refr["setup_s"]:.1f} s')
