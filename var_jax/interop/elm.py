"""Move ELM weights between our Flax params and the reference PyTorch checkpoints (Pepper-lll/LMforImageGeneration).

Table-driven (``var_jax.interop.state_dict``): ``ar_table`` / ``mlm_table`` list, in the reference's
``state_dict`` order, every tensor of the reference ``Transformer`` with its torch shape and where it lives in our
variables; import and export walk the same table.

The MLM state_dict carries tensors its forward never uses: ``output`` (T heads of D -> 2^cd + 1), ``pos_embed``
(block_size x D) and ``proj`` (T > 1). The released MLM files lack at least ``output.weight`` (their sizes say so).
Import tolerates their absence; the ones present go to the collection ``'unused'`` (keyed by torch name, torch
layout) when ``keep_unused=True``, so that export writes them back unchanged. Export writes zeros for those it was
not given (the reference zero-initialises ``output``; none of them changes the reference forward), so the result
loads with ``load_state_dict(strict=True)``; ``include_unused=False`` omits them instead.
"""
from __future__ import annotations

import collections
import math
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from var_jax.interop.state_dict import (CheckpointMismatchError, Entry, count_indices, dense_entries,
                                        export_state_dict, field_value, import_state_dict, load_state_dict,
                                        param_entry, save_state_dict, shape_of)
from var_jax.interop.llama import block_entries, infer_multiple_of
from var_jax.models.elm import ELMAR, ELMMLM, GPT_PRESETS, ELMConfig, check_model_args
from var_jax.models.llama import ffn_hidden_dim

Array = np.ndarray
UNUSED = 'unused'


# ----------------------------------------------------------------------------- tables
def _unused(key: str, shape: Tuple[int, ...]) -> Entry:
  """A tensor the forward never reads: optional on import, kept (by torch key) in the ``'unused'`` collection."""
  return Entry(key, shape, UNUSED, (key,), optional=True)


def _layers(cfg: ELMConfig) -> List[Entry]:
  d, f = cfg.dim, cfg.ffn_hidden_dim
  hkv = cfg.num_kv_heads
  qkv = (cfg.n_head + 2 * hkv) * cfg.head_dim
  e: List[Entry] = []
  for i in range(cfg.n_layer):
    k, p = f'layers.{i}', (f'layers_{i}',)
    e += block_entries(k, p, d, qkv, f)
    if cfg.use_adaLN and cfg.modeling == 'ar':
      e += dense_entries(f'{k}.adaLN_modulation.1', p + ('adaLN_modulation',), d, 6 * d)
  return e


def ar_table(cfg: ELMConfig) -> List[Entry]:
  """Every tensor of the reference ``ar_model.Transformer.state_dict()``, in its order."""
  d, t, v = cfg.dim, cfg.token_each, cfg.token_table_rows
  e = [param_entry('cls_embedding.embedding_table.weight', (cfg.num_class_rows, d), ('cls_embedding',))]
  if t > 1:
    e += [param_entry(f'tok_embedder.{i}.weight', (v, d), (f'tok_embedder_{i}',)) for i in range(t)]
    e += dense_entries('proj', ('proj',), t * d, d, bias=False)
  else:
    e.append(param_entry('tok_embedder.weight', (v, d), ('tok_embedder_0',)))
  e += _layers(cfg)
  if cfg.use_adaLN:
    e += dense_entries('final_adaLN.1', ('final_adaLN',), d, 2 * d)
  e.append(param_entry('norm.weight', (d,), ('norm', 'weight')))
  if t > 1:
    for i in range(t):
      e += dense_entries(f'output.{i}', (f'output_{i}',), d, cfg.codebook_size, bias=False)
  else:
    e += dense_entries('output', ('output_0',), d, cfg.codebook_size, bias=False)
  return e


def mlm_table(cfg: ELMConfig) -> List[Entry]:
  """Every tensor of the reference ``mlm_model.Transformer.state_dict()``, in its order (unused ones included, in
  the collection ``'unused'``)."""
  d, t, v = cfg.dim, cfg.token_each, cfg.token_table_rows
  e = [param_entry('cls_embedding.embedding_table.weight', (cfg.num_class_rows, d), ('cls_embedding',)),
       param_entry('tok_embedder.weight', (v, d), ('tok_embedder',)),
       _unused('pos_embed.weight', (cfg.block_size, d))]
  e += _layers(cfg)
  if t > 1:
    e.append(_unused('proj.weight', (d, t * d)))
  e.append(param_entry('norm.weight', (d,), ('norm', 'weight')))
  if t > 1:
    e += [_unused(f'output.{i}.weight', (v, d)) for i in range(t)]
  else:
    e.append(_unused('output.weight', (v, d)))
  e += [Entry('mlm_layer.bias', (1, 1, v), 'params', ('mlm_layer', 'bias'), to_torch=lambda a: a.reshape(1, 1, -1),
              from_torch=lambda a: a.reshape(-1)),
        *dense_entries('mlm_layer.fc', ('mlm_layer', 'fc'), d, d),
        param_entry('mlm_layer.ln.weight', (d,), ('mlm_layer', 'ln_scale')),
        param_entry('mlm_layer.ln.bias', (d,), ('mlm_layer', 'ln_bias'))]
  return e


