"""Move weights between our Flax params and the reference PyTorch checkpoints (FoundationVision/VAR layout).

This is the only module that knows torch names and NCHW/(out, in) layouts. The mapping is data: ``vae_table`` and
``var_table`` list, in the reference's ``state_dict`` order, every tensor the reference module holds (parameters and
buffers) with its torch shape and where it lives in our variables. Import and export both walk the same table, so
they cannot drift apart, and the export is loadable by the reference with ``load_state_dict(strict=True)``.

torch is optional: only ``.pth`` files need it (loaded with ``weights_only=True``: a checkpoint must not run code).
``.safetensors`` files need only the ``safetensors`` package.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from flax import traverse_util

from var_jax.models.var_config import PATCH_NUMS_256, VARConfig, VQVAEConfig, infer_patch_nums
from var_jax.models.var import block_causal_mask, level_ids

Array = np.ndarray
StateDict = Dict[str, Array]


class CheckpointMismatchError(ValueError):
  """A state_dict does not fit the expected layout (names the key, the expected and the found shape)."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One reference tensor: torch key and shape, and our location (collection + path), or a derived buffer."""
  key: str
  shape: Tuple[int, ...]
  collection: Optional[str]                 # 'params', 'vq_stats' or None (buffer derived from the config)
  path: Tuple[str, ...] = ()
  to_torch: Callable[[Array], Array] = lambda a: a
  from_torch: Callable[[Array], Array] = lambda a: a
  value: Optional[Callable[[], Array]] = None   # derived buffers
  dtype: Any = np.float32


# ----------------------------------------------------------------------------- table builders
def _conv(key: str, path: Tuple[str, ...], cin: int, cout: int, k: int) -> List[Entry]:
  return [
      Entry(f'{key}.weight', (cout, cin, k, k), 'params', path + ('kernel',),
            to_torch=lambda a: np.transpose(a, (3, 2, 0, 1)), from_torch=lambda a: np.transpose(a, (2, 3, 1, 0))),
      Entry(f'{key}.bias', (cout,), 'params', path + ('bias',)),
  ]


def _dense(key: str, path: Tuple[str, ...], din: int, dout: int, bias: bool = True) -> List[Entry]:
  out = [Entry(f'{key}.weight', (dout, din), 'params', path + ('kernel',), to_torch=np.transpose,
               from_torch=np.transpose)]
  if bias:
    out.append(Entry(f'{key}.bias', (dout,), 'params', path + ('bias',)))
  return out


def _gn(key: str, path: Tuple[str, ...], c: int) -> List[Entry]:
  return [Entry(f'{key}.weight', (c,), 'params', path + ('scale',)),
          Entry(f'{key}.bias', (c,), 'params', path + ('bias',))]


def _reshaped(key: str, torch_shape: Tuple[int, ...], path: Tuple[str, ...], our_shape: Tuple[int, ...]) -> Entry:
  return Entry(key, torch_shape, 'params', path, to_torch=lambda a: np.reshape(a, torch_shape),
               from_torch=lambda a: np.reshape(a, our_shape))


def _resblock(key, path, cin, cout) -> List[Entry]:
  e = _gn(f'{key}.norm1', path + ('norm1',), cin) + _conv(f'{key}.conv1', path + ('conv1',), cin, cout, 3)
  e += _gn(f'{key}.norm2', path + ('norm2',), cout) + _conv(f'{key}.conv2', path + ('conv2',), cout, cout, 3)
  if cin != cout:
    e += _conv(f'{key}.nin_shortcut', path + ('nin_shortcut',), cin, cout, 1)
  return e


def _attnblock(key, path, c) -> List[Entry]:
  return (_gn(f'{key}.norm', path + ('norm',), c) + _conv(f'{key}.qkv', path + ('qkv',), c, 3 * c, 1)
          + _conv(f'{key}.proj_out', path + ('proj_out',), c, c, 1))


