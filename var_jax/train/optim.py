"""The one optimizer factory of every task: global-norm clipping -> Adam moments -> decoupled weight decay (a
schedule, on a decay mask) -> -lr(step). The schedules are the reference VAR's ``lr_wd_annealing`` ('lin0', 'lin',
'lin00', 'lin<T>', 'cos', 'exp') plus 'constant' (after warmup), with a linear warmup from ``warmup_start`` x the
peak; weight decay follows a cosine from ``weight_decay`` to ``weight_decay_end`` (-1: constant). Every number comes
from the task's optimizer config (``config.optim``; the tokenizer's ``optim_g`` / ``optim_d``).

Schedule unit (``optim.schedule_unit``): 'step' (default) evaluates the schedules at the optimizer step; with
'micro_batch' (the reference's counting under gradient accumulation: ``train.py`` sets lr/wd at every micro-batch
iteration ``g_it`` and steps the optimizer when ``(g_it + 1) % ac == 0``) optimizer step ``s`` uses the lr/wd of
iteration ``(s + 1) x accum - 1`` (its last micro-batch), and ``total_steps`` / ``warmup_steps`` passed here are
micro-batch iterations. The two are the same with ``accum == 1``.

fp16: ``dynamic_loss_scale`` wraps the optimizer with torch's ``GradScaler`` rule as the reference uses it
(``utils/amp_sc.py``: init 2^11, x2 after 1000 finite steps, x0.5 and skip on a non-finite gradient, a scale above
2^15 is set back to 2^15 after its step); the scale lives in the optimizer state (checkpointed, replicated).

Peak lr: ``base_lr x global_batch / lr_batch_ref`` for configs with ``base_lr`` (VAR, the reference's linear
scaling), else the absolute ``lr`` (ELM, BiGR, tokenizers: neither reference scales it).
Clipping: optax scales the gradients only when their norm exceeds ``grad_clip``; torch's ``clip_grad_norm_`` always
multiplies by ``min(1, max / (norm + 1e-6))`` — equal up to that 1e-6.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

# The reference's no-decay rule: 1-D parameters, biases, and these name fragments (train.py ``nowd_keys``).
# Note the reference *does* decay the class embedding (its name matches none of them); add 'class_emb' to
# ``optim.nowd_keys`` to exclude it.
REFERENCE_NOWD_KEYS = ('cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start',
                       'start_pos', 'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul')
SCHEDULES = ('constant', 'cos', 'exp', 'lin', 'lin0', 'lin00', 'lin<T>')
SCHEDULE_UNITS = ('step', 'micro_batch')


def decay_mask(params, nowd_keys: Sequence[str] = REFERENCE_NOWD_KEYS):
  """True where weight decay applies: ndim > 1, not a bias, and no no-decay key in the parameter's path."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, p in flat.items():
    name = '/'.join(path)
    out[path] = bool(p.ndim > 1 and path[-1] != 'bias' and not any(k in name for k in nowd_keys))
  return traverse_util.unflatten_dict(out)


def check_schedule(schedule: str, what: str = 'optim.schedule'):
  if schedule in ('constant', 'cos', 'exp', 'lin', 'lin0', 'lin00') or re.fullmatch(r'lin[0-9.]+', schedule):
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
  elif schedule == 'exp':
    t = 0.15
    after = jnp.where(pasd < t, 1.0, jnp.exp((pasd - t) / (1 - t) * math.log(wpe)))
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


def schedule_unit(optim_cfg) -> str:
  unit = str(optim_cfg.get('schedule_unit', 'step'))
  if unit not in SCHEDULE_UNITS:
    raise ValueError(f'optim.schedule_unit={unit!r}: expected one of {", ".join(SCHEDULE_UNITS)}')
  return unit


def schedule_iteration(step, accum: int = 1):
  """The schedule iteration optimizer step ``step`` uses: ``(step + 1) x accum - 1``, its last micro-batch (the
  reference's ``g_it`` at which ``(g_it + 1) % ac == 0``); ``accum == 1``: the step itself."""
  return step if accum == 1 else (step + 1) * accum - 1


def lr_schedule(optim_cfg, global_batch_size: int, total_steps: int, warmup_steps: float, *,
                schedule: Optional[str] = None, accum: int = 1) -> Callable[[Any], Any]:
  """optimizer step -> lr. ``schedule`` overrides ``optim.schedule`` (VAR derives 'lin<pg>' under progressive
  training); ``accum`` > 1: the schedule counts micro-batch iterations (``schedule_iteration``), and
  ``total_steps`` / ``warmup_steps`` are in those iterations."""
  lr0 = peak_lr(optim_cfg, global_batch_size)
  name = str(optim_cfg.schedule if schedule is None else schedule)
  check_schedule(name)
  return lambda s: lr0 * lr_factor(schedule_iteration(s, accum), warmup_steps, total_steps, name,
                                   float(optim_cfg.warmup_start), float(optim_cfg.end_ratio))