def elm_table(cfg: ELMConfig) -> List[Entry]:
  return ar_table(cfg) if cfg.modeling == 'ar' else mlm_table(cfg)


# ----------------------------------------------------------------------------- config inference
def infer_elm_config(sd: Mapping[str, Any], **model_args) -> ELMConfig:
  """Infer an ``ELMConfig`` from a reference state_dict plus the reference ``ModelArgs`` keyword arguments.

  AR vs MLM comes from the keys (``mlm_layer.*``) unless ``modeling`` is given. The shapes fix dim, n_layer,
  code_dim, token_each, num_classes (given class_dropout_prob), use_adaLN, the FFN width (``multiple_of`` is found
  when not given) and, for MLM, block_size (``pos_embed``). ``model_args`` that contradict the shapes raise a
  ``CheckpointMismatchError`` naming the field. n_head: given, else the reference GPT preset of (n_layer, dim), else
  the ModelArgs default 32. The rest: given or the reference defaults. Unknown names raise a ``TypeError``.
  """
  args = dict(model_args)
  is_mlm = any(k.startswith('mlm_layer.') for k in sd)
  modeling = args.pop('modeling', None) or ('mlm' if is_mlm else 'ar')
  if modeling != ('mlm' if is_mlm else 'ar'):
    raise CheckpointMismatchError(f'modeling={modeling!r} contradicts the checkpoint (it is an ELM '
                                  f'{"MLM" if is_mlm else "AR"} state_dict)')
  check_model_args(modeling, args)

  def need(key, what):
    if key not in sd:
      raise CheckpointMismatchError(f'cannot infer {what}: key {key!r} is missing from the ELM state_dict')
    return shape_of(sd, key)

  inferred: Dict[str, Tuple[Any, str]] = {}        # field -> (value, evidence)
  cls_key = 'cls_embedding.embedding_table.weight'
  rows, dim = need(cls_key, 'dim / num_classes')
  inferred['dim'] = (dim, f'{cls_key} {(rows, dim)}')
  drop = float(field_value(ELMConfig, args, 'class_dropout_prob'))
  inferred['num_classes'] = (rows - int(drop > 0), f'{cls_key} {(rows, dim)} with class_dropout_prob={drop}')
  n_layer = count_indices(sd, r'layers\.(\d+)\.')
  if n_layer == 0:
    raise CheckpointMismatchError('cannot infer n_layer: no layers.* keys in the ELM state_dict')
  inferred['n_layer'] = (n_layer, f'{n_layer} layers.* blocks')

  if modeling == 'ar':
    if 'tok_embedder.0.weight' in sd:
      t = count_indices(sd, r'tok_embedder\.(\d+)\.weight')
      v = need('tok_embedder.0.weight', 'code_dim')[0]
      ev = f'{t} tok_embedder.i tables of {v} rows'
    else:
      t, v = 1, need('tok_embedder.weight', 'code_dim')[0]
      ev = f'tok_embedder.weight with {v} rows'
    inferred['token_each'] = (t, ev)
    cd = int(round(math.log2(v))) if v > 0 else -1
    if 2 ** cd != v:
      raise CheckpointMismatchError(f'ELM AR token table has {v} rows, not a power of two ({ev})')
    inferred['code_dim'] = (cd, ev)
    inferred['use_adaLN'] = ('layers.0.adaLN_modulation.1.weight' in sd, 'layers.0.adaLN_modulation.1.* keys')
  else:
    pause = bool(field_value(ELMConfig, args, 'pause'))
    v = need('tok_embedder.weight', 'code_dim')[0]
    cb = v - 1 - int(pause)
    cd = int(round(math.log2(cb))) if cb > 0 else -1
    if cd < 0 or 2 ** cd != cb:
      raise CheckpointMismatchError(f'ELM MLM token table has {v} rows, not 2^code_dim + 1 (+1 with pause)')
    inferred['code_dim'] = (cd, f'tok_embedder.weight with {v} rows')
    if 'proj.weight' in sd:
      t = shape_of(sd, 'proj.weight')[1] // dim
      inferred['token_each'] = (t, f'proj.weight {shape_of(sd, "proj.weight")}')
    elif 'output.0.weight' in sd:
      t = count_indices(sd, r'output\.(\d+)\.weight')
      inferred['token_each'] = (t, f'{t} output.i heads')
    elif 'output.weight' in sd:
      inferred['token_each'] = (1, 'a single output.weight head')
    elif 'token_each' not in args:      # the unused proj/output are absent: a T=1 model has neither
      args['token_each'] = 1
    if 'pos_embed.weight' in sd:
      inferred['block_size'] = (shape_of(sd, 'pos_embed.weight')[0], f'pos_embed.weight {shape_of(sd, "pos_embed.weight")}')

  for name, (value, evidence) in inferred.items():
    if name in args and args[name] != value:
      raise CheckpointMismatchError(f'model_args {name}={args[name]!r} contradicts the checkpoint: {name}={value!r} '
                                    f'from {evidence}')
    args[name] = value

  # n_head: given, a GPT preset, or the ModelArgs default
  if 'n_head' not in args:
    preset = [h for (nl, d, h) in GPT_PRESETS.values() if (nl, d) == (n_layer, dim)]
    args['n_head'] = preset[0] if preset else ELMConfig.n_head
  n_head = int(args['n_head'])
  if dim % n_head:
    raise CheckpointMismatchError(f'n_head={n_head} does not divide dim={dim}: pass n_head')
  qkv_rows = need('layers.0.attention.wqkv.weight', 'n_kv_head')[0]
  hd = dim // n_head
  n_kv = (qkv_rows // hd - n_head) // 2
  if (n_head + 2 * n_kv) * hd != qkv_rows or n_kv <= 0:
    raise CheckpointMismatchError(f'layers.0.attention.wqkv.weight has {qkv_rows} rows: no n_kv_head fits '
                                  f'n_head={n_head}, dim={dim}')
  given_kv = field_value(ELMConfig, args, 'n_kv_head')
  if (given_kv or n_head) != n_kv:
    raise CheckpointMismatchError(f'model_args n_kv_head={given_kv!r} contradicts the checkpoint: wqkv has '
                                  f'{qkv_rows} rows = (n_head + 2 * {n_kv}) * {hd}')
  args['n_kv_head'] = None if n_kv == n_head else n_kv

  # FFN width: multiple_of / ffn_dim_multiplier must reproduce it
  hidden = need('layers.0.feed_forward.w1.weight', 'the FFN width')[0]
  mult = field_value(ELMConfig, args, 'ffn_dim_multiplier')
  if 'multiple_of' in args:
    if ffn_hidden_dim(dim, int(args['multiple_of']), mult) != hidden:
      raise CheckpointMismatchError(
          f'model_args multiple_of={args["multiple_of"]} (ffn_dim_multiplier={mult}) gives an FFN width of '
          f'{ffn_hidden_dim(dim, int(args["multiple_of"]), mult)}, the checkpoint has {hidden} '
          f'(layers.0.feed_forward.w1.weight)')
  else:
    m = infer_multiple_of(dim, hidden, mult)
    if m is None:
      raise CheckpointMismatchError(f'no multiple_of gives the FFN width {hidden} for dim={dim} '
                                    f'(ffn_dim_multiplier={mult}): pass multiple_of / ffn_dim_multiplier')
    args['multiple_of'] = m
  try:
    return ELMConfig.from_model_args(modeling, **args)
  except (ValueError, NotImplementedError) as e:
    raise CheckpointMismatchError(f'the ELM checkpoint and model_args give an invalid config: {e}') from e


# ----------------------------------------------------------------------------- import / export
def import_elm(sd: Mapping[str, Any], cfg: ELMConfig, keep_unused: bool = False,
               what: str = 'ELM', allow_cast: bool = False) -> Dict[str, Any]:
  """Reference state_dict -> {'params': ...} (+ {'unused': {torch key: array}} with ``keep_unused``), numpy."""
  return import_state_dict(sd, elm_table(cfg), what, skip=() if keep_unused else (UNUSED,), allow_cast=allow_cast)


def export_elm(variables: Mapping[str, Any], cfg: ELMConfig, include_unused: bool = True,
               what: str = 'ELM') -> 'collections.OrderedDict[str, Array]':
  """Our variables -> reference state_dict (numpy, reference order). The MLM's unused tensors come from
  ``variables['unused']`` when there, else zeros (``include_unused=False``: left out, as in the released files)."""
  fill = dict(zeros_for=(UNUSED,)) if include_unused else dict(omit=(UNUSED,))
  return export_state_dict(variables, elm_table(cfg), what, **fill)


def elm_model(cfg: ELMConfig, dtype=None):
  """The Flax module for a config (ELMAR or ELMMLM)."""
  kw = {} if dtype is None else {'dtype': dtype}
  return ELMAR(cfg, **kw) if cfg.modeling == 'ar' else ELMMLM(cfg, **kw)


def load_elm(path, keep_unused: bool = False, dtype=None, **model_args):
  """Read a reference ELM checkpoint (``model.pth`` state_dict, or .safetensors) -> (module, variables).

  ``model_args``: the reference ``ModelArgs`` keyword arguments not fixed by the shapes (n_head for non-preset
  sizes, block_size for AR if not 256, cls_token_num, ...); see ``infer_elm_config``.
  """
  sd = load_state_dict(path, what='ELM checkpoint')
  cfg = infer_elm_config(sd, **model_args)
  return elm_model(cfg, dtype), import_elm(sd, cfg, keep_unused=keep_unused, what=str(path))


def save_elm(variables, cfg: ELMConfig, path, include_unused: bool = True):
  """Write our variables as a reference ELM checkpoint (.pth or .safetensors)."""
  save_state_dict(export_elm(variables, cfg, include_unused), path)


__all__ = ['ar_table', 'mlm_table', 'elm_table', 'infer_elm_config', 'import_elm', 'export_elm', 'elm_model',
           'load_elm', 'save_elm', 'UNUSED']
