"""Move weights between our ``BinaryAutoEncoder`` and the ELM/BiGR reference BAE checkpoints.

The reference module (``bae/binaryae.py`` of Pepper-lll/LMforImageGeneration and haoosz/BiGR) keeps its layers in
flat ``nn.ModuleList``s, so its keys are positional: ``encoder.blocks.{n}.*``, ``generator.blocks.{n}.*``, then
``quantize.proj.0.*`` / ``quantize.embed.weight`` and the unused ``generator.logsigma.{0,2}.*``. ``bae_table`` walks
the config in the reference's construction order and lists every tensor with its torch key, torch shape and our
location; import and export both walk that table (``var_jax.interop.state_dict``).

Released files (``binaryae*.th``) prefix every key with ``ae.`` (the reference ``load_pretrain`` keeps the keys
starting with ``ae`` and strips the prefix); EMA releases also carry ``disc.*`` (the BinaryGAN discriminator) and
``perceptual.*`` (LPIPS). Those are split off and returned, never loaded into the BAE.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import re
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from var_jax.interop.state_dict import (CheckpointMismatchError, Entry, conv_entries, export_state_dict,
                                        import_state_dict, indices, load_state_dict, norm_entries, param_entry,
                                        save_state_dict)
from var_jax.interop.var import resblock_entries
from var_jax.models.bae import UNUSED, BAEConfig

Array = np.ndarray
AE_PREFIX = 'ae.'
EXTRA_PREFIXES = ('disc.', 'perceptual.')


# ----------------------------------------------------------------------------- table
def _unused(entries: List[Entry]) -> List[Entry]:
  return [dataclasses.replace(e, collection=UNUSED) for e in entries]


def _res(key: str, path: Tuple[str, ...], cin: int, cout: int) -> List[Entry]:
  e, shortcut = resblock_entries(key, path, cin, cout, shortcut='conv_out')
  return e + (shortcut if cin != cout else _unused(shortcut))   # present in the state_dict either way


def _attn(key: str, path: Tuple[str, ...], c: int) -> List[Entry]:
  e = norm_entries(f'{key}.norm', path + ('norm',), c)
  for n in ('q', 'k', 'v', 'proj_out'):
    e += conv_entries(f'{key}.{n}', path + (n,), c, c, 1)
  return e


class _Blocks:
  """Hands out the positional ``{prefix}.blocks.{n}`` keys in construction order."""

  def __init__(self, prefix: str):
    self.prefix, self.n = prefix, 0

  def next(self) -> str:
    key = f'{self.prefix}.blocks.{self.n}'
    self.n += 1
    return key


def _level(e: List[Entry], blk: _Blocks, path: Tuple[str, ...], num_blocks: int, block_in: int, block_out: int,
           attn: bool, resample: str) -> int:
  """Append one level (res [attn] ... [resample conv]) to ``e``; -> its output width."""
  for j in range(num_blocks):
    e += _res(blk.next(), path + (f'block_{j}',), block_in, block_out)
    block_in = block_out
    if attn:
      e += _attn(blk.next(), path + (f'attn_{j}',), block_in)
  if resample:
    e += conv_entries(f'{blk.next()}.conv', path + (resample, 'conv'), block_in, block_in, 3)
  return block_in


def _mid(e: List[Entry], blk: _Blocks, path: Tuple[str, ...], c: int):
  """Append the middle (res attn res) to ``e``."""
  e += _res(blk.next(), path + ('mid', 'block_1'), c, c)
  e += _attn(blk.next(), path + ('mid', 'attn_1'), c)
  e += _res(blk.next(), path + ('mid', 'block_2'), c, c)


def bae_table(cfg: BAEConfig) -> List[Entry]:
  """Every tensor of the reference ``BinaryAutoEncoder.state_dict()`` (no prefix), in its order."""
  n, nf, mult = cfg.num_levels, cfg.nf, cfg.ch_mult
  e: List[Entry] = []
  # encoder: conv_in, levels (res [attn] ... [downsample]), mid (res attn res), norm, conv
  p, blk = ('encoder',), _Blocks('encoder')
  e += conv_entries(blk.next(), p + ('conv_in',), cfg.in_channels, nf, 3)
  block_in, attn = nf, cfg.encoder_attn_levels
  for i in range(n):
    block_in = _level(e, blk, p + (f'down_{i}',), cfg.res_blocks, block_in, nf * mult[i], attn[i],
                      'downsample' if i != n - 1 else '')
  _mid(e, blk, p, block_in)
  e += norm_entries(blk.next(), p + ('norm_out',), block_in)
  e += conv_entries(blk.next(), p + ('conv_out',), block_in, cfg.emb_dim, 3)
  # quantizer
  e += conv_entries('quantize.proj.0', ('quantize', 'proj'), cfg.emb_dim, cfg.codebook_size, 1)
  e.append(param_entry('quantize.embed.weight', (cfg.codebook_size, cfg.emb_dim), ('quantize', 'embed')))
  # generator: [norm], conv_in, mid, levels from the lowest (res [attn] ... [upsample]), norm, conv, logsigma
  p, blk = ('generator',), _Blocks('generator')
  block_in, attn = nf * mult[-1], cfg.generator_attn_levels
  if cfg.norm_first:
    e += norm_entries(blk.next(), p + ('norm_in',), cfg.emb_dim)
  e += conv_entries(blk.next(), p + ('conv_in',), cfg.emb_dim, block_in, 3)
  _mid(e, blk, p, block_in)
  for i in reversed(range(n)):
    block_in = _level(e, blk, p + (f'up_{i}',), cfg.decoder_res_blocks, block_in, nf * mult[i], attn[i],
                      'upsample' if i != 0 else '')
  e += norm_entries(blk.next(), p + ('norm_out',), block_in)
  e += conv_entries(blk.next(), p + ('conv_out',), block_in, cfg.in_channels, 3)
  e += _unused(conv_entries('generator.logsigma.0', p + ('logsigma_0',), block_in, block_in, 3))
  e += _unused(conv_entries('generator.logsigma.2', p + ('logsigma_2',), block_in, cfg.in_channels, 1))
  return e


def bae_param_count(cfg: BAEConfig) -> int:
  """Number of reference parameters (``model.parameters()``; the BAE has no buffers), unused ones included."""
  return sum(int(np.prod(e.shape)) for e in bae_table(cfg))


# ----------------------------------------------------------------------------- prefixes
def split_bae_state_dict(sd: Mapping[str, Any], what: str = 'BAE checkpoint'
                         ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(the BAE's own state_dict without ``ae.``, {``disc.*``/``perceptual.*`` tensors}).

  With ``ae.`` keys present (a released / BinaryGAN file) every other key must be ``disc.*`` or ``perceptual.*``;
  without them the mapping is taken as a plain ``BinaryAutoEncoder.state_dict()``.
  """
  extras = {k: v for k, v in sd.items() if k.startswith(EXTRA_PREFIXES)}
  rest = {k: v for k, v in sd.items() if not k.startswith(EXTRA_PREFIXES)}
  if any(k.startswith(AE_PREFIX) for k in rest):
    unknown = [k for k in rest if not k.startswith(AE_PREFIX)]
    if unknown:
      raise CheckpointMismatchError(
          f'{what}: keys outside the ae./disc./perceptual. prefixes: '
          + ', '.join(f'{k!r} (shape {tuple(np.shape(rest[k]))})' for k in unknown[:10])
          + (f' and {len(unknown) - 10} more' if len(unknown) > 10 else ''))
    rest = {k[len(AE_PREFIX):]: v for k, v in rest.items()}
  if extras:
    counts = collections.Counter(k.split('.', 1)[0] for k in extras)
    logging.info('%s: set aside %s (not part of the BAE)', what,
                 ', '.join(f'{n} {p}.* tensors' for p, n in sorted(counts.items())))
  return rest, extras


