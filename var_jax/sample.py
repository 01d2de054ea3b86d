r"""Sample images from a VAR, ELM or BiGR model: ``python -m var_jax.sample``.

Examples:
  # a labelled grid from the released weights (reference .pth or .safetensors)
  python -m var_jax.sample --vae_ckpt=vae_ch160v4096z32.pth --var_ckpt=var_d16.pth \
      --classes=207,360,387,974,88,979,417,279 --cfg=4 --top_k=900 --top_p=0.95 --out=grid.png
  # 50 per class over all classes, one PNG each + an .npz for OpenAI's FID evaluator; rerunning resumes
  python -m var_jax.sample --checkpoint=workdir/model --num_per_class=50 --out_dir=samples --batch_size=64

  # ELM (AR or MLM, inferred from the keys) and BiGR: the binary autoencoder + the generator; --model_args takes the
  # reference ModelArgs fields the tensors cannot tell
  python -m var_jax.sample --bae_ckpt=binaryae_ema.th --model_ckpt=L-2-10.pth --classes=207,360 --out=elm.png
  python -m var_jax.sample --bae_ckpt=bae_24.th --model_ckpt=bigr_L_d24.pt --model_args=p_flip=true --out=bigr.png

Sampling settings left unset take each model's release defaults (VAR: cfg 1.5, top-k 900, top-p 0.96; ELM: linear
cfg 4.0, top-k 1000; BiGR: cfg 3.0, 20 iterations, Gumbel 0.01).

Every image i draws from fold_in(PRNGKey(seed), i), so a resumed run (existing PNGs are skipped) produces exactly
the images an uninterrupted one would, whatever the batch size or device count.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags (defined only when run as a program, so that importing this module defines none)."""
  flags.DEFINE_string('vae_ckpt', None, 'reference-layout VQVAE weights (.pth or .safetensors)')
  flags.DEFINE_string('var_ckpt', None, 'reference-layout VAR weights (.pth or .safetensors)')
  flags.DEFINE_string('checkpoint', None, 'a var_jax model checkpoint directory (instead of --vae_ckpt/--var_ckpt)')
  flags.DEFINE_enum('model', 'auto', ['auto', 'var', 'elm', 'bigr'],
                    'model family; auto: VAR for --vae_ckpt/--var_ckpt/--checkpoint, else ELM or BiGR from the keys '
                    'of --model_ckpt')
  flags.DEFINE_string('bae_ckpt', None, 'ELM/BiGR: reference binary autoencoder weights (binaryae*.th)')
  flags.DEFINE_string('model_ckpt', None, 'ELM/BiGR: reference generator weights (ELM .pth, BiGR .pt)')
  flags.DEFINE_list('model_args', [], 'ELM/BiGR: reference ModelArgs fields as key=value (values parsed as JSON, e.g. '
                    'n_head=16,p_flip=true)')
  flags.DEFINE_string('cfg_schedule', None, 'ELM/BiGR: CFG schedule (ELM default linear, BiGR constant)')
  flags.DEFINE_float('temperature', None, 'ELM/BiGR sampling temperature')
  flags.DEFINE_integer('num_iter', None, 'ELM MLM / BiGR decoding iterations')
  flags.DEFINE_integer('infer_steps', None, 'BiGR diffusion inference steps')
  flags.DEFINE_float('gumbel_temp', None, 'BiGR Gumbel temperature of the unmasking order')
  flags.DEFINE_string('gumbel_schedule', None, 'BiGR Gumbel schedule: constant, down, up')
  flags.DEFINE_list('patch_nums', None, 'override the inferred patch_nums (comma list)')
  flags.DEFINE_list('classes', None, 'class labels to sample, e.g. 207,360 (one image each, times --num_per_class)')
  flags.DEFINE_integer('num_per_class', 1, 'images per class; with no --classes: over all classes')
  flags.DEFINE_float('cfg', None, 'classifier-free guidance ratio (default: the model family\'s release setting)')
  flags.DEFINE_integer('top_k', None, 'top-k filtering (0: off; VAR default 900, ELM 1000)')
  flags.DEFINE_float('top_p', None, 'VAR top-p filtering (0: off; default 0.96)')
  flags.DEFINE_integer('seed', 0, 'PRNG seed')
  flags.DEFINE_bool('more_smooth', False, 'Gumbel-softmax smoothing (visualisation only; not for FID)')
  flags.DEFINE_integer('batch_size', 32, 'images per compiled call (split over local devices)')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'compute dtype')
  flags.DEFINE_string('out', None, 'write one labelled grid PNG here')
  flags.DEFINE_string('out_dir', None, 'write one PNG per image and samples.npz (arr_0: uint8 NHWC) here')
  flags.DEFINE_integer('grid_cols', 8, 'columns of the --out grid')


