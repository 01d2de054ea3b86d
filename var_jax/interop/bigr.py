"""Move weights between our Flax BiGR params and the reference checkpoints (haoosz/BiGR ``llama/gpt.py`` layout).

The mapping is data: ``bigr_table`` lists, in the reference ``Transformer.state_dict()`` order, every tensor with its
torch shape and where it lives in our params. Two kinds of entries are special:

* ``diffusion_processor._denoise_fn.*``: the transcoder is registered twice in the reference (as ``denoise_mlp`` and
  inside ``diffusion_processor``), so its tensors appear under two keys (one storage). Import checks that both keys
  hold the same values; export writes the same array under both keys (and ``save_bigr`` the same tensor, so
  ``torch.save`` stores it once, as the reference's files do).
* ``diffusion_processor.scheduler.{k_final,b_final,beta,cumbeta}``: buffers derived from ``n_sample_steps``; import
  checks them against our schedule, export writes ours (bit-identical to the reference's).

Released files are ``{"ema": state_dict}`` (what ``llama/load_bigr.py`` reads); a plain state_dict is accepted too.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
from flax import traverse_util

from var_jax.interop.reference import CheckpointMismatchError, Entry, _dense, _reshaped, _unbox
from var_jax.models import bernoulli_diffusion as bd
from var_jax.models.bigr import BiGRConfig, ffn_hidden_dim

Array = np.ndarray
ALIAS_PREFIX = 'diffusion_processor._denoise_fn.'
PRIMARY_PREFIX = 'denoise_mlp.'
SCHED_PREFIX = 'diffusion_processor.scheduler.'
SCHED_NAMES = ('k_final', 'b_final', 'beta', 'cumbeta')


def _vec(key: str, path: Tuple[str, ...], n: int) -> Entry:
  return Entry(key, (n,), 'params', path)


def _denoise_table(cfg: BiGRConfig, prefix: str) -> List[Entry]:
  h, k, d = cfg.denoise_hidden_dim, cfg.binary_size, cfg.dim
  p = ('denoise_mlp',)
  e: List[Entry] = []
  e += _dense(f'{prefix}t_embedder.mlp.0', p + ('t_embedder', 'mlp_0'), 256, h)
  e += _dense(f'{prefix}t_embedder.mlp.2', p + ('t_embedder', 'mlp_2'), h, h)
  e += _dense(f'{prefix}x_embedder', p + ('x_embedder',), k, h)
  e += _dense(f'{prefix}c_embedder', p + ('c_embedder',), d, h)
  for i in range(cfg.num_block_mlp):
    q = p + (f'blocks_{i}',)
    e += _dense(f'{prefix}blocks.{i}.mlp.0', q + ('mlp_0',), h, h)
    e += _dense(f'{prefix}blocks.{i}.mlp.2', q + ('mlp_2',), h, h)
    e += _dense(f'{prefix}blocks.{i}.adaLN_modulation.1', q + ('adaLN_modulation',), h, 3 * h)
  e += _dense(f'{prefix}final_layer.linear', p + ('final_layer', 'linear'), h, k)
  e += _dense(f'{prefix}final_layer.adaLN_modulation.1', p + ('final_layer', 'adaLN_modulation'), h, 2 * h)
  return e


def bigr_table(cfg: BiGRConfig) -> List[Entry]:
  """Every tensor of the reference ``Transformer.state_dict()`` (aliases and buffers included), in its order.

  Alias entries carry the primary's path; buffer entries have collection None and a ``value``.
  """
  d, k = cfg.dim, cfg.binary_size
  hd, h, kv = cfg.head_dim, cfg.n_head, cfg.num_kv_heads
  e: List[Entry] = [
      _reshaped('mask_tok', (1, d), ('mask_tok',), (d,)),
      _reshaped('diffusion_pos_embed_learned', (1, cfg.seq_len, d), ('diffusion_pos_embed_learned',),
                (cfg.seq_len, d)),
      Entry('cls_embedding.embedding_table.weight', (cfg.num_class_rows, d), 'params', ('cls_embedding',)),
  ]
  e += _dense('tok_embeddings', ('tok_embeddings',), k, d)
  if cfg.use_adaLN:
    e += _dense('adaLN.1', ('adaLN',), d, 6 * d)
  f = cfg.ffn_hidden_dim
  for i in range(cfg.n_layer):
    key, p = f'layers.{i}', (f'layers_{i}',)
    if cfg.use_adaLN:
      e.append(_reshaped(f'{key}.ada_gss', (1, 1, 6, d), p + ('ada_gss',), (6, d)))
    e += _dense(f'{key}.attention.wqkv', p + ('attention', 'wqkv'), d, (h + 2 * kv) * hd, bias=False)
    e += _dense(f'{key}.attention.wo', p + ('attention', 'wo'), d, d, bias=False)
    e += _dense(f'{key}.feed_forward.w1', p + ('feed_forward', 'w1'), d, f, bias=False)
    e += _dense(f'{key}.feed_forward.w3', p + ('feed_forward', 'w3'), d, f, bias=False)
    e += _dense(f'{key}.feed_forward.w2', p + ('feed_forward', 'w2'), f, d, bias=False)
    e.append(_vec(f'{key}.attention_norm.weight', p + ('attention_norm', 'weight'), d))
    e.append(_vec(f'{key}.ffn_norm.weight', p + ('ffn_norm', 'weight'), d))
  e.append(_vec('norm.weight', ('norm', 'weight'), d))
  e += _denoise_table(cfg, PRIMARY_PREFIX)
  e += _denoise_table(cfg, ALIAS_PREFIX)
  sched = bd.make_schedule(cfg.n_sample_steps, cfg.beta_type)
  for name in SCHED_NAMES:
    e.append(Entry(SCHED_PREFIX + name, (cfg.n_sample_steps + 1,), None, value=lambda v=sched[name]: v))
  return e


def alias_primary(key: str) -> Optional[str]:
  """The ``denoise_mlp.*`` key an aliased ``diffusion_processor._denoise_fn.*`` key stands for (else None)."""
  return PRIMARY_PREFIX + key[len(ALIAS_PREFIX):] if key.startswith(ALIAS_PREFIX) else None


# ----------------------------------------------------------------------------- config inference
def _require(sd: Mapping[str, Any], key: str, what: str):
  if key not in sd:
    raise CheckpointMismatchError(f'cannot infer {what}: key {key!r} is missing from the state_dict')
  return sd[key]


def _count(sd, pattern: str) -> int:
  return len({int(m.group(1)) for key in sd for m in [re.match(pattern, key)] if m})


def bigr_config_from_state_dict(sd: Mapping[str, Any], **model_args) -> BiGRConfig:
  """Infer a ``BiGRConfig`` from tensor shapes; ``model_args`` (reference ``ModelArgs`` names) give the rest.

  Inferred: dim, binary_size, n_layer, num_classes, seq_len, use_adaLN, denoise_hidden_dim, num_block_mlp,
  n_sample_steps (from the scheduler buffers), n_kv_head, multiple_of (the largest power of two <= 256 that gives
  the stored SwiGLU width, unless given). Not in the weights: n_head (default dim // 64, the released models'
  head size), cls_token_num, block_size (default seq_len), p_flip, focal, alpha, aux, the sampling settings...
  A model_args value that contradicts the weights raises ``CheckpointMismatchError`` naming the field.
  """
  unknown = sorted(set(model_args) - {f.name for f in dataclasses.fields(BiGRConfig)})
  if unknown:
    raise ValueError(f'unknown BiGR ModelArgs field(s): {", ".join(unknown)}')
  te = _require(sd, 'tok_embeddings.weight', 'dim / binary_size')
  dim, k = int(te.shape[0]), int(te.shape[1])
  n_layer = _count(sd, r'layers\.(\d+)\.')
  if n_layer == 0:
    raise CheckpointMismatchError('cannot infer n_layer: no layers.* keys in the state_dict')
  dropout = model_args.get('class_dropout_prob', BiGRConfig.class_dropout_prob)
  rows = int(_require(sd, 'cls_embedding.embedding_table.weight', 'num_classes').shape[0])
  inferred: Dict[str, Any] = dict(
      dim=dim, binary_size=k, n_layer=n_layer, num_classes=rows - int(dropout > 0),
      seq_len=int(_require(sd, 'diffusion_pos_embed_learned', 'seq_len').shape[1]),
      use_adaLN='adaLN.1.weight' in sd,
      denoise_hidden_dim=int(_require(sd, PRIMARY_PREFIX + 'x_embedder.weight', 'denoise_hidden_dim').shape[0]),
      num_block_mlp=_count(sd, r'denoise_mlp\.blocks\.(\d+)\.'))
  if SCHED_PREFIX + 'beta' in sd:
    inferred['n_sample_steps'] = int(sd[SCHED_PREFIX + 'beta'].shape[0]) - 1
  n_head = int(model_args.get('n_head', max(dim // 64, 1)))
  if dim % n_head:
    raise CheckpointMismatchError(f'n_head {n_head} does not divide dim {dim}')
  hd = dim // n_head
  qkv_rows = int(_require(sd, 'layers.0.attention.wqkv.weight', 'n_kv_head').shape[0])
  if qkv_rows % hd or (qkv_rows // hd - n_head) % 2 or qkv_rows // hd <= n_head:
    raise CheckpointMismatchError(f'n_head: wqkv has {qkv_rows} rows, which no n_kv_head fits with n_head {n_head}')
  kv = (qkv_rows // hd - n_head) // 2
  inferred['n_kv_head'] = None if kv == n_head else kv
  if model_args.get('n_kv_head') is not None and model_args['n_kv_head'] == kv == n_head:
    inferred['n_kv_head'] = kv   # an explicit n_kv_head equal to n_head is the same model
  hid = int(_require(sd, 'layers.0.feed_forward.w1.weight', 'the SwiGLU width').shape[0])
  mult = model_args.get('ffn_dim_multiplier', None)
  if 'multiple_of' not in model_args:
    for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
      if ffn_hidden_dim(dim, m, mult) == hid:
        inferred['multiple_of'] = m
        break
    else:
      raise CheckpointMismatchError(f'multiple_of / ffn_dim_multiplier: no multiple_of gives the stored SwiGLU '
                                    f'width {hid} for dim {dim}; pass ffn_dim_multiplier')
  elif ffn_hidden_dim(dim, model_args['multiple_of'], mult) != hid:
    raise CheckpointMismatchError(f'multiple_of / ffn_dim_multiplier: the checkpoint has SwiGLU width {hid}, '
                                  f'model_args give {ffn_hidden_dim(dim, model_args["multiple_of"], mult)}')
  for name, v in inferred.items():
    if name in model_args and model_args[name] != v:
      raise CheckpointMismatchError(f'{name}: model_args say {model_args[name]!r}, the checkpoint has {v!r}')
  kw = dict(model_args)
  kw.update(inferred)
  kw['n_head'] = n_head
  kw.setdefault('block_size', inferred['seq_len'])
  try:
    return BiGRConfig.from_model_args(**kw)
  except ValueError as e:
    raise CheckpointMismatchError(f'the checkpoint does not give a valid BiGR config: {e}') from e


# ----------------------------------------------------------------------------- import / export
def _check_keys(sd: Mapping[str, Any], table: List[Entry], what: str):
  expected = {e.key: e for e in table}
  problems = [f'missing key {key!r} (expected shape {e.shape})' for key, e in expected.items() if key not in sd]
  problems += [f'unexpected key {key!r} (found shape {tuple(np.shape(sd[key]))})' for key in sd
               if key not in expected]
  problems += [f'key {key!r}: expected shape {e.shape}, found {tuple(np.shape(sd[key]))}'
               for key, e in expected.items() if key in sd and tuple(np.shape(sd[key])) != e.shape]
  if problems:
    raise CheckpointMismatchError(f'{what} state_dict does not match the config:\n  ' + '\n  '.join(problems))


def import_bigr(sd: Mapping[str, Any], cfg: BiGRConfig, what: str = 'BiGR') -> Dict[str, Any]:
  """Reference state_dict -> {'params': ...} (numpy). Aliases must equal their primary; buffers our schedule."""
  table = bigr_table(cfg)
  _check_keys(sd, table, what)
  flat: Dict[Tuple[str, ...], Array] = {}
  for e in table:
    a = sd[e.key]
    if e.collection is None:
      want = e.value()
      a = np.asarray(a)
      if not np.allclose(a.astype(np.float64), want.astype(np.float64), rtol=1e-6, atol=1e-7):
        raise CheckpointMismatchError(
            f'{what}: buffer {e.key!r} differs from the {cfg.beta_type!r} schedule with n_sample_steps='
            f'{cfg.n_sample_steps} (max abs diff {np.max(np.abs(a.astype(np.float64) - want)):.3g})')
      continue
    primary = alias_primary(e.key)
    if primary is not None:
      if sd[primary] is not a and not np.array_equal(np.asarray(sd[primary]), np.asarray(a)):
        raise CheckpointMismatchError(f'{what}: {e.key!r} differs from {primary!r}; they are one module in the '
                                      f'reference and must hold the same tensor')
      continue
    flat[e.path] = e.from_torch(np.asarray(a, np.float32))
  return {'params': traverse_util.unflatten_dict(flat)}


def export_bigr(variables: Mapping[str, Any], cfg: BiGRConfig, what: str = 'BiGR'
                ) -> 'collections.OrderedDict[str, Array]':
  """{'params': ...} -> the reference state_dict (numpy): every key (aliases, buffers), shape and order.

  An alias key holds the very same array object as its primary.
  """
  params = variables['params'] if 'params' in variables else variables
  flat = traverse_util.flatten_dict(_unbox(params))
  out: 'collections.OrderedDict[str, Array]' = collections.OrderedDict()
  for e in bigr_table(cfg):
    primary = alias_primary(e.key)
    if e.collection is None:
      a = np.asarray(e.value(), np.float32)
    elif primary is not None:
      a = out[primary]
    elif e.path not in flat:
      raise CheckpointMismatchError(f'{what}: no parameter at {"/".join(e.path)} for {e.key!r}')
    else:
      a = e.to_torch(np.asarray(flat[e.path], np.float32))   # views; made contiguous when written
    if tuple(a.shape) != e.shape:
      raise CheckpointMismatchError(f'{what}: {e.key!r} would have shape {tuple(a.shape)}, expected {e.shape}')
    out[e.key] = a
  return out


# ----------------------------------------------------------------------------- files
def load_bigr_state_dict(path) -> Dict[str, Array]:
  """Read ``bigr.pt`` ({'ema': state_dict}, or a plain state_dict; ``.safetensors`` too) into numpy arrays.

  Tensors that share storage in the file (the aliased transcoder keys) come back as the same numpy array.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'checkpoint file not found: {path}')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  import torch
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:
    raise ValueError(f'{path}: not a loadable weights-only torch checkpoint ({type(e).__name__}: {e})') from e
  if isinstance(obj, Mapping) and 'ema' in obj and isinstance(obj['ema'], Mapping):
    obj = obj['ema']
  if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    keys = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f'{path}: expected {{"ema": state_dict}} or a state_dict of tensors; found {keys}')
  out, seen = {}, {}
  for key, v in obj.items():
    ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
    if ident in seen:
      out[key] = out[seen[ident]]
    else:
      seen[ident] = key
      out[key] = v.detach().cpu().numpy()
  return out