# ----------------------------------------------------------------------------- config inference
def _kinds(sd: Mapping[str, Any], prefix: str) -> List[str]:
  """Classify ``{prefix}.blocks.{n}`` as res / attn / resample / norm / conv, in index order."""
  idx = indices(sd, rf'{re.escape(prefix)}\.blocks\.(\d+)\.')
  if not idx:
    raise CheckpointMismatchError(f'cannot infer the BAE config: no {prefix}.blocks.* keys in the state_dict')
  if idx != list(range(len(idx))):
    raise CheckpointMismatchError(f'{prefix}.blocks indices are not contiguous: {idx}')
  out = []
  for i in idx:
    b = f'{prefix}.blocks.{i}'
    if f'{b}.norm1.weight' in sd:
      out.append('res')
    elif f'{b}.q.weight' in sd:
      out.append('attn')
    elif f'{b}.conv.weight' in sd:
      out.append('resample')
    elif f'{b}.weight' in sd and len(np.shape(sd[f'{b}.weight'])) == 1:
      out.append('norm')
    elif f'{b}.weight' in sd and len(np.shape(sd[f'{b}.weight'])) == 4:
      out.append('conv')
    else:
      raise CheckpointMismatchError(f'cannot tell what {b} is (keys: {sorted(k for k in sd if k.startswith(b + "."))})')
  return out


