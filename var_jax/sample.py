r"""Sample images from a VAR model: ``python -m var_jax.sample``.

Examples:
  # a labelled grid from the released weights (reference .pth or .safetensors)
  python -m var_jax.sample --vae_ckpt=vae_ch160v4096z32.pth --var_ckpt=var_d16.pth \
      --classes=207,360,387,974,88,979,417,279 --cfg=4 --top_k=900 --top_p=0.95 --out=grid.png
  # 50 per class over all classes, one PNG each + an .npz for OpenAI's FID evaluator; rerunning resumes
  python -m var_jax.sample --checkpoint=workdir/model --num_per_class=50 --out_dir=samples --batch_size=64

Every image i draws from fold_in(PRNGKey(seed), i), so a resumed run (existing PNGs are skipped) produces exactly
the images an uninterrupted one would, whatever the batch size or device count.
"""
from __future__ import annotations

import os
import sys
import time
from typing import List, Optional, Sequence

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags (defined only when run as a program, so that importing this module defines none)."""
  flags.DEFINE_string('vae_ckpt', None, 'reference-layout VQVAE weights (.pth or .safetensors)')
  flags.DEFINE_string('var_ckpt', None, 'reference-layout VAR weights (.pth or .safetensors)')
  flags.DEFINE_string('checkpoint', None, 'a var_jax model checkpoint directory (instead of --vae_ckpt/--var_ckpt)')
  flags.DEFINE_list('patch_nums', None, 'override the inferred patch_nums (comma list)')
  flags.DEFINE_list('classes', None, 'class labels to sample, e.g. 207,360 (one image each, times --num_per_class)')
  flags.DEFINE_integer('num_per_class', 1, 'images per class; with no --classes: over all classes')
  flags.DEFINE_float('cfg', 1.5, 'classifier-free guidance ratio')
  flags.DEFINE_integer('top_k', 900, 'top-k filtering (0: off)')
  flags.DEFINE_float('top_p', 0.96, 'top-p filtering (0: off)')
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


def load_pipeline(vae_ckpt=None, var_ckpt=None, checkpoint=None, patch_nums=None):
  from var_jax import VARPipeline
  if checkpoint:
    if vae_ckpt or var_ckpt:
      raise ValueError('give either --checkpoint or --vae_ckpt/--var_ckpt, not both')
    return VARPipeline.from_checkpoint(checkpoint)
  if not (vae_ckpt and var_ckpt):
    raise ValueError('give --checkpoint, or both --vae_ckpt and --var_ckpt')
  return VARPipeline.from_torch(vae_ckpt, var_ckpt, patch_nums=[int(p) for p in patch_nums] if patch_nums else None)


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


def run(pipe, labels: List[int], seed: int, cfg: float, top_k: int, top_p: float, more_smooth: bool,
        batch_size: int, dtype: str, out: Optional[str] = None, out_dir: Optional[str] = None, grid_cols: int = 8,
        shard_index: int = 0, shard_count: int = 1, write_outputs: bool = True):
  """Sample ``labels`` and write the grid and/or the per-image PNGs + npz. Returns the number of new images.

  ``shard_index``/``shard_count``: sample only images ``i % shard_count == shard_index`` (one share per process of a
  multi-host job writing to a shared folder); ``write_outputs=False`` skips the grid and npz (written once, by one
  process, after all shares are done)."""
  import jax.numpy as jnp
  import numpy as np
  from PIL import Image
  if not out and not out_dir:
    raise ValueError('give --out (a grid PNG) and/or --out_dir (one PNG per image + npz)')
  jdtype = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
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
    imgs, _ = pipe.sample([labels[i] for i in ids], seed, cfg=cfg, top_k=top_k, top_p=top_p,
                          more_smooth=more_smooth, batch_size=batch_size, dtype=jdtype, sample_ids=ids)
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
  from var_jax.interop.reference import CheckpointMismatchError
  try:
    pipe = load_pipeline(FLAGS.vae_ckpt, FLAGS.var_ckpt, FLAGS.checkpoint, FLAGS.patch_nums)
    labels = sample_plan(pipe.var_config.num_classes, FLAGS.classes, FLAGS.num_per_class)
    run(pipe, labels, FLAGS.seed, FLAGS.cfg, FLAGS.top_k, FLAGS.top_p, FLAGS.more_smooth, FLAGS.batch_size,
        FLAGS.dtype, FLAGS.out, FLAGS.out_dir, FLAGS.grid_cols)
  except (FileNotFoundError, ValueError, CheckpointMismatchError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