def sample_plan(num_classes: int, classes: Optional[Sequence[int]], num_per_class: int) -> List[int]:
  """The label of every image, in output order."""
  if num_per_class < 1:
    raise ValueError(f'--num_per_class must be >= 1, got {num_per_class}')
  labels = list(range(num_classes)) if not classes else [int(c) for c in classes]
  for c in labels:
    if not 0 <= c < num_classes:
      raise ValueError(f'--classes: class {c} is out of range for a model with {num_classes} classes '
                       f'(0..{num_classes - 1})')
  return [c for c in labels for _ in range(num_per_class)]


def image_name(index: int, label: int) -> str:
  return f'{index:06d}_class{label:04d}.png'


def to_uint8(images):
  import numpy as np
  return np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


def labelled_grid(images_u8, labels, cols: int):
  """A PIL grid of the images with their class label written in the corner of each tile."""
  from PIL import Image, ImageDraw
  n, h, w, _ = images_u8.shape
  cols = max(1, min(cols, n))
  rows = -(-n // cols)
  grid = Image.new('RGB', (cols * w, rows * h), (0, 0, 0))
  draw = ImageDraw.Draw(grid)
  for i in range(n):
    x, y = (i % cols) * w, (i // cols) * h
    grid.paste(Image.fromarray(images_u8[i]), (x, y))
    draw.rectangle([x, y, x + 6 * len(str(labels[i])) + 4, y + 11], fill=(0, 0, 0))
    draw.text((x + 2, y), str(labels[i]), fill=(255, 255, 255))
  return grid


def _progress(done: int, total: int, t0: float, n_new: int):
  rate = n_new / max(time.time() - t0, 1e-9)
  sys.stderr.write(f'\r[{done}/{total}] {rate:.2f} images/s')
  sys.stderr.flush()


def load_pipeline(vae_ckpt=None, var_ckpt=None, checkpoint=None, patch_nums=None, *, model='auto', bae_ckpt=None,
                  model_ckpt=None, model_args=None):
  from var_jax import BiGRPipeline, ELMPipeline, VARPipeline
  if model in ('elm', 'bigr') or (model == 'auto' and (bae_ckpt or model_ckpt)):
    if vae_ckpt or var_ckpt or checkpoint:
      raise ValueError('give either --bae_ckpt/--model_ckpt (ELM, BiGR) or --vae_ckpt/--var_ckpt/--checkpoint (VAR)')
    if not (bae_ckpt and model_ckpt):
      raise ValueError('ELM/BiGR sampling needs both --bae_ckpt and --model_ckpt')
    family = detect_family(model_ckpt) if model == 'auto' else model
    cls = ELMPipeline if family == 'elm' else BiGRPipeline
    return cls.from_torch(bae_ckpt, model_ckpt, **(model_args or {}))
  if model_args:
    raise ValueError('--model_args applies to ELM/BiGR checkpoints only')
  if checkpoint:
    if vae_ckpt or var_ckpt:
      raise ValueError('give either --checkpoint or --vae_ckpt/--var_ckpt, not both')
    return VARPipeline.from_checkpoint(checkpoint)
  if not (vae_ckpt and var_ckpt):
    raise ValueError('give --checkpoint, or both --vae_ckpt and --var_ckpt')
  return VARPipeline.from_torch(vae_ckpt, var_ckpt, patch_nums=[int(p) for p in patch_nums] if patch_nums else None)


VAR_DEFAULTS = {'cfg': 1.5, 'top_k': 900, 'top_p': 0.96}
ELM_DEFAULTS = {'cfg': 4.0, 'top_k': 1000}


def model_kind(pipe) -> str:
  from var_jax import BiGRPipeline, ELMPipeline, VARPipeline
  for cls, name in ((VARPipeline, 'var'), (ELMPipeline, 'elm'), (BiGRPipeline, 'bigr')):
    if isinstance(pipe, cls):
      return name
  raise TypeError(f'not a var_jax pipeline: {type(pipe).__name__}')


def num_classes(pipe) -> int:
  return pipe.var_config.num_classes if model_kind(pipe) == 'var' else pipe.num_classes


def parse_model_args(items: Sequence[str]) -> Dict[str, Any]:
  """``['n_head=16', 'p_flip=true']`` -> ``{'n_head': 16, 'p_flip': True}`` (values as JSON, else strings)."""
  out = {}
  for item in items or ():
    if '=' not in item:
      raise ValueError(f'--model_args: expected key=value, got {item!r}')
    k, v = item.split('=', 1)
    try:
      out[k.strip()] = json.loads(v)
    except json.JSONDecodeError:
      out[k.strip()] = v
  return out


def detect_family(model_ckpt: str) -> str:
  """'bigr' or 'elm' from a generator checkpoint's keys (BiGR has the diffusion transcoder)."""
  if not os.path.exists(model_ckpt):
    raise FileNotFoundError(f'--model_ckpt: {model_ckpt} does not exist')
  if model_ckpt.endswith('.safetensors'):
    from safetensors import safe_open
    with safe_open(model_ckpt, 'numpy') as f:
      keys = list(f.keys())
  else:
    import torch
    obj = torch.load(model_ckpt, map_location='cpu', weights_only=True, mmap=True)
    if isinstance(obj, dict) and isinstance(obj.get('ema'), dict):
      obj = obj['ema']
    keys = list(obj) if isinstance(obj, dict) else []
  if any(k.startswith(('denoise_mlp.', 'diffusion_processor.')) for k in keys):
    return 'bigr'
  if any(k.startswith(('tok_embeddings', 'layers.')) for k in keys):
    return 'elm'
  raise ValueError(f'{model_ckpt}: neither an ELM nor a BiGR checkpoint (first keys: {keys[:5]})')


def sampling_options(kind: str, cfg=None, top_k=None, top_p=None, more_smooth=False, cfg_schedule=None,
                     temperature=None, num_iter=None, infer_steps=None, gumbel_temp=None,
                     gumbel_schedule=None) -> Dict[str, Any]:
  """The keyword arguments of ``pipe.sample`` for a model family; unset values take the family's defaults, and a
  setting the family does not have is an error (naming the flag)."""
  given = {'top_p': top_p, 'more_smooth': more_smooth or None, 'cfg_schedule': cfg_schedule,
           'temperature': temperature, 'num_iter': num_iter, 'infer_steps': infer_steps, 'gumbel_temp': gumbel_temp,
           'gumbel_schedule': gumbel_schedule}
  allowed = {'var': ('top_p', 'more_smooth'), 'elm': ('cfg_schedule', 'temperature', 'num_iter'),
             'bigr': ('cfg_schedule', 'temperature', 'num_iter', 'infer_steps', 'gumbel_temp', 'gumbel_schedule')}[kind]
  bad = [f'--{k}' for k, v in given.items() if v is not None and k not in allowed]
  if kind == 'bigr' and top_k is not None:
    bad.append('--top_k')
  if bad:
    raise ValueError(f'{", ".join(bad)} do not apply to {kind.upper()} models')
  opts = {k: v for k, v in given.items() if v is not None}
  if kind == 'var':
    opts = {**VAR_DEFAULTS, 'more_smooth': bool(more_smooth), **opts}
    opts.update({k: v for k, v in (('cfg', cfg), ('top_k', top_k)) if v is not None})
  elif kind == 'elm':
    opts = {**ELM_DEFAULTS, **opts, **{k: v for k, v in (('cfg', cfg), ('top_k', top_k)) if v is not None}}
  else:
    opts.update({'cfg': cfg} if cfg is not None else {})
  return opts


def write_npz(out_dir: str, labels: List[int]) -> str:
  """``samples.npz`` (``arr_0``: uint8 NHWC) built from the PNGs on disk (the uint8 round trip is part of the FID
  protocol): exactly what OpenAI's evaluator reads. Written atomically."""
  import numpy as np
  from PIL import Image
  paths = [os.path.join(out_dir, image_name(i, l)) for i, l in enumerate(labels)]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f'{out_dir}: {len(missing)} of {len(paths)} samples are missing (first: {missing[0]}); '
                            f'rerun the sampling to complete the set')
  arr = np.stack([np.asarray(Image.open(p).convert('RGB')) for p in paths])
  path = os.path.join(out_dir, 'samples.npz')
  np.savez(path + '.tmp.npz', arr_0=arr)
  os.replace(path + '.tmp.npz', path)
  return path


def run(pipe, labels: List[int], seed: int, cfg: Optional[float], top_k: Optional[int], top_p: Optional[float],
        more_smooth: bool, batch_size: int, dtype: str, out: Optional[str] = None, out_dir: Optional[str] = None,
        grid_cols: int = 8, shard_index: int = 0, shard_count: int = 1, write_outputs: bool = True,
        options: Optional[Dict[str, Any]] = None):
  """Sample ``labels`` and write the grid and/or the per-image PNGs + npz. Returns the number of new images.

  ``cfg``/``top_k``/``top_p``/``more_smooth`` (None: the family's default) and ``options`` (ELM/BiGR settings, see
  ``sampling_options``) go to ``pipe.sample``.

  ``shard_index``/``shard_count``: sample only images ``i % shard_count == shard_index`` (one share per process of a
  multi-host job writing to a shared folder); ``write_outputs=False`` skips the grid and npz (written once, by one
  process, after all shares are done)."""
  import jax.numpy as jnp
  import numpy as np
  from PIL import Image
  if not out and not out_dir:
    raise ValueError('give --out (a grid PNG) and/or --out_dir (one PNG per image + npz)')
  jdtype = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
  opts = sampling_options(model_kind(pipe), cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth,
                          **(options or {}))
  total = len(labels)
  todo = list(range(shard_index, total, shard_count))
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    todo = [i for i in todo if not os.path.exists(os.path.join(out_dir, image_name(i, labels[i])))]
    n_mine = len(range(shard_index, total, shard_count))
    if len(todo) < n_mine:
      print(f'{out_dir}: {n_mine - len(todo)} of {n_mine} images exist already; sampling the other {len(todo)}')
  grid_imgs = {}
  t0 = time.time()
  for start in range(0, len(todo), batch_size):
    ids = todo[start:start + batch_size]
    imgs, _ = pipe.sample([labels[i] for i in ids], seed, batch_size=batch_size, dtype=jdtype, sample_ids=ids,
                          **opts)
    u8 = to_uint8(imgs)
    for i, im in zip(ids, u8):
      if out_dir:
        path = os.path.join(out_dir, image_name(i, labels[i]))
        Image.fromarray(im).save(path + '.tmp.png')
        os.replace(path + '.tmp.png', path)       # a killed run never leaves a truncated PNG
      if out:
        grid_imgs[i] = im
    _progress(min(start + batch_size, len(todo)), len(todo), t0, min(start + batch_size, len(todo)))
  if todo:
    sys.stderr.write('\n')
  if not write_outputs:
    return len(todo)
  if out:
    if len(grid_imgs) < total:   # grid of a resumed run: read the existing PNGs back
      for i in range(total):
        if i not in grid_imgs:
          grid_imgs[i] = np.asarray(Image.open(os.path.join(out_dir, image_name(i, labels[i]))).convert('RGB'))
    arr = np.stack([grid_imgs[i] for i in range(total)])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    labelled_grid(arr, labels, grid_cols).save(out)
    print(f'wrote {out} ({total} images)')
  if out_dir:
    write_npz(out_dir, labels)
    print(f'wrote {total} PNGs and samples.npz to {out_dir}')
  return len(todo)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from var_jax.interop.state_dict import CheckpointMismatchError
  try:
    pipe = load_pipeline(FLAGS.vae_ckpt, FLAGS.var_ckpt, FLAGS.checkpoint, FLAGS.patch_nums, model=FLAGS.model,
                         bae_ckpt=FLAGS.bae_ckpt, model_ckpt=FLAGS.model_ckpt,
                         model_args=parse_model_args(FLAGS.model_args))
    labels = sample_plan(num_classes(pipe), FLAGS.classes, FLAGS.num_per_class)
    extra = {k: getattr(FLAGS, k) for k in ('cfg_schedule', 'temperature', 'num_iter', 'infer_steps', 'gumbel_temp',
                                            'gumbel_schedule')}
    run(pipe, labels, FLAGS.seed, FLAGS.cfg, FLAGS.top_k, FLAGS.top_p, FLAGS.more_smooth, FLAGS.batch_size,
        FLAGS.dtype, FLAGS.out, FLAGS.out_dir, FLAGS.grid_cols, options=extra)
  except (FileNotFoundError, ValueError, CheckpointMismatchError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