def _mid(key, path, c, cfg: VQVAEConfig) -> List[Entry]:
  e = _resblock(f'{key}.block_1', path + ('block_1',), c, c)
  if cfg.using_mid_sa:
    e += _attnblock(f'{key}.attn_1', path + ('attn_1',), c)
  return e + _resblock(f'{key}.block_2', path + ('block_2',), c, c)


def vae_table(cfg: VQVAEConfig) -> List[Entry]:
  """Every tensor of the reference ``VQVAE.state_dict()``, in its order."""
  ch, mult, n = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
  e: List[Entry] = []
  # encoder
  p = ('encoder',)
  e += _conv('encoder.conv_in', p + ('conv_in',), cfg.in_channels, ch, 3)
  block_in = ch
  for i in range(n):
    block_out = ch * mult[i]
    for j in range(cfg.num_res_blocks):
      e += _resblock(f'encoder.down.{i}.block.{j}', p + (f'down_{i}', f'block_{j}'), block_in, block_out)
      block_in = block_out
    if i == n - 1 and cfg.using_sa:
      for j in range(cfg.num_res_blocks):
        e += _attnblock(f'encoder.down.{i}.attn.{j}', p + (f'down_{i}', f'attn_{j}'), block_in)
    if i != n - 1:
      e += _conv(f'encoder.down.{i}.downsample.conv', p + (f'down_{i}', 'downsample', 'conv'), block_in, block_in, 3)
  e += _mid('encoder.mid', p + ('mid',), block_in, cfg)
  e += _gn('encoder.norm_out', p + ('norm_out',), block_in)
  e += _conv('encoder.conv_out', p + ('conv_out',), block_in, cfg.z_channels, 3)
  # decoder (torch registers up[0..n-1] in index order although it builds them from the top)
  p = ('decoder',)
  top = ch * mult[-1]
  e += _conv('decoder.conv_in', p + ('conv_in',), cfg.z_channels, top, 3)
  e += _mid('decoder.mid', p + ('mid',), top, cfg)
  ins = {}
  block_in = top
  for i in reversed(range(n)):
    ins[i] = block_in
    block_in = ch * mult[i]
  for i in range(n):
    block_in, block_out = ins[i], ch * mult[i]
    for j in range(cfg.num_res_blocks + 1):
      e += _resblock(f'decoder.up.{i}.block.{j}', p + (f'up_{i}', f'block_{j}'), block_in, block_out)
      block_in = block_out
    if i == n - 1 and cfg.using_sa:
      for j in range(cfg.num_res_blocks + 1):
        e += _attnblock(f'decoder.up.{i}.attn.{j}', p + (f'up_{i}', f'attn_{j}'), block_out)
    if i != 0:
      e += _conv(f'decoder.up.{i}.upsample.conv', p + (f'up_{i}', 'upsample', 'conv'), block_out, block_out, 3)
  e += _gn('decoder.norm_out', p + ('norm_out',), ch * mult[0])
  e += _conv('decoder.conv_out', p + ('conv_out',), ch * mult[0], cfg.in_channels, 3)
  # quantizer: own buffer first, then quant_resi, then the codebook
  e.append(Entry('quantize.ema_vocab_hit_SV', (len(cfg.patch_nums), cfg.vocab_size), 'vq_stats',
                 ('quantize', 'ema_vocab_hit_SV')))
  for k in range(cfg.num_phis):
    if cfg.share_quant_resi == 0:
      tk = f'quantize.quant_resi.{k}'
    elif cfg.share_quant_resi == 1:
      tk = 'quantize.quant_resi.qresi'
    else:
      tk = f'quantize.quant_resi.qresi_ls.{k}'
    e += _conv(tk, ('quantize', f'phi_{k}', 'conv'), cfg.z_channels, cfg.z_channels, 3)
  e.append(Entry('quantize.embedding.weight', (cfg.vocab_size, cfg.z_channels), 'params', ('quantize', 'embedding')))
  e += _conv('quant_conv', ('quant_conv',), cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks)
  e += _conv('post_quant_conv', ('post_quant_conv',), cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks)
  return e


