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
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from var_jax.interop.llama import block_entries, infer_multiple_of
from var_jax.interop.state_dict import (CheckpointMismatchError, Entry, count_indices, dense_entries,
                                        export_state_dict, field_value, import_state_dict, load_state_dict,
                                        param_entry, require, reshaped_entry, save_state_dict)
from var_jax.models import bernoulli_diffusion as bd
from var_jax.models.bigr import BiGRConfig
from var_jax.models.llama import ffn_hidden_dim

Array = np.ndarray
ALIAS_PREFIX = 'diffusion_processor._denoise_fn.'
PRIMARY_PREFIX = 'denoise_mlp.'
SCHED_PREFIX = 'diffusion_processor.scheduler.'
SCHED_NAMES = ('k_final', 'b_final', 'beta', 'cumbeta')


def _denoise_table(cfg: BiGRConfig, prefix: str) -> List[Entry]:
  """The transcoder's entries under ``prefix``; under the alias prefix each entry is an alias of its primary."""
  h, k, d = cfg.denoise_hidden_dim, cfg.binary_size, cfg.dim
  p = ('denoise_mlp',)
  e: List[Entry] = []
  e += dense_entries(f'{prefix}t_embedder.mlp.0', p + ('t_embedder', 'mlp_0'), 256, h)
  e += dense_entries(f'{prefix}t_embedder.mlp.2', p + ('t_embedder', 'mlp_2'), h, h)
  e += dense_entries(f'{prefix}x_embedder', p + ('x_embedder',), k, h)
  e += dense_entries(f'{prefix}c_embedder', p + ('c_embedder',), d, h)
  for i in range(cfg.num_block_mlp):
    q = p + (f'blocks_{i}',)
    e += dense_entries(f'{prefix}blocks.{i}.mlp.0', q + ('mlp_0',), h, h)
    e += dense_entries(f'{prefix}blocks.{i}.mlp.2', q + ('mlp_2',), h, h)
    e += dense_entries(f'{prefix}blocks.{i}.adaLN_modulation.1', q + ('adaLN_modulation',), h, 3 * h)
  e += dense_entries(f'{prefix}final_layer.linear', p + ('final_layer', 'linear'), h, k)
  e += dense_entries(f'{prefix}final_layer.adaLN_modulation.1', p + ('final_layer', 'adaLN_modulation'), h, 2 * h)
  if prefix != PRIMARY_PREFIX:
    e = [dataclasses.replace(x, alias_of=alias_primary(x.key)) for x in e]
  return e


def bigr_table(cfg: BiGRConfig) -> List[Entry]:
  """Every tensor of the reference ``Transformer.state_dict()`` (aliases and buffers included), in its order.

  Alias entries carry ``alias_of``; buffer entries have collection None and a ``value`` (checked to 1e-6).
  """
  d, k = cfg.dim, cfg.binary_size
  hd, h, kv = cfg.head_dim, cfg.n_head, cfg.num_kv_heads
  e: List[Entry] = [
      reshaped_entry('mask_tok', (1, d), ('mask_tok',), (d,)),
      reshaped_entry('diffusion_pos_embed_learned', (1, cfg.seq_len, d), ('diffusion_pos_embed_learned',),
                (cfg.seq_len, d)),
      param_entry('cls_embedding.embedding_table.weight', (cfg.num_class_rows, d), ('cls_embedding',)),
  ]
  e += dense_entries('tok_embeddings', ('tok_embeddings',), k, d)
  if cfg.use_adaLN:
    e += dense_entries('adaLN.1', ('adaLN',), d, 6 * d)
  f = cfg.ffn_hidden_dim
  for i in range(cfg.n_layer):
    key, p = f'layers.{i}', (f'layers_{i}',)
    if cfg.use_adaLN:
      e.append(reshaped_entry(f'{key}.ada_gss', (1, 1, 6, d), p + ('ada_gss',), (6, d)))
    e += block_entries(key, p, d, (h + 2 * kv) * hd, f)
  e.append(param_entry('norm.weight', (d,), ('norm', 'weight')))
  e += _denoise_table(cfg, PRIMARY_PREFIX)
  e += _denoise_table(cfg, ALIAS_PREFIX)
  sched = bd.make_schedule(cfg.n_sample_steps, cfg.beta_type)
  for name in SCHED_NAMES:
    e.append(Entry(SCHED_PREFIX + name, (cfg.n_sample_steps + 1,), None, value=lambda v=sched[name]: v,
                   tol=(1e-6, 1e-7)))
  return e


def alias_primary(key: str) -> Optional[str]:
  """The ``denoise_mlp.*`` key an aliased ``diffusion_processor._denoise_fn.*`` key stands for (else None)."""
  return PRIMARY_PREFIX + key[len(ALIAS_PREFIX):] if key.startswith(ALIAS_PREFIX) else None


