r"""Scaling-law demo: the quickstart (digits, tiny tokenizer) with the model size set by one number, the depth.

  python -m var_jax.train --config=configs/scaling_sweep.py:4 --workdir=/tmp/var_scaling/d4
  launch/scaling_sweep.sh            # depths 2..6 one after another, then `python -m var_jax.scaling`

VAR's rule ties width and heads to depth (width = 64 * depth, heads = depth); here the width is halved
(32 * depth, 32 channels per head) so that depths 2..6 each train on a 2-core CPU in about a minute or two. Every
depth sees the same data, batch and schedule; the eval split is evaluated a few times during training (points
for the loss-vs-compute frontier) and at the last step (the final test loss / error rate for loss-vs-size).
``launch/scaling_sweep.sh`` gives it a trained tokenizer (the main job's, ``configs/digits.py``, or one it trains
first); alone, the tokenizer is the quickstart's random-init VQVAE unless ``--config.vae_ckpt`` names one (fine for
exercising the machinery, not for quotable exponents).
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_quickstart', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'quickstart.py'))
quickstart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quickstart)   # configs are loaded by path (--config=configs/x.py), not as a package

DEFAULT_DEPTH = 4
WIDTH_PER_DEPTH = 32   # VAR: 64
DIGITS_TRAIN = 1500    # images in the digits train split
EVALS_PER_RUN = 6      # eval points per run along its training curve (the last one at the final step)


def get_config(arg=None):
  """``arg``: the depth (``--config=configs/scaling_sweep.py:6``); default 4."""
  depth = int(arg) if arg not in (None, '') else DEFAULT_DEPTH
  if depth < 1:
    raise ValueError(f'scaling_sweep: depth must be >= 1, got {depth}')
  c = quickstart.get_config()
  c.model.update(depth=depth, embed_dim=WIDTH_PER_DEPTH * depth, num_heads=depth)
  c.global_batch_size = 64
  c.epochs = 8.0                      # 1500 train images / 64 -> 24 steps per epoch, 192 steps
  c.optim.update(base_lr=4e-3, warmup_epochs=0.25)   # lr 1e-3: half the quickstart's, for the widest depths
  c.log_every = 10
  steps = int(round(c.epochs * -(-DIGITS_TRAIN // c.global_batch_size)))
  c.eval_every = max(steps // EVALS_PER_RUN, 1)   # and at the last step (the trainer always evaluates there)
  c.eval_batches = -1                 # the whole val split (297 images)
  c.ckpt_every = 10 ** 9              # only the final checkpoint (forced at the last step)
  c.keep_ckpts = 1
  c.sample_every = 0                  # no sample grids: the demo is about the loss
  return c