def make_optimizer(optim_cfg, global_batch_size: int, total_steps: int, warmup_steps: float,
                   mask: Union[None, Any, Callable[[Any], Any]] = 'reference', *, schedule: Optional[str] = None,
                   accum: int = 1, loss_scale: Optional[Any] = None) -> optax.GradientTransformation:
  """clip(global norm) -> Adam moments -> masked decoupled weight decay (scheduled) -> -lr(step).

  ``mask``: 'reference' (VAR's rule, ``decay_mask`` with ``optim.nowd_keys``), a tree of bools, a callable
  params -> tree of bools, or None (decay every parameter, as ``optax.adamw``). ``schedule`` / ``accum``: see
  ``lr_schedule`` (lr and wd are both evaluated at ``schedule_iteration(step, accum)``). ``loss_scale``: a
  mapping of ``dynamic_loss_scale``'s arguments (fp16) to wrap the optimizer with, or None."""
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
      optax.add_decayed_weights(lambda s: wd_value(schedule_iteration(s, accum), total_steps, wd, wd_end),
                                mask=mask),
      optax.scale_by_learning_rate(lr_schedule(o, global_batch_size, total_steps, warmup_steps, schedule=schedule,
                                               accum=accum)),
  ]
  tx = optax.chain(*parts)
  if loss_scale is not None:
    tx = dynamic_loss_scale(tx, **dict(loss_scale))
  return tx


# ----------------------------------------------------------------------------- fp16 dynamic loss scaling
class LossScaleState(NamedTuple):
  scale: Any            # float32 scalar: the loss is multiplied by it before differentiation
  growth_tracker: Any   # int32 scalar: consecutive finite steps since the last change (torch's _growth_tracker)
  inner: Any            # the wrapped optimizer's state


# Optimizer-state parts that count schedule iterations: they advance on a skipped step too (the reference sets
# lr / wd from its iteration counter whether or not the scaler skips), unlike Adam's moments and its count.
_SCHEDULE_COUNTERS = ('ScaleByScheduleState', 'WeightDecaySchedule')   # optax's class names


def dynamic_loss_scale(inner: optax.GradientTransformation, init: float = 2.0 ** 11, growth_interval: int = 1000,
                       growth_factor: float = 2.0, backoff_factor: float = 0.5,
                       max: float = 2.0 ** 15) -> optax.GradientTransformation:   # pylint: disable=redefined-builtin
  """``inner`` on gradients of ``loss x scale``: unscale (x 1/scale), then, if every gradient is finite, the
  inner update, else a zero update with the inner state kept (its schedule counters still advance) — torch's
  ``GradScaler.step``. The scale then follows ``GradScaler.update``: x ``backoff_factor`` on a non-finite step,
  x ``growth_factor`` after ``growth_interval`` consecutive finite ones (if the result is finite); and, as the
  reference's ``AmpOptimizer``, a step taken with a scale above ``max`` sets it to ``max`` instead (fp16 overflows
  above 65504)."""
  init, gf, bf, mx, interval = float(init), float(growth_factor), float(backoff_factor), float(max), \
      int(growth_interval)

  def init_fn(params):
    return LossScaleState(jnp.asarray(init, jnp.float32), jnp.zeros((), jnp.int32), inner.init(params))

  def update_fn(grads, state, params=None):
    inv = 1.0 / state.scale
    grads = jax.tree.map(lambda g: g * inv.astype(g.dtype), grads)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    updates, new_inner = inner.update(grads, state.inner, params)
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    is_counter = lambda x: type(x).__name__ in _SCHEDULE_COUNTERS
    new_inner = jax.tree.map(lambda n, o: n if is_counter(n) else jnp.where(finite, n, o), new_inner, state.inner,
                             is_leaf=is_counter)
    succ = state.growth_tracker + 1
    grown = state.scale * gf
    grow = jnp.logical_and(succ >= interval, jnp.isfinite(grown))
    scale = jnp.where(finite, jnp.where(grow, grown, state.scale), state.scale * bf)
    tracker = jnp.where(finite, jnp.where(succ >= interval, 0, succ), 0)
    capped = state.scale > mx       # torch: update(new_scale=max) leaves the growth tracker as it was
    scale = jnp.where(capped, jnp.float32(mx), scale).astype(jnp.float32)
    tracker = jnp.where(capped, state.growth_tracker, tracker).astype(jnp.int32)
    return updates, LossScaleState(scale, tracker, new_inner)

  return optax.GradientTransformation(init_fn, update_fn)


def loss_scale_of(opt_state) -> Optional[Any]:
  """The current loss scale of a ``dynamic_loss_scale`` optimizer state, else None (no scaling)."""
  return opt_state.scale if isinstance(opt_state, LossScaleState) else None
