"""Any family's pipeline from files: reference checkpoints (VAR ``.pth``/``.safetensors``, ELM / BiGR generator +
binary autoencoder) or a run directory of ours (VAR: a model checkpoint directory or a training workdir holding one;
ELM / BiGR: a training workdir with its ``model_args.json``); the family of a generator checkpoint from its keys;
the reference ``ModelArgs`` overrides as the CLIs spell them."""
from __future__ import annotations

import ast
import json
from typing import Any, Dict, Optional, Sequence, Union

from var_jax.pipelines.base import BinaryLatentPipeline, Pipeline, bits_run_beside, is_bits_run, read_bits_run
from var_jax.pipelines.bigr import BiGRPipeline
from var_jax.pipelines.elm import ELMPipeline
from var_jax.pipelines.var import VARPipeline

PIPELINES = {'var': VARPipeline, 'elm': ELMPipeline, 'bigr': BiGRPipeline}


def parse_model_args(value: Union[None, str, Sequence[str], Dict[str, Any]]) -> Dict[str, Any]:
  """``ModelArgs`` overrides from a JSON object string, or a list / comma string of ``key=value`` items (values
  parsed as JSON, then as Python literals, else kept as strings: ``p_flip=true``, ``focal=0.0``, ``n_head=16``)."""
  if value is None or value == '' or value == []:
    return {}
  if isinstance(value, dict):
    return dict(value)
  if not isinstance(value, str) and value and str(value[0]).lstrip().startswith('{'):
    value = ','.join(value)                     # a JSON object split on its commas by absl's DEFINE_list
  if isinstance(value, str):
    if value.strip().startswith('{'):
      out = json.loads(value)
      if not isinstance(out, dict):
        raise ValueError(f'--model_args JSON must be an object, got {value!r}')
      return out
    value = [v for v in value.split(',') if v.strip()]
  out = {}
  for item in value:
    if '=' not in item:
      raise ValueError(f'--model_args: expected key=value, got {item!r}')
    k, v = (s.strip() for s in item.split('=', 1))
    try:
      out[k] = json.loads(v)
    except json.JSONDecodeError:
      try:
        out[k] = ast.literal_eval(v)
      except (ValueError, SyntaxError):
        out[k] = v
  return out


def detect_family(model_ckpt: str) -> str:
  """'bigr' or 'elm' from a generator checkpoint's keys (BiGR has the diffusion transcoder)."""
  from var_jax.interop.state_dict import state_dict_keys
  keys = state_dict_keys(model_ckpt, wrapper_key='ema', what='--model_ckpt')   # the one reader's checks and errors
  if any(k.startswith(('denoise_mlp.', 'diffusion_processor.')) for k in keys):
    return 'bigr'
  if any(k.startswith(('tok_embeddings', 'layers.')) for k in keys):
    return 'elm'
  raise ValueError(f'{model_ckpt}: neither an ELM nor a BiGR checkpoint (first keys: {keys[:5]})')


def _load_bits_run(checkpoint: str, model: str, model_args: Dict[str, Any], allow_cast: bool, given) -> Pipeline:
  """An ELM / BiGR training run directory (``--checkpoint``) through its family's ``from_checkpoint``."""
  others = [f for f, v in given if v]
  if others:
    raise ValueError(f'give either --checkpoint (a run directory) or {"/".join(others)}, not both')
  run = read_bits_run(checkpoint)           # --model=elm/bigr on another directory: says what it expects
  if model != 'auto':
    run.check_family(model, f'--model={model}')
  return PIPELINES[run.family].from_checkpoint(checkpoint, allow_cast=allow_cast, **model_args)