def save_bigr_state_dict(sd: Mapping[str, Array], path, wrap_ema: bool = True):
  """Write a state_dict as ``{'ema': sd}`` (``.pt``/``.pth``; plain with wrap_ema=False) or ``.safetensors``.

  Keys that hold the same numpy array share one torch tensor, so the file stores it once (as the reference's do).
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)) or '.', exist_ok=True)
  if path.endswith('.safetensors'):
    from safetensors.numpy import save_file
    save_file({key: np.ascontiguousarray(v) for key, v in sd.items()}, path)
    return
  import torch
  tensors, by_id = collections.OrderedDict(), {}
  for key, v in sd.items():
    if id(v) not in by_id:
      by_id[id(v)] = torch.from_numpy(np.require(v, requirements=['C', 'W']))
    tensors[key] = by_id[id(v)]
  tmp = path + '.tmp'
  torch.save({'ema': tensors} if wrap_ema else tensors, tmp)
  os.replace(tmp, path)


def load_bigr(path, **model_args) -> Tuple[BiGRConfig, Dict[str, Any]]:
  """Read a reference checkpoint: (config inferred from the weights + model_args, {'params': ...})."""
  sd = load_bigr_state_dict(path)
  cfg = bigr_config_from_state_dict(sd, **model_args)
  return cfg, import_bigr(sd, cfg, what=os.fspath(path))


def save_bigr(path, variables: Mapping[str, Any], cfg: BiGRConfig, wrap_ema: bool = True):
  """Write our params as a reference checkpoint (``{'ema': state_dict}`` by default)."""
  save_bigr_state_dict(export_bigr(variables, cfg), path, wrap_ema=wrap_ema)
