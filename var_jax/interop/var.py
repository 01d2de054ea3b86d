"""Move VQVAE and VAR weights between our Flax variables and the reference checkpoints (FoundationVision/VAR).

``vae_table`` and ``var_table`` list, in the reference's ``state_dict`` order, every tensor the reference module holds
(parameters and buffers) with its torch shape and where it lives in our variables; ``var_jax.interop.state_dict``
walks them (import, export, files).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from var_jax.interop.state_dict import (CheckpointMismatchError, Entry, conv_entries, count_indices, dense_entries,
                                        export_state_dict, import_state_dict, indices, norm_entries, param_entry,
                                        require, require_integer, reshaped_entry, vote)
from var_jax.models.var import block_causal_mask, level_ids
from var_jax.models.var_config import PATCH_NUMS_256, VARConfig, VQVAEConfig, infer_patch_nums


# ----------------------------------------------------------------------------- tables
def resblock_entries(key: str, path: Tuple[str, ...], cin: int, cout: int, shortcut: str = 'nin_shortcut'
                     ) -> Tuple[List[Entry], List[Entry]]:
  """A taming res block (GN-conv-GN-conv): (its entries without the 1x1 shortcut conv, the shortcut's entries)."""
  e = norm_entries(f'{key}.norm1', path + ('norm1',), cin)
  e += conv_entries(f'{key}.conv1', path + ('conv1',), cin, cout, 3)
  e += norm_entries(f'{key}.norm2', path + ('norm2',), cout)
  e += conv_entries(f'{key}.conv2', path + ('conv2',), cout, cout, 3)
  return e, conv_entries(f'{key}.{shortcut}', path + (shortcut,), cin, cout, 1)


def _resblock(key, path, cin, cout) -> List[Entry]:
  e, shortcut = resblock_entries(key, path, cin, cout)
  return e + shortcut if cin != cout else e


def _attnblock(key, path, c) -> List[Entry]:
  return (norm_entries(f'{key}.norm', path + ('norm',), c) + conv_entries(f'{key}.qkv', path + ('qkv',), c, 3 * c, 1)
          + conv_entries(f'{key}.proj_out', path + ('proj_out',), c, c, 1))


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
  e += conv_entries('encoder.conv_in', p + ('conv_in',), cfg.in_channels, ch, 3)
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
      e += conv_entries(f'encoder.down.{i}.downsample.conv', p + (f'down_{i}', 'downsample', 'conv'), block_in,
                        block_in, 3)
  e += _mid('encoder.mid', p + ('mid',), block_in, cfg)
  e += norm_entries('encoder.norm_out', p + ('norm_out',), block_in)
  e += conv_entries('encoder.conv_out', p + ('conv_out',), block_in, cfg.z_channels, 3)
  # decoder (torch registers up[0..n-1] in index order although it builds them from the top)
  p = ('decoder',)
  top = ch * mult[-1]
  e += conv_entries('decoder.conv_in', p + ('conv_in',), cfg.z_channels, top, 3)
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
      e += conv_entries(f'decoder.up.{i}.upsample.conv', p + (f'up_{i}', 'upsample', 'conv'), block_out, block_out, 3)
  e += norm_entries('decoder.norm_out', p + ('norm_out',), ch * mult[0])
  e += conv_entries('decoder.conv_out', p + ('conv_out',), ch * mult[0], cfg.in_channels, 3)
  # quantizer: own buffer first, then quant_resi, then the codebook
  # the reference resets a buffer of another scale count (VQVAE.load_state_dict): resettable
  e.append(Entry('quantize.ema_vocab_hit_SV', (len(cfg.patch_nums), cfg.vocab_size), 'vq_stats',
                 ('quantize', 'ema_vocab_hit_SV'), resettable=True))
  for k in range(cfg.num_phis):
    if cfg.share_quant_resi == 0:
      tk = f'quantize.quant_resi.{k}'
    elif cfg.share_quant_resi == 1:
      tk = 'quantize.quant_resi.qresi'
    else:
      tk = f'quantize.quant_resi.qresi_ls.{k}'
    e += conv_entries(tk, ('quantize', f'phi_{k}', 'conv'), cfg.z_channels, cfg.z_channels, 3)
  e.append(param_entry('quantize.embedding.weight', (cfg.vocab_size, cfg.z_channels), ('quantize', 'embedding')))
  e += conv_entries('quant_conv', ('quant_conv',), cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks)
  e += conv_entries('post_quant_conv', ('post_quant_conv',), cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks)
  return e


def var_table(cfg: VARConfig) -> List[Entry]:
  """Every tensor of the reference ``VAR.state_dict()``, in its order."""
  c, L, h = cfg.embed_dim, cfg.seq_len, cfg.num_heads
  lvl = level_ids(cfg.patch_nums)
  e: List[Entry] = [
      reshaped_entry('pos_start', (1, cfg.first_l, c), ('pos_start',), (cfg.first_l, c)),
      reshaped_entry('pos_1LC', (1, L, c), ('pos_1LC',), (L, c)),
      Entry('lvl_1L', (1, L), None, value=lambda: lvl[None].astype(np.int64), dtype=np.int64),
      Entry('attn_bias_for_masking', (1, 1, L, L), None,
            value=lambda: np.where(block_causal_mask(cfg.patch_nums), 0.0, -np.inf).astype(np.float32)[None, None]),
  ]
  e += dense_entries('word_embed', ('word_embed',), cfg.z_channels, c)
  e.append(param_entry('class_emb.weight', (cfg.num_classes + 1, c), ('class_emb',)))
  e.append(param_entry('lvl_embed.weight', (len(cfg.patch_nums), c), ('lvl_embed',)))
  if cfg.shared_aln:
    e += dense_entries('shared_ada_lin.1', ('shared_ada_lin',), c, 6 * c)
  for i in range(cfg.depth):
    k, p = f'blocks.{i}', (f'blocks_{i}',)
    if cfg.shared_aln:
      e.append(reshaped_entry(f'{k}.ada_gss', (1, 1, 6, c), p + ('ada_gss',), (6, c)))
    if cfg.attn_l2_norm:
      e.append(reshaped_entry(f'{k}.attn.scale_mul_1H11', (1, h, 1, 1), p + ('attn', 'scale_mul'), (h,)))
    e.append(param_entry(f'{k}.attn.q_bias', (c,), p + ('attn', 'q_bias')))
    e.append(param_entry(f'{k}.attn.v_bias', (c,), p + ('attn', 'v_bias')))
    e.append(Entry(f'{k}.attn.zero_k_bias', (c,), None, value=lambda: np.zeros((c,), np.float32)))
    e += dense_entries(f'{k}.attn.mat_qkv', p + ('attn', 'mat_qkv'), c, 3 * c, bias=False)
    e += dense_entries(f'{k}.attn.proj', p + ('attn', 'proj'), c, c)
    e += dense_entries(f'{k}.ffn.fc1', p + ('ffn', 'fc1'), c, cfg.mlp_dim)
    e += dense_entries(f'{k}.ffn.fc2', p + ('ffn', 'fc2'), cfg.mlp_dim, c)
    if not cfg.shared_aln:
      e += dense_entries(f'{k}.ada_lin.1', p + ('ada_lin',), c, 6 * c)
  e += dense_entries('head_nm.ada_lin.1', ('head_nm',), c, 2 * c)
  e += dense_entries('head', ('head',), c, cfg.vocab_size)
  return e


# ----------------------------------------------------------------------------- config inference
def vae_config_from_state_dict(sd: Mapping[str, Any], patch_nums: Optional[Sequence[int]] = None,
                               **overrides) -> VQVAEConfig:
  """Infer the VQVAE hyperparameters from tensor shapes and key names.

  The number of scales comes from ``quantize.ema_vocab_hit_SV``; the patch sizes themselves are not stored:
  pass ``patch_nums`` (the VAR checkpoint knows them) or get the standard 256px list for 10 scales.
  """
  emb = require(sd, 'quantize.embedding.weight', 'vocab_size / z_channels')
  vocab, cvae = emb.shape
  conv_in = require(sd, 'encoder.conv_in.weight', 'ch')
  ch, in_ch = conv_in.shape[0], conv_in.shape[1]
  levels = indices(sd, r'encoder\.down\.(\d+)\.')
  if not levels:
    raise CheckpointMismatchError('cannot infer ch_mult: no encoder.down.* keys in the state_dict')
  ch_mult = tuple(int(sd[f'encoder.down.{i}.block.0.conv1.weight'].shape[0]) // ch for i in levels)
  nrb = count_indices(sd, r'encoder\.down\.0\.block\.(\d+)\.')
  using_sa = any(k.startswith(f'encoder.down.{levels[-1]}.attn.') for k in sd)
  using_mid_sa = 'encoder.mid.attn_1.qkv.weight' in sd
  qks = int(require(sd, 'quant_conv.weight', 'quant_conv_ks').shape[-1])
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
  n_scales = int(require(sd, 'quantize.ema_vocab_hit_SV', 'the number of scales').shape[0])
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
  we = require(sd, 'word_embed.weight', 'embed_dim / z_channels')
  cvae = int(we.shape[1])
  depth = count_indices(sd, r'blocks\.(\d+)\.')
  if depth == 0:
    raise CheckpointMismatchError('cannot infer depth: no blocks.* keys in the state_dict')
  # sizes every block carries are voted on over all their tensors: a single wrong-shape tensor is then the one the
  # mismatch check names, instead of blaming the intact keys that disagree with it
  blk = [f'blocks.{i}.' for i in range(depth)]
  c = vote(sd, 'embed_dim', [('word_embed.weight', 0), ('word_embed.bias', 0), ('class_emb.weight', 1),
                             ('pos_1LC', 2), ('pos_start', 2), ('head.weight', 1)]
           + [(b + k, a) for b in blk for k, a in (('attn.proj.weight', 0), ('attn.proj.weight', 1),
                                                    ('attn.proj.bias', 0), ('attn.mat_qkv.weight', 1),
                                                    ('ffn.fc1.weight', 1), ('ffn.fc2.weight', 0),
                                                    ('ffn.fc2.bias', 0))])
  num_classes = int(require(sd, 'class_emb.weight', 'num_classes').shape[0]) - 1
  vocab = vote(sd, 'vocab_size', [('head.weight', 0), ('head.bias', 0)])
  shared_aln = 'blocks.0.ada_gss' in sd
  attn_l2_norm = 'blocks.0.attn.scale_mul_1H11' in sd
  mlp = vote(sd, 'mlp_ratio', [(b + k, a) for b in blk for k, a in (('ffn.fc1.weight', 0), ('ffn.fc1.bias', 0),
                                                                     ('ffn.fc2.weight', 1))])
  L = int(require(sd, 'pos_1LC', 'the sequence length').shape[1])
  if patch_nums is None:
    if 'lvl_1L' in sd:
      counts = np.bincount(require_integer(sd, 'lvl_1L', 'VAR').reshape(-1))
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
    num_heads = (vote(sd, 'num_heads', [(b + 'attn.scale_mul_1H11', 1) for b in blk]) if attn_l2_norm
                 else max(c // 64, 1))
  kw = dict(vocab_size=vocab, z_channels=cvae, num_classes=num_classes, depth=depth, embed_dim=c,
            num_heads=int(num_heads), mlp_ratio=mlp / c, shared_aln=shared_aln, attn_l2_norm=attn_l2_norm,
            patch_nums=tuple(int(p) for p in patch_nums), drop_path_rate=0.1 * depth / 24)
  kw.update(overrides)
  return VARConfig(**kw)


# ----------------------------------------------------------------------------- convenience
def import_vae(sd: Mapping[str, Any], cfg: VQVAEConfig, allow_cast: bool = False) -> Dict[str, Any]:
  return import_state_dict(sd, vae_table(cfg), 'VQVAE', allow_cast=allow_cast)


def import_var(sd: Mapping[str, Any], cfg: VARConfig, allow_cast: bool = False) -> Dict[str, Any]:
  return import_state_dict(sd, var_table(cfg), 'VAR', allow_cast=allow_cast)


def export_vae(variables, cfg: VQVAEConfig):
  """VQVAE variables -> reference state_dict; code-hit statistics never collected are written as zeros."""
  return export_state_dict(variables, vae_table(cfg), 'VQVAE', zeros_for=('vq_stats',))


def export_var(variables, cfg: VARConfig):
  return export_state_dict(variables, var_table(cfg), 'VAR')