def _levels(kinds: List[str], what: str) -> List[List[str]]:
  segs: List[List[str]] = [[]]
  for k in kinds:
    if k == 'resample':
      segs.append([])
    elif k in ('res', 'attn'):
      segs[-1].append(k)
    else:
      raise CheckpointMismatchError(f'{what}: unexpected {k} block inside the levels')
  return segs


def bae_config_from_state_dict(sd: Mapping[str, Any], resolution: int = 256, **overrides) -> BAEConfig:
  """Infer the BAE hyperparameters from key names and tensor shapes (``ae.``-prefixed or plain).

  K and emb_dim come from ``quantize.embed.weight``; nf and in_channels from the first conv; the number of levels,
  res blocks per level, ch_mult and which levels have attention from the encoder's block sequence; norm_first and
  gen_mul from the generator's. ``resolution`` (the reference's ``img_size``) is not stored: it only names the
  attention levels (``attn_resolutions = {resolution // 2**i : level i has attention}``), so the network is the
  same whatever value is given. The 512px release (BiGR d32-512) has no per-level attention (its lowest level is
  32x32 and ``attn_resolutions = [16]``): it infers ``attn_resolutions=()``.
  """
  sd, _ = split_bae_state_dict(sd)
  if 'quantize.embed.weight' not in sd or 'encoder.blocks.0.weight' not in sd:
    raise CheckpointMismatchError('cannot infer the BAE config: quantize.embed.weight or encoder.blocks.0.weight '
                                  'is missing from the state_dict')
  k_bits, emb_dim = (int(s) for s in np.shape(sd['quantize.embed.weight']))
  nf, in_ch = (int(s) for s in np.shape(sd['encoder.blocks.0.weight'])[:2])
  # encoder: conv | levels | res attn res | norm conv
  ek = _kinds(sd, 'encoder')
  if ek[0] != 'conv' or ek[-5:] != ['res', 'attn', 'res', 'norm', 'conv']:
    raise CheckpointMismatchError(f'encoder block sequence {ek} is not a BAE encoder')
  enc = _levels(ek[1:-5], 'encoder')
  res_blocks = enc[0].count('res')
  if res_blocks == 0 or any(s.count('res') != res_blocks for s in enc):
    raise CheckpointMismatchError(f'encoder levels have {[s.count("res") for s in enc]} res blocks: expected the '
                                  f'same non-zero number on every level')
  ch_mult, b = [], 1
  for seg in enc:
    cout = int(np.shape(sd[f'encoder.blocks.{b}.conv1.weight'])[0])
    if cout % nf:
      raise CheckpointMismatchError(f'encoder.blocks.{b}.conv1.weight: {cout} channels is not a multiple of nf={nf}')
    ch_mult.append(cout // nf)
    b += len(seg) + 1
  n = len(enc)
  if resolution < 2 ** (n - 1):
    raise CheckpointMismatchError(f'resolution {resolution} is smaller than the downsampling factor {2 ** (n - 1)}')
  attn_res = tuple(resolution // 2 ** i for i, s in enumerate(enc) if 'attn' in s)
  # generator: [norm] conv | res attn res | levels | norm conv
  gk = _kinds(sd, 'generator')
  norm_first = gk[0] == 'norm'
  head = gk[1:] if norm_first else gk
  if head[:4] != ['conv', 'res', 'attn', 'res'] or head[-2:] != ['norm', 'conv']:
    raise CheckpointMismatchError(f'generator block sequence {gk} is not a BAE generator')
  gen = _levels(head[4:-2], 'generator')
  dec_blocks = gen[0].count('res')
  gen_mul = dec_blocks / res_blocks
  while int(res_blocks * gen_mul) < dec_blocks:      # float rounding: make int(res_blocks * gen_mul) exact
    gen_mul = math.nextafter(gen_mul, math.inf)
  kw = dict(in_channels=in_ch, nf=nf, ch_mult=tuple(ch_mult), res_blocks=res_blocks, attn_resolutions=attn_res,
            resolution=int(resolution), codebook_size=k_bits, emb_dim=emb_dim, norm_first=norm_first,
            gen_mul=float(gen_mul))
  kw.update(overrides)
  return BAEConfig(**kw)


# ----------------------------------------------------------------------------- import / export
def import_bae(sd: Mapping[str, Any], cfg: BAEConfig, allow_cast: bool = False) -> Dict[str, Any]:
  """Reference state_dict (plain or ``ae.``-prefixed) -> ``{'params': ..., 'unused': ...}`` of numpy arrays.

  Every key and shape must match ``cfg`` (a ``CheckpointMismatchError`` names each offending key); ``disc.*`` and
  ``perceptual.*`` tensors are ignored (use ``split_bae_state_dict`` or ``load_bae`` to get them).
  """
  own, _ = split_bae_state_dict(sd)
  return import_state_dict(own, bae_table(cfg), 'BAE', allow_cast=allow_cast)


def export_bae(variables: Mapping[str, Any], cfg: BAEConfig, prefix: str = ''
               ) -> 'collections.OrderedDict[str, Array]':
  """Our variables -> the reference state_dict (numpy float32, its key order), keys prefixed by ``prefix``
  (``'ae.'`` for the released file layout, which ``load_pretrain`` reads).

  Without an ``'unused'`` collection (e.g. params from training only) the never-read tensors are written as zeros.
  """
  table = bae_table(cfg)
  zeros_for = ()
  if UNUSED not in variables:
    logging.info('export_bae: no %r collection; writing zeros for the %d tensors the reference never reads',
                 UNUSED, sum(e.collection == UNUSED for e in table))
    zeros_for = (UNUSED,)
  out = export_state_dict(variables, table, 'BAE', zeros_for=zeros_for)
  if prefix:
    out = collections.OrderedDict((prefix + k, v) for k, v in out.items())
  return out


# ----------------------------------------------------------------------------- files
def load_bae(path: str, resolution: int = 256, **overrides
             ) -> Tuple[BAEConfig, Dict[str, Any], Dict[str, Array]]:
  """Read a reference BAE file (``.th``/``.pth``/``.safetensors``; ``ae.``-prefixed or plain).

  Returns (config inferred from the keys, variables for ``BinaryAutoEncoder(config)``, the ``disc.*`` /
  ``perceptual.*`` tensors found beside the BAE, keys unchanged). ``resolution``: see
  ``bae_config_from_state_dict``.
  """
  sd = load_state_dict(path, what='BAE checkpoint')
  own, extras = split_bae_state_dict(sd, what=str(path))
  cfg = bae_config_from_state_dict(own, resolution=resolution, **overrides)
  return cfg, import_state_dict(own, bae_table(cfg), f'BAE {path}'), extras


def save_bae(variables: Mapping[str, Any], cfg: BAEConfig, path: str, prefix: str = AE_PREFIX):
  """Write the reference layout (``ae.``-prefixed by default, like the released ``binaryae*.th``)."""
  save_state_dict(export_bae(variables, cfg, prefix), path)