# ----------------------------------------------------------------------------- config inference
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
  te = require(sd, 'tok_embeddings.weight', 'dim / binary_size')
  dim, k = int(te.shape[0]), int(te.shape[1])
  n_layer = count_indices(sd, r'layers\.(\d+)\.')
  if n_layer == 0:
    raise CheckpointMismatchError('cannot infer n_layer: no layers.* keys in the state_dict')
  dropout = field_value(BiGRConfig, model_args, 'class_dropout_prob')
  rows = int(require(sd, 'cls_embedding.embedding_table.weight', 'num_classes').shape[0])
  inferred: Dict[str, Any] = dict(
      dim=dim, binary_size=k, n_layer=n_layer, num_classes=rows - int(dropout > 0),
      seq_len=int(require(sd, 'diffusion_pos_embed_learned', 'seq_len').shape[1]),
      use_adaLN='adaLN.1.weight' in sd,
      denoise_hidden_dim=int(require(sd, PRIMARY_PREFIX + 'x_embedder.weight', 'denoise_hidden_dim').shape[0]),
      num_block_mlp=count_indices(sd, r'denoise_mlp\.blocks\.(\d+)\.'))
  if SCHED_PREFIX + 'beta' in sd:
    inferred['n_sample_steps'] = int(sd[SCHED_PREFIX + 'beta'].shape[0]) - 1
  n_head = int(model_args['n_head'] if 'n_head' in model_args else max(dim // 64, 1))
  if dim % n_head:
    raise CheckpointMismatchError(f'n_head {n_head} does not divide dim {dim}')
  hd = dim // n_head
  qkv_rows = int(require(sd, 'layers.0.attention.wqkv.weight', 'n_kv_head').shape[0])
  if qkv_rows % hd or (qkv_rows // hd - n_head) % 2 or qkv_rows // hd <= n_head:
    raise CheckpointMismatchError(f'n_head: wqkv has {qkv_rows} rows, which no n_kv_head fits with n_head {n_head}')
  kv = (qkv_rows // hd - n_head) // 2
  inferred['n_kv_head'] = None if kv == n_head else kv
  if field_value(BiGRConfig, model_args, 'n_kv_head') == kv == n_head:
    inferred['n_kv_head'] = kv   # an explicit n_kv_head equal to n_head is the same model
  hid = int(require(sd, 'layers.0.feed_forward.w1.weight', 'the SwiGLU width').shape[0])
  mult = field_value(BiGRConfig, model_args, 'ffn_dim_multiplier')
  if 'multiple_of' not in model_args:
    inferred['multiple_of'] = infer_multiple_of(dim, hid, mult)
    if inferred['multiple_of'] is None:
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
def import_bigr(sd: Mapping[str, Any], cfg: BiGRConfig, what: str = 'BiGR', allow_cast: bool = False
                ) -> Dict[str, Any]:
  """Reference state_dict -> {'params': ...} (numpy). Aliases must equal their primary; buffers our schedule."""
  return import_state_dict(sd, bigr_table(cfg), what, allow_cast=allow_cast)


def export_bigr(variables: Mapping[str, Any], cfg: BiGRConfig, what: str = 'BiGR'
                ) -> 'collections.OrderedDict[str, Array]':
  """{'params': ...} (or the params alone) -> the reference state_dict (numpy): every key (aliases, buffers), shape
  and order. An alias key holds the very same array object as its primary.
  """
  variables = variables if 'params' in variables else {'params': variables}
  return export_state_dict(variables, bigr_table(cfg), what)


# ----------------------------------------------------------------------------- files
def load_bigr_state_dict(path) -> Dict[str, Array]:
  """Read ``bigr.pt`` ({'ema': state_dict}, or a plain state_dict; ``.safetensors`` too) into numpy arrays.

  Tensors that share storage in the file (the aliased transcoder keys) come back as the same numpy array.
  """
  return load_state_dict(path, wrapper_key='ema', what='BiGR checkpoint')


def save_bigr_state_dict(sd: Mapping[str, Array], path, wrap_ema: bool = True):
  """Write a state_dict as ``{'ema': sd}`` (``.pt``/``.pth``; plain with wrap_ema=False) or ``.safetensors``.

  Keys that hold the same numpy array share one torch tensor, so the file stores it once (as the reference's do).
  """
  save_state_dict(sd, path, wrapper_key='ema' if wrap_ema else None)


def load_bigr(path, *, allow_cast: bool = False, **model_args) -> Tuple[BiGRConfig, Dict[str, Any]]:
  """Read a reference checkpoint: (config inferred from the weights + model_args, {'params': ...})."""
  sd = load_bigr_state_dict(path)
  try:
    cfg = bigr_config_from_state_dict(sd, **model_args)
    return cfg, import_bigr(sd, cfg, what='BiGR', allow_cast=allow_cast)
  except CheckpointMismatchError as e:
    raise CheckpointMismatchError(f'{os.fspath(path)}: {e}') from None


def save_bigr(path, variables: Mapping[str, Any], cfg: BiGRConfig, wrap_ema: bool = True):
  """Write our params as a reference checkpoint (``{'ema': state_dict}`` by default)."""
  save_bigr_state_dict(export_bigr(variables, cfg), path, wrap_ema=wrap_ema)