def load_pipeline(vae_ckpt: Optional[str] = None, var_ckpt: Optional[str] = None, checkpoint: Optional[str] = None,
                  patch_nums: Optional[Sequence] = None, *, model: str = 'auto', bae_ckpt: Optional[str] = None,
                  model_ckpt: Optional[str] = None, model_args=None, allow_cast: bool = False,
                  pretrained: Optional[str] = None, cache_dir: Optional[str] = None) -> Pipeline:
  """A pipeline of any family from:

  * ``checkpoint``, a run directory of ours: an ELM / BiGR training workdir (it holds ``model_args.json``:
    ``ELMPipeline`` / ``BiGRPipeline.from_checkpoint``; ``model_args`` update its ``ModelArgs``), else a VAR model
    checkpoint directory or training workdir (``VARPipeline.from_checkpoint``);
  * ``vae_ckpt`` + ``var_ckpt``: VAR reference weights;
  * ``bae_ckpt`` + ``model_ckpt``: ELM / BiGR reference weights with ``model_args`` (``parse_model_args``); without
    ``model_args``, a ``model_args.json`` beside ``model_ckpt`` that names it (a training run's export) gives them;
  * ``pretrained``, a released name (``var_jax.hub``; ``name@revision`` pins one; ``model_args`` / ``patch_nums``
    update its table entry).

  ``model``: 'auto' (from which files are given, the run directory's ``model_args.json`` and, for ELM / BiGR
  reference weights, the generator's keys), 'var', 'elm' or 'bigr' (a run of another family is an error).
  ``allow_cast``: accept integer-stored weights, cast to float32 (NaN/inf weights are always an error)."""
  if model not in ('auto', *PIPELINES):
    raise ValueError(f'model must be auto, var, elm or bigr, got {model!r}')
  model_args = parse_model_args(model_args)
  if pretrained:
    from var_jax import hub
    given = [f for f, v in (('--vae_ckpt', vae_ckpt), ('--var_ckpt', var_ckpt), ('--checkpoint', checkpoint),
                            ('--bae_ckpt', bae_ckpt), ('--model_ckpt', model_ckpt)) if v]
    if given:
      raise ValueError(f'give either --pretrained or {"/".join(given)}, not both')
    kind = hub.release(pretrained).kind                 # an unknown name lists the known ones
    if kind not in PIPELINES:
      raise ValueError(f'--pretrained={pretrained} is a released tokenizer ({kind}), not a generator; the generators: '
                       f'{" ".join(n for k in PIPELINES for n in hub.names(k))}')
    if model not in ('auto', kind):
      raise ValueError(f'--pretrained={pretrained} is a released {kind} model, not --model={model}')
    if patch_nums:
      model_args['patch_nums'] = [int(p) for p in patch_nums]
    return PIPELINES[kind].from_pretrained(pretrained, cache_dir=cache_dir, allow_cast=allow_cast, **model_args)
  if checkpoint and (model in ('elm', 'bigr') or is_bits_run(checkpoint)):
    return _load_bits_run(checkpoint, model, model_args, allow_cast,
                          (('--vae_ckpt', vae_ckpt), ('--var_ckpt', var_ckpt), ('--bae_ckpt', bae_ckpt),
                           ('--model_ckpt', model_ckpt), ('--patch_nums', patch_nums)))
  if model in ('elm', 'bigr') or (model == 'auto' and (bae_ckpt or model_ckpt)):
    if vae_ckpt or var_ckpt or checkpoint:
      raise ValueError('give either --bae_ckpt/--model_ckpt (ELM, BiGR reference files) or --vae_ckpt/--var_ckpt '
                       '(VAR) or --checkpoint (a run directory)')
    if not (bae_ckpt and model_ckpt):
      raise ValueError('ELM/BiGR sampling needs both --bae_ckpt and --model_ckpt (or --checkpoint=<run directory>)')
    bae = BinaryLatentPipeline._read_bae(bae_ckpt)    # first: a bad --bae_ckpt is named, not hidden by a model error
    family = detect_family(model_ckpt) if model == 'auto' else model
    run = None if model_args else bits_run_beside(model_ckpt)       # a training run's export: its json's ModelArgs
    run = run if run is not None and run.family == family else None
    args = run.model_args if run is not None else model_args
    pipe = PIPELINES[family].from_torch(bae, model_ckpt, allow_cast=allow_cast, **args)
    if run is not None:
      run.check_image_size(pipe)                                    # the image size the run trained on
    return pipe
  if model_args:
    raise ValueError('--model_args applies to ELM/BiGR checkpoints only')
  if checkpoint:
    if vae_ckpt or var_ckpt:
      raise ValueError('give either --checkpoint or --vae_ckpt/--var_ckpt, not both')
    return VARPipeline.from_checkpoint(checkpoint)
  if not (vae_ckpt and var_ckpt):
    raise ValueError('give --checkpoint, or both --vae_ckpt and --var_ckpt')
  return VARPipeline.from_torch(vae_ckpt, var_ckpt, patch_nums=[int(p) for p in patch_nums] if patch_nums else None,
                                allow_cast=allow_cast)
