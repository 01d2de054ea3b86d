"""The one optimizer factory of every task: global-norm clipping -> Adam moments -> decoupled weight decay (a
schedule, on a decay mask) -> -lr(step). The schedules are the reference VAR's ``lr_wd_annealing`` ('lin0', 'lin',
'lin00', 'lin<T>', 'cos') plus 'constant' (after warmup), with a linear warmup from ``warmup_start`` x the peak;
weight decay follows a cosine from ``weight_decay`` to ``weight_decay_end`` (-1: constant). Every number comes from
the task's optimizer config (``config.optim``; the tokenizer's ``optim_g`` / ``optim_d``).

Peak lr: ``base_lr x global_batch / lr_batch_ref`` for configs with ``base_lr`` (VAR, the reference's linear
scaling), else the absolute ``lr`` (ELM, BiGR, tokenizers: neither reference scales it).
Clipping: optax scales the gradients only when their norm exceeds ``grad_clip``; torch's ``clip_grad_norm_`` always
multiplies by ``min(1, max / (norm + 1e-6))`` — equal up to that 1e-6.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional, Sequence, Union

import jax.numpy as jnp
import optax
from flax import traverse_util

# The reference's no-decay rule: 1-D parameters, biases, and these name fragments (train.py ``nowd_keys``).
# Note the reference *does* decay the class embedding (its name matches none of them); add 'class_emb' to
# ``optim.nowd_keys`` to exclude it.
REFERENCE_NOWD_KEYS = ('cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start',
                       'start_pos', 'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul')
SCHEDULES = ('constant', 'cos', 'lin', 'lin0', 'lin00', 'lin<T>')


def decay_mask(params, nowd_keys: Sequence[str] = REFERENCE_NOWD_KEYS):
  """True where weight decay applies: ndim > 1, not a bias, and no no-decay key in the parameter's path."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, p in flat.items():
    name = '/'.join(path)
    out[path] = bool(p.ndim > 1 and path[-1] != 'bias' and not any(k in name for k in nowd_keys))
  return traverse_util.unflatten_dict(out)


def check_schedule(schedule: str, what: str = 'optim.schedule'):
  if schedule in ('constant', 'cos', 'lin', 'lin0', 'lin00') or re.fullmatch(r'lin[0-9.]+', schedule):
    return
  raise ValueError(f'{what}={schedule!r}: expected one of {", ".join(SCHEDULES)}')


def lr_factor(step, warmup_steps: float, total_steps: int, schedule: str = 'lin0', warmup_start: float = 0.005,
              end_ratio: float = 0.01):
  """The multiplier of the peak lr at iteration ``step`` (jnp, traceable): the reference ``lr_wd_annealing``."""
  check_schedule(schedule)
  step = jnp.asarray(step, jnp.float32)
  wp = float(round(warmup_steps))
  warm = warmup_start + (1 - warmup_start) * step / max(wp, 1.0)
  pasd = (step - wp) / max(total_steps - 1 - wp, 1.0)
  rest = 1 - pasd
  wpe = end_ratio
  if schedule == 'constant':
    after = jnp.ones_like(step)
  elif schedule == 'cos':
    after = wpe + (1 - wpe) * (0.5 + 0.5 * jnp.cos(math.pi * pasd))
  elif schedule in ('lin', 'lin0'):
    t = 0.15 if schedule == 'lin' else 0.05
    after = jnp.where(pasd < t, 1.0, wpe + (1 - wpe) * rest / (1 - t))
  elif schedule == 'lin00':
    after = wpe + (1 - wpe) * rest
  else:
    t = float(schedule[3:])
    mid = (1 + wpe + (1 - wpe) * (1 - t)) / 2
    after = jnp.where(pasd < t, 1 + (mid - 1) * pasd / t, wpe + (mid - wpe) * rest / (1 - t))
  return jnp.where(step < wp, warm, after)


def wd_value(step, total_steps: int, wd: float, wd_end: float):
  """Cosine from wd to wd_end over training (the reference)."""
  pasd = jnp.asarray(step, jnp.float32) / max(total_steps - 1, 1)
  return wd_end + (wd - wd_end) * (0.5 + 0.5 * jnp.cos(math.pi * pasd))


def peak_lr(optim_cfg, global_batch_size: int) -> float:
  """``base_lr x global_batch / lr_batch_ref`` (VAR's linear scaling) for configs with ``base_lr``, else ``lr``."""
  if 'base_lr' in optim_cfg:
    return float(optim_cfg.base_lr) * global_batch_size / float(optim_cfg.lr_batch_ref)
  return float(optim_cfg.lr)


def lr_schedule(optim_cfg, global_batch_size: int, total_steps: int, warmup_steps: float) -> Callable[[Any], Any]:
  lr0 = peak_lr(optim_cfg, global_batch_size)
  check_schedule(str(optim_cfg.schedule))
  return lambda s: lr0 * lr_factor(s, warmup_steps, total_steps, str(optim_cfg.schedule),
                                   float(optim_cfg.warmup_start), float(optim_cfg.end_ratio))


def make_optimizer(optim_cfg, global_batch_size: int, total_steps: int, warmup_steps: float,
                   mask: Union[None, Any, Callable[[Any], Any]] = 'reference') -> optax.GradientTransformation:
  """clip(global norm) -> Adam moments -> masked decoupled weight decay (scheduled) -> -lr(step).

  ``mask``: 'reference' (VAR's rule, ``decay_mask`` with ``optim.nowd_keys``), a tree of bools, a callable
  params -> tree of bools, or None (decay every parameter, as ``optax.adamw``)."""
  o = optim_cfg
  wd, wd_end = float(o.weight_decay), float(o.weight_decay_end)
  wd_end = wd if wd_end < 0 else wd_end
  if isinstance(mask, str):
    nowd = tuple(o.nowd_keys)
    mask = lambda p: decay_mask(p, nowd)
  elif mask is not None and not callable(mask):
    tree = mask
    mask = lambda _: tree
  parts = []
  if o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(o.grad_clip)))
  parts += [
      optax.scale_by_adam(b1=float(o.b1), b2=float(o.b2), eps=float(o.eps)),
      optax.add_decayed_weights(lambda s: wd_value(s, total_steps, wd, wd_end), mask=mask),
      optax.scale_by_learning_rate(lr_schedule(o, global_batch_size, total_steps, warmup_steps)),
  ]
  return optax.chain(*parts)