def var_table(cfg: VARConfig) -> List[Entry]:
  """Every tensor of the reference ``VAR.state_dict()``, in its order."""
  c, L, h = cfg.embed_dim, cfg.seq_len, cfg.num_heads
  lvl = level_ids(cfg.patch_nums)
  e: List[Entry] = [
      _reshaped('pos_start', (1, cfg.first_l, c), ('pos_start',), (cfg.first_l, c)),
      _reshaped('pos_1LC', (1, L, c), ('pos_1LC',), (L, c)),
      Entry('lvl_1L', (1, L), None, value=lambda: lvl[None].astype(np.int64), dtype=np.int64),
      Entry('attn_bias_for_masking', (1, 1, L, L), None,
            value=lambda: np.where(block_causal_mask(cfg.patch_nums), 0.0, -np.inf).astype(np.float32)[None, None]),
  ]
  e += _dense('word_embed', ('word_embed',), cfg.z_channels, c)
  e.append(Entry('class_emb.weight', (cfg.num_classes + 1, c), 'params', ('class_emb',)))
  e.append(Entry('lvl_embed.weight', (len(cfg.patch_nums), c), 'params', ('lvl_embed',)))
  if cfg.shared_aln:
    e += _dense('shared_ada_lin.1', ('shared_ada_lin',), c, 6 * c)
  for i in range(cfg.depth):
    k, p = f'blocks.{i}', (f'blocks_{i}',)
    if cfg.shared_aln:
      e.append(_reshaped(f'{k}.ada_gss', (1, 1, 6, c), p + ('ada_gss',), (6, c)))
    if cfg.attn_l2_norm:
      e.append(_reshaped(f'{k}.attn.scale_mul_1H11', (1, h, 1, 1), p + ('attn', 'scale_mul'), (h,)))
    e.append(Entry(f'{k}.attn.q_bias', (c,), 'params', p + ('attn', 'q_bias')))
    e.append(Entry(f'{k}.attn.v_bias', (c,), 'params', p + ('attn', 'v_bias')))
    e.append(Entry(f'{k}.attn.zero_k_bias', (c,), None, value=lambda: np.zeros((c,), np.float32)))
    e += _dense(f'{k}.attn.mat_qkv', p + ('attn', 'mat_qkv'), c, 3 * c, bias=False)
    e += _dense(f'{k}.attn.proj', p + ('attn', 'proj'), c, c)
    e += _dense(f'{k}.ffn.fc1', p + ('ffn', 'fc1'), c, cfg.mlp_dim)
    e += _dense(f'{k}.ffn.fc2', p + ('ffn', 'fc2'), cfg.mlp_dim, c)
    if not cfg.shared_aln:
      e += _dense(f'{k}.ada_lin.1', p + ('ada_lin',), c, 6 * c)
  e += _dense('head_nm.ada_lin.1', ('head_nm',), c, 2 * c)
  e += _dense('head', ('head',), c, cfg.vocab_size)
  return e


# ----------------------------------------------------------------------------- config inference
def _require(sd: Mapping[str, Any], key: str, what: str):
  if key not in sd:
    raise CheckpointMismatchError(f'cannot infer {what}: key {key!r} is missing from the state_dict')
  return sd[key]


