"""The reference VAR optimisation recipe as optax: AdamW(0.9, 0.95), decoupled weight decay with a cosine
schedule and a no-decay group, the 'lin0' (and 'cos', 'lin', 'lin00', 'linT') learning-rate schedules with
warmup, and global-norm gradient clipping. Every number comes from the config (``config.optim``).
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import jax.numpy as jnp
import optax
from flax import traverse_util

# The reference's no-decay rule: 1-D parameters, biases, and these name fragments (train.py ``nowd_keys``).
# Note the reference *does* decay the class embedding (its name matches none of them); add 'class_emb' to
# ``optim.nowd_keys`` to exclude it.
REFERENCE_NOWD_KEYS = ('cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start',
                       'start_pos', 'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul')


def decay_mask(params, nowd_keys: Sequence[str] = REFERENCE_NOWD_KEYS):
  """True where weight decay applies: ndim > 1, not a bias, and no no-decay key in the parameter's path."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, p in flat.items():
    name = '/'.join(path)
    out[path] = bool(p.ndim > 1 and path[-1] != 'bias' and not any(k in name for k in nowd_keys))
  return traverse_util.unflatten_dict(out)


def lr_factor(step, warmup_steps: float, total_steps: int, schedule: str = 'lin0', warmup_start: float = 0.005,
              end_ratio: float = 0.01):
  """The reference ``lr_wd_annealing`` multiplier of the peak lr at iteration ``step`` (jnp, traceable)."""
  step = jnp.asarray(step, jnp.float32)
  wp = float(round(warmup_steps))
  warm = warmup_start + (1 - warmup_start) * step / max(wp, 1.0)
  pasd = (step - wp) / max(total_steps - 1 - wp, 1.0)
  rest = 1 - pasd
  wpe = end_ratio
  if schedule == 'cos':
    after = wpe + (1 - wpe) * (0.5 + 0.5 * jnp.cos(math.pi * pasd))
  elif schedule in ('lin', 'lin0'):
    t = 0.15 if schedule == 'lin' else 0.05
    after = jnp.where(pasd < t, 1.0, wpe + (1 - wpe) * rest / (1 - t))
  elif schedule == 'lin00':
    after = wpe + (1 - wpe) * rest
  elif re.fullmatch(r'lin[0-9.]+', schedule):
    t = float(schedule[3:])
    mid = (1 + wpe + (1 - wpe) * (1 - t)) / 2
    after = jnp.where(pasd < t, 1 + (mid - 1) * pasd / t, wpe + (mid - wpe) * rest / (1 - t))
  else:
    raise ValueError(f'unknown lr schedule {schedule!r} (cos, lin, lin0, lin00, lin<T>)')
  return jnp.where(step < wp, warm, after)


def wd_value(step, total_steps: int, wd: float, wd_end: float):
  """Cosine from wd to wd_end over training (the reference)."""
  pasd = jnp.asarray(step, jnp.float32) / max(total_steps - 1, 1)
  return wd_end + (wd - wd_end) * (0.5 + 0.5 * jnp.cos(math.pi * pasd))


def peak_lr(optim_cfg, global_batch_size: int) -> float:
  """lr = base_lr x global_batch / 256 (the reference's linear scaling)."""
  return float(optim_cfg.base_lr) * global_batch_size / float(optim_cfg.get('lr_batch_ref', 256))


def make_optimizer(optim_cfg, global_batch_size: int, total_steps: int, warmup_steps: float,
                   nowd_keys: Sequence[str] = None) -> optax.GradientTransformation:
  """clip(global norm) -> Adam moments -> masked decoupled weight decay (scheduled) -> -lr(step)."""
  lr0 = peak_lr(optim_cfg, global_batch_size)
  wd, wd_end = float(optim_cfg.weight_decay), float(optim_cfg.get('weight_decay_end', -1.0))
  wd_end = wd if wd_end < 0 else wd_end
  nowd = tuple(optim_cfg.get('nowd_keys', REFERENCE_NOWD_KEYS) if nowd_keys is None else nowd_keys)
  lr = lambda s: lr0 * lr_factor(s, warmup_steps, total_steps, optim_cfg.schedule, optim_cfg.warmup_start,
                                 optim_cfg.end_ratio)
  parts = []
  if optim_cfg.grad_clip and optim_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(optim_cfg.grad_clip)))
  parts += [
      optax.scale_by_adam(b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps)),
      optax.add_decayed_weights(lambda s: wd_value(s, total_steps, wd, wd_end),
                                mask=lambda p: decay_mask(p, nowd)),
      optax.scale_by_learning_rate(lr),
  ]
  return optax.chain(*parts)


def current_lr(optim_cfg, global_batch_size, total_steps, warmup_steps, step) -> float:
  return float(peak_lr(optim_cfg, global_batch_size) * lr_factor(
      step, warmup_steps, total_steps, optim_cfg.schedule, optim_cfg.warmup_start, optim_cfg.end_ratio))