def vae_config_from_state_dict(sd: Mapping[str, Any], patch_nums: Optional[Sequence[int]] = None,
                               **overrides) -> VQVAEConfig:
  """Infer the VQVAE hyperparameters from tensor shapes and key names.

  The number of scales comes from ``quantize.ema_vocab_hit_SV``; the patch sizes themselves are not stored:
  pass ``patch_nums`` (the VAR checkpoint knows them) or get the standard 256px list for 10 scales.
  """
  emb = _require(sd, 'quantize.embedding.weight', 'vocab_size / z_channels')
  vocab, cvae = emb.shape
  conv_in = _require(sd, 'encoder.conv_in.weight', 'ch')
  ch, in_ch = conv_in.shape[0], conv_in.shape[1]
  levels = sorted({int(m.group(1)) for k in sd for m in [re.match(r'encoder\.down\.(\d+)\.', k)] if m})
  if not levels:
    raise CheckpointMismatchError('cannot infer ch_mult: no encoder.down.* keys in the state_dict')
  ch_mult = tuple(int(sd[f'encoder.down.{i}.block.0.conv1.weight'].shape[0]) // ch for i in levels)
  nrb = len({int(m.group(1)) for k in sd for m in [re.match(r'encoder\.down\.0\.block\.(\d+)\.', k)] if m})
  using_sa = any(k.startswith(f'encoder.down.{levels[-1]}.attn.') for k in sd)
  using_mid_sa = 'encoder.mid.attn_1.qkv.weight' in sd
  qks = int(_require(sd, 'quant_conv.weight', 'quant_conv_ks').shape[-1])
  phi_keys = [k for k in sd if k.startswith('quantize.quant_resi.') and k.endswith('.weight')]
  quant_resi, default_qresi_counts = 0.5, 0
  if any('.qresi_ls.' in k for k in phi_keys):
    share = len(phi_keys)
  elif any(k == 'quantize.quant_resi.qresi.weight' for k in phi_keys):
    share = 1
  elif phi_keys:
    share, default_qresi_counts = 0, len(phi_keys)
  else:
    share, quant_resi = 4, 0.0        # no phi convs stored: the identity (quant_resi = 0)
  n_scales = int(_require(sd, 'quantize.ema_vocab_hit_SV', 'the number of scales').shape[0])
  if patch_nums is None:
    if n_scales != len(PATCH_NUMS_256):
      raise CheckpointMismatchError(f'the VQVAE has {n_scales} scales: pass patch_nums explicitly')
    patch_nums = PATCH_NUMS_256
  if share == 0 and default_qresi_counts == len(patch_nums):
    default_qresi_counts = 0
  kw = dict(vocab_size=int(vocab), z_channels=int(cvae), ch=int(ch), ch_mult=ch_mult, num_res_blocks=nrb,
            in_channels=int(in_ch), using_sa=using_sa, using_mid_sa=using_mid_sa, quant_conv_ks=qks,
            quant_resi=quant_resi, share_quant_resi=share, default_qresi_counts=default_qresi_counts,
            patch_nums=tuple(patch_nums))
  kw.update(overrides)
  return VQVAEConfig(**kw)


def var_config_from_state_dict(sd: Mapping[str, Any], patch_nums: Optional[Sequence[int]] = None,
                               num_heads: Optional[int] = None, **overrides) -> VARConfig:
  """Infer the VAR hyperparameters. patch_nums come from the ``lvl_1L`` buffer when present, else from the
  sequence length when it matches a standard list (256px or 512px), else must be given. num_heads comes from
  ``scale_mul_1H11`` when attn_l2_norm is on, else defaults to width // 64 (the reference's convention)."""
  we = _require(sd, 'word_embed.weight', 'embed_dim / z_channels')
  c, cvae = int(we.shape[0]), int(we.shape[1])
  depth = len({int(m.group(1)) for k in sd for m in [re.match(r'blocks\.(\d+)\.', k)] if m})
  if depth == 0:
    raise CheckpointMismatchError('cannot infer depth: no blocks.* keys in the state_dict')
  num_classes = int(_require(sd, 'class_emb.weight', 'num_classes').shape[0]) - 1
  vocab = int(_require(sd, 'head.weight', 'vocab_size').shape[0])
  shared_aln = 'blocks.0.ada_gss' in sd
  attn_l2_norm = 'blocks.0.attn.scale_mul_1H11' in sd
  mlp = int(_require(sd, 'blocks.0.ffn.fc1.weight', 'mlp_ratio').shape[0])
  L = int(_require(sd, 'pos_1LC', 'the sequence length').shape[1])
  if patch_nums is None:
    if 'lvl_1L' in sd:
      counts = np.bincount(np.asarray(sd['lvl_1L']).reshape(-1))
      patch_nums = tuple(int(round(np.sqrt(n))) for n in counts)
      if any(p * p != n for p, n in zip(patch_nums, counts)):
        raise CheckpointMismatchError(f'lvl_1L does not describe square token maps: counts {counts.tolist()}')
    else:
      patch_nums = infer_patch_nums(L)
      if patch_nums is None:
        raise CheckpointMismatchError(f'sequence length {L} matches no standard patch_nums: pass patch_nums')
  if sum(p * p for p in patch_nums) != L:
    raise CheckpointMismatchError(f'patch_nums {tuple(patch_nums)} give {sum(p * p for p in patch_nums)} tokens '
                                  f'but pos_1LC has {L}')
  if num_heads is None:
    num_heads = int(sd['blocks.0.attn.scale_mul_1H11'].shape[1]) if attn_l2_norm else max(c // 64, 1)
  kw = dict(vocab_size=vocab, z_channels=cvae, num_classes=num_classes, depth=depth, embed_dim=c,
            num_heads=int(num_heads), mlp_ratio=mlp / c, shared_aln=shared_aln, attn_l2_norm=attn_l2_norm,
            patch_nums=tuple(int(p) for p in patch_nums), drop_path_rate=0.1 * depth / 24)
  kw.update(overrides)
  return VARConfig(**kw)


# ----------------------------------------------------------------------------- import / export
def _check_keys(sd: Mapping[str, Any], table: List[Entry], what: str):
  expected = {e.key: e for e in table}
  missing = [k for k in expected if k not in sd]
  unexpected = [k for k in sd if k not in expected]
  problems = []
  for k in missing:
    problems.append(f'missing key {k!r} (expected shape {expected[k].shape})')
  for k in unexpected:
    problems.append(f'unexpected key {k!r} (found shape {tuple(np.shape(sd[k]))})')
  for k, e in expected.items():
    if k in sd and tuple(np.shape(sd[k])) != e.shape:
      if k == 'quantize.ema_vocab_hit_SV' and np.shape(sd[k])[1:] == e.shape[1:]:
        continue  # the reference resets a buffer of another scale count too (VQVAE.load_state_dict)
      problems.append(f'key {k!r}: expected shape {e.shape}, found {tuple(np.shape(sd[k]))}')
  if problems:
    raise CheckpointMismatchError(f'{what} state_dict does not match the config:\n  ' + '\n  '.join(problems))


def import_state_dict(sd: Mapping[str, Any], table: List[Entry], what: str = 'checkpoint') -> Dict[str, Any]:
  """Reference state_dict -> our variables ({'params': ..., maybe 'vq_stats': ...}) of numpy arrays."""
  _check_keys(sd, table, what)
  flat: Dict[str, Dict[Tuple[str, ...], Array]] = collections.defaultdict(dict)
  for e in table:
    a = np.asarray(sd[e.key])
    if e.collection is None:                # derived buffer: must agree with the config
      want = e.value()
      same = np.array_equal(a.astype(want.dtype), want) if a.shape == want.shape else False
      if not same:
        raise CheckpointMismatchError(f'{what}: buffer {e.key!r} disagrees with the inferred config '
                                      f'(patch_nums / a zero bias); the checkpoint does not fit this model')
      continue
    if e.key == 'quantize.ema_vocab_hit_SV' and a.shape != e.shape:
      logging.warning('%s: %s has %d scales, the model %d; it is reset to zeros', what, e.key, a.shape[0],
                      e.shape[0])
      a = np.zeros(e.shape, np.float32)
    flat[e.collection][e.path] = e.from_torch(np.asarray(a, np.float32))   # views; no copy of big tensors
  return {col: traverse_util.unflatten_dict(d) for col, d in flat.items()}


def export_state_dict(variables: Mapping[str, Any], table: List[Entry], what: str = 'model'
                      ) -> 'collections.OrderedDict[str, Array]':
  """Our variables -> reference state_dict (numpy), every key, shape and buffer of the reference, in its order."""
  flat = {col: traverse_util.flatten_dict(_unbox(v)) for col, v in variables.items()}
  out = collections.OrderedDict()
  for e in table:
    if e.collection is None:
      a = e.value()
    elif e.collection not in flat or e.path not in flat[e.collection]:
      if e.collection == 'vq_stats':       # never collected: the reference starts from zeros too
        a = np.zeros(e.shape, np.float32)
      else:
        raise CheckpointMismatchError(f'{what}: no parameter at {"/".join(e.path)} for {e.key!r}')
    else:
      a = e.to_torch(np.asarray(flat[e.collection][e.path], dtype=np.float32))
    if tuple(a.shape) != e.shape:
      raise CheckpointMismatchError(f'{what}: {e.key!r} would have shape {tuple(a.shape)}, expected {e.shape}')
    out[e.key] = np.asarray(a, e.dtype)   # made contiguous when written (save_state_dict)
  return out


def _unbox(tree):
  from flax.core import meta
  return meta.unbox(tree)


# ----------------------------------------------------------------------------- files
def load_state_dict(path: str) -> StateDict:
  """Read a reference ``.pth`` (torch, ``weights_only=True``) or ``.safetensors`` into numpy arrays."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'checkpoint file not found: {path}')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f'reading {path} needs torch: pip install "var_jax[torch]" (or use .safetensors)') from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:
    raise ValueError(f'{path}: not a loadable weights-only torch checkpoint ({type(e).__name__}: {e})') from e
  if isinstance(obj, Mapping) and not all(hasattr(v, 'shape') for v in obj.values()):
    # trainer checkpoints of the reference wrap the state dicts: {'trainer': {'var_wo_ddp': ..., 'vae_local': ...}}
    raise ValueError(f'{path}: expected a flat state_dict of tensors; found top-level keys {sorted(obj)[:10]} '
                     f'(extract the model state_dict first)')
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path}: expected a state_dict (mapping of tensors), found {type(obj).__name__}')
  return {k: v.detach().cpu().numpy() for k, v in obj.items()}


def save_state_dict(sd: Mapping[str, Array], path: str):
  """Write a state_dict as ``.pth`` (torch.save of CPU tensors) or ``.safetensors``."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith('.safetensors'):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path)
    return
  try:
    import torch
  except ImportError as e:  # pragma: no cover
    raise ImportError(f'writing {path} needs torch: pip install "var_jax[torch]" (or use .safetensors)') from e
  tmp = path + '.tmp'
  torch.save(collections.OrderedDict((k, torch.from_numpy(np.require(v, requirements=['C', 'W']))) for k, v in sd.items()),
             tmp)
  os.replace(tmp, path)   # never leave a half-written checkpoint behind


# ----------------------------------------------------------------------------- convenience
def import_vae(sd: Mapping[str, Any], cfg: VQVAEConfig) -> Dict[str, Any]:
  return import_state_dict(sd, vae_table(cfg), 'VQVAE')


def import_var(sd: Mapping[str, Any], cfg: VARConfig) -> Dict[str, Any]:
  return import_state_dict(sd, var_table(cfg), 'VAR')


def export_vae(variables, cfg: VQVAEConfig):
  return export_state_dict(variables, vae_table(cfg), 'VQVAE')


def export_var(variables, cfg: VARConfig):
  return export_state_dict(variables, var_table(cfg), 'VAR')
