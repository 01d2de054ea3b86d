"""One validation of a whole training config, before any work (no lock, no workdir file, no data read, no compile).

``validate(config)`` walks every leaf of the config tree and checks it against ``RULES``: a table of (glob over the
dotted key, rule), the first matching pattern deciding. A rule states the type and the allowed values (a range, a set
of names, or a tuple of positive ints); every numeric leaf must at least be finite (the last rule). Then the relations
between fields: the generic ones in ``RELATIONS`` (batch vs devices, processes and accumulation; widths vs heads;
sample classes vs the class count; total_steps vs epochs; the data source's required fields) and each task's own
(``TASK_CHECKS``: its model configs built and checked against each other and the data, e.g. patch_nums vs the image
size). Each failure is one ``ConfigError`` line: ``config.<key>=<value>: <what is allowed>``.

Adding a config field: it is checked by the first pattern it matches (often a generic one: ``*.depth``, ``*_every``,
``*dropout*``); add a row when none says what it may be.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

from var_jax.train import errors

DTYPES = ('float32', 'bfloat16', 'float16')


@dataclasses.dataclass(frozen=True)
class Num:
  """An int (``integer``) or a real number in [lo, hi] (``open_lo`` / ``open_hi``: excluded), or one of ``also``.
  ``optional``: None allowed."""
  lo: Optional[float] = None
  hi: Optional[float] = None
  integer: bool = False
  open_lo: bool = False
  open_hi: bool = False
  also: Tuple[float, ...] = ()
  optional: bool = False

  def allowed(self) -> str:
    what = 'an integer' if self.integer else 'a finite number'
    if self.lo is not None and self.hi is not None:
      rng = f'in {"(" if self.open_lo else "["}{self.lo:g}, {self.hi:g}{")" if self.open_hi else "]"}'
    elif self.lo is not None:
      rng = f'{">" if self.open_lo else ">="} {self.lo:g}'
    elif self.hi is not None:
      rng = f'{"<" if self.open_hi else "<="} {self.hi:g}'
    else:
      rng = ''
    out = f'{what} {rng}'.strip()
    if self.also:
      out += ' or ' + ' or '.join(f'{a:g}' for a in self.also)
    return out + (' (or None)' if self.optional else '')

  def error(self, v) -> Optional[str]:
    if v is None:
      return None if self.optional else self.allowed()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      return self.allowed()
    if self.integer and not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
      return self.allowed()
    if not math.isfinite(v):
      return self.allowed()
    if v in self.also:
      return None
    if self.lo is not None and (v < self.lo or (self.open_lo and v == self.lo)):
      return self.allowed()
    if self.hi is not None and (v > self.hi or (self.open_hi and v == self.hi)):
      return self.allowed()
    return None


@dataclasses.dataclass(frozen=True)
class OneOf:
  choices: Tuple[Any, ...]

  def error(self, v) -> Optional[str]:
    return None if v in self.choices else 'one of ' + ', '.join(repr(c) for c in self.choices)


@dataclasses.dataclass(frozen=True)
class Ints:
  """A tuple of ints >= ``lo`` (``increasing``: strictly; ``nonempty``)."""
  lo: int = 1
  increasing: bool = False
  nonempty: bool = True

  def error(self, v) -> Optional[str]:
    what = (f'a {"non-empty " if self.nonempty else ""}tuple of integers >= {self.lo}'
            f'{", strictly increasing" if self.increasing else ""}')
    if not isinstance(v, (tuple, list)) or (self.nonempty and not v):
      return what
    if any(isinstance(x, bool) or not isinstance(x, int) or x < self.lo for x in v):
      return what
    if self.increasing and any(b <= a for a, b in zip(v, v[1:])):
      return what
    return None


@dataclasses.dataclass(frozen=True)
class Schedule:
  def error(self, v) -> Optional[str]:
    from var_jax.train import optim
    try:
      optim.check_schedule(v)
    except ValueError:
      return 'one of ' + ', '.join(optim.SCHEDULES)
    return None


@dataclasses.dataclass(frozen=True)
class Said:
  """``rule`` with its failure worded as ``text`` (instead of 'expected ...')."""
  rule: Any
  text: str

  def error(self, v) -> Optional[str]:
    return None if self.rule.error(v) is None else '\0' + self.text


@dataclasses.dataclass(frozen=True)
class Any_:
  def error(self, v) -> Optional[str]:
    return None


FINITE = Num()
POS_INT = Num(1, integer=True)
NONNEG_INT = Num(0, integer=True)
NONNEG = Num(0)
POSITIVE = Num(0, open_lo=True)
FRACTION = Num(0, 1)                         # [0, 1]
RATE = Num(0, 1, open_hi=True)               # [0, 1): a probability that must leave something
OFF_OR_NONNEG = Num(0, also=(-1,))           # -1: the default / derived value
LR = Num(0, open_lo=True)                    # > 0 and finite (a negative or zero rate is never meant)

# (glob over the dotted key, rule); the first match decides
RULES: List[Tuple[str, Any]] = [
    # ---- the run
    ('task', OneOf(('var', 'tokenizer', 'elm_ar', 'elm_mlm', 'bigr'))),
    ('tokenizer', OneOf(('vqvae', 'bae'))),
    ('seed', Said(Num(0, 2 ** 32 - 1, integer=True), 'outside [0, 2^32): PRNG seeds are 32 bits (larger seeds would '
                                                     'repeat smaller ones)')),
    ('global_batch_size', POS_INT),
    ('grad_accum', POS_INT),
    ('epochs', NONNEG),
    ('total_steps', Said(Num(1, integer=True, also=(-1,)), 'give -1 (train config.epochs epochs) or a positive step '
                                                           'count (0 is not \'no training\')')),
    ('log_every', POS_INT),
    ('ckpt_every', POS_INT),
    ('keep_ckpts', NONNEG_INT),              # 0: keep every checkpoint
    ('eval_batches', Num(1, integer=True, also=(-1,))),
    ('ema.every', POS_INT),
    ('*_every', NONNEG_INT),                 # eval_every, sample_every, restart_every: 0 = off
    ('quality_per_class', NONNEG_INT),
    ('label_smoothing', RATE),
    ('dtype', OneOf(DTYPES)),
    ('*_dtype', OneOf(DTYPES)),
    ('nonfinite', OneOf(('stop', 'skip'))),
    ('bae_bits', OneOf(('bernoulli', 'threshold'))),
    ('train_bits', OneOf(('bernoulli', 'threshold'))),
    ('hm_dist', NONNEG),
    ('sample_classes', Ints(0, nonempty=False)),
    ('mesh.*', Num(1, integer=True, also=(-1,))),
    # ---- optimizers (optim, optim_g, optim_d)
    ('optim*.base_lr', LR),
    ('optim*.lr', LR),
    ('optim*.b1', RATE),
    ('optim*.b2', RATE),
    ('optim*.eps', POSITIVE),
    ('optim*.weight_decay', NONNEG),
    ('optim*.weight_decay_end', OFF_OR_NONNEG),
    ('optim*.schedule', Schedule()),
    ('optim*.schedule_unit', OneOf(('step', 'micro_batch'))),
    ('optim*.warmup_epochs', OFF_OR_NONNEG),
    ('optim*.warmup_steps', NONNEG),
    ('optim*.warmup_start', FRACTION),
    ('optim*.end_ratio', FRACTION),
    ('optim*.grad_clip', NONNEG),            # 0: no clipping
    ('optim*.lr_batch_ref', POS_INT),
    ('optim.loss_scale.growth_interval', POS_INT),
    ('optim.loss_scale.growth_factor', Num(1, open_lo=True)),
    ('optim.loss_scale.backoff_factor', Num(0, 1, open_lo=True, open_hi=True)),
    ('optim.loss_scale.*', POSITIVE),
    ('optim*.nowd_keys', Any_()),
    ('ema.decay', RATE),
    ('ema.start', NONNEG_INT),
    ('progressive.fraction', FRACTION),
    ('progressive.start_stage', NONNEG_INT),
    ('progressive.warmup_epochs', OFF_OR_NONNEG),
    # ---- data
    ('data.name', OneOf(('digits', 'folder', 'tfds'))),
    ('data.train_crop', OneOf(('random', 'center'))),
    ('data.image_size', POS_INT),
    ('data.mid_reso', Num(1)),
    ('data.num_workers', NONNEG_INT),
    ('data.max_skip_fraction', FRACTION),
    ('data.*', POS_INT),                     # buffer sizes, threads (numeric leaves only; strings are paths)
    # ---- sampling settings of the periodic grids
    ('sample.cfg', NONNEG),
    ('sample.top_k', NONNEG_INT),
    ('sample.top_p', FRACTION),
    ('sample.temperature', POSITIVE),
    ('sample.*', POS_INT),                   # num_iter, infer_steps
    # ---- tokenizer losses, discriminator, codebook
    ('loss.disc_loss', OneOf(('hinge', 'vanilla'))),
    ('loss.disc_start', NONNEG_INT),
    ('loss.disc_weight_max', POSITIVE),
    ('loss.*', NONNEG),                      # loss weights (0: off)
    ('disc.norm', OneOf(('batch', 'group', 'none'))),
    ('disc.*', POS_INT),
    ('codebook.restart_every', NONNEG_INT),
    # ---- models (VAR / VQVAE / ELM / BiGR / BAE): by what a field is
    ('*.patch_nums', Ints(1, increasing=True)),
    ('*.ch_mult', Ints(1)),
    ('*.attn_resolutions', Ints(1, nonempty=False)),
    ('*.n_kv_head', Num(1, integer=True, optional=True)),
    ('*.ffn_dim_multiplier', Num(0, open_lo=True, optional=True)),
    ('*.share_quant_resi', NONNEG_INT),
    ('*.default_qresi_counts', NONNEG_INT),
    ('*.pause_num', NONNEG_INT),
    ('*.mask_schstep', NONNEG_INT),
    ('*.mask_ratio_*', FRACTION),
    ('*drop*', RATE),                        # drop_rate, drop_path_rate, *_dropout_p, class_dropout_prob, dropout
    ('*.smoothing', RATE),
    ('*_prob', RATE),
    ('*.quant_resi', FRACTION),
    ('*.beta', NONNEG),
    ('*.focal', NONNEG),
    ('*.aux', NONNEG),
    ('*.alpha', Num(0, 1, also=(-1,))),
    ('*.init_std', Num(0, also=(-1,))),
    ('*.init_*', FINITE),
    ('*.initializer_range', NONNEG),
    ('*.mlp_ratio', POSITIVE),
    ('*.norm_eps', POSITIVE),
    ('*.sample_temperature', POSITIVE),
    ('*.rope_base', POSITIVE),
    ('*.quant_conv_ks', POS_INT),
    ('model.*', POS_INT),                    # depth, widths, heads, vocab, classes, lengths, steps, ... (ints)
    ('vae.*', POS_INT),
    ('bae.*', POS_INT),
    ('*', FINITE),                           # anything else numeric: finite
]


def _leaves(cfg, prefix=''):
  for k in cfg.keys():
    v = cfg[k]
    if hasattr(v, 'keys'):
      yield from _leaves(v, f'{prefix}{k}.')
    else:
      yield prefix + k, v


def rule_for(key: str):
  for pattern, rule in RULES:
    if fnmatch.fnmatchcase(key, pattern):
      return pattern, rule
  return None, None


def _governs(rule, v) -> bool:
  """A numeric pattern (``model.*``) says nothing about a bool, string or tuple leaf it also matches (e.g.
  ``model.remat``, ``model.attn_impl``): those are typed by ml_collections and read by their task."""
  if isinstance(rule, Said):
    return _governs(rule.rule, v)
  if isinstance(rule, Num):
    return (v is None and rule.optional) or (isinstance(v, (int, float)) and not isinstance(v, bool))
  if isinstance(rule, Ints):
    return isinstance(v, (tuple, list))
  return True


def fail(key: str, value, allowed: str):
  raise errors.ConfigError(f'config.{key}={value!r}: {allowed}')


def check_leaves(config):
  """Every leaf against ``RULES`` (the first failure raised)."""
  for key, v in _leaves(config):
    _, rule = rule_for(key)
    if rule is None or not _governs(rule, v):
      continue
    why = rule.error(v)
    if why is not None:
      fail(key, v, why[1:] if why.startswith('\0') else f'expected {why}')


# ----------------------------------------------------------------------------- relations
def _batch(config):
  import jax
  from var_jax import sharding as shd
  b, accum, procs = int(config.global_batch_size), int(config.grad_accum), jax.process_count()
  if b % (procs * accum):
    fail('global_batch_size', b, f'must divide into {procs} process(es) x grad_accum={accum} micro-batches')
  try:
    shape = dict(zip(shd.MESH_AXES, shd.mesh_shape(config.mesh.to_dict(), jax.device_count())))
  except ValueError as e:
    raise errors.ConfigError(f'config.mesh={config.mesh.to_dict()}: {e}') from None
  n = shape['data'] * shape['fsdp']
  if b % n:
    fail('global_batch_size', b, f'must be a multiple of the mesh\'s data x fsdp = {n} ({jax.device_count()} '
         f'devices, mesh {shape})')


def _schedule(config):
  if int(config.total_steps) == -1 and not float(config.epochs) > 0:
    fail('epochs', config.epochs, 'must be > 0 when config.total_steps=-1 (the epochs decide the run\'s length); or '
         'give total_steps > 0')


def _heads(config):
  if 'model' not in config:
    return
  m = config.model
  for width, heads in (('embed_dim', 'num_heads'), ('dim', 'n_head')):
    if width in m and heads in m and int(m[width]) % int(m[heads]):
      fail(f'model.{width}', m[width], f'must be a multiple of model.{heads}={m[heads]}')


def _classes(config):
  if 'model' not in config or 'num_classes' not in config.model or 'sample_classes' not in config:
    return
  n = int(config.model.num_classes)
  bad = [c for c in config.sample_classes if not 0 <= int(c) < n]
  if bad:
    fail('sample_classes', tuple(config.sample_classes), f'entries must be class labels in [0, {n}) '
         f'(model.num_classes={n}); {bad[0]} is not')


def _data(config):
  d = config.data
  if d.name == 'folder' and not d.path:
    fail('data.path', d.path, "data.name='folder' needs the root holding <train_split>/<class>/<images>")
  if d.name == 'tfds' and not d.tfds_name:
    fail('data.tfds_name', d.tfds_name, "data.name='tfds' needs the dataset's name")
  if 'token_cache' in d and d.token_cache and config.task != 'var':
    fail('data.token_cache', d.token_cache, f"a token cache is for task='var' (VAR on a frozen VQVAE's tokens), "
         f"this run has task={config.task!r}: set --config.data.token_cache=")


def _quality(config):
  if 'quality_per_class' not in config or 'model' not in config or 'num_classes' not in config.model:
    return
  from var_jax.train.tasks import base
  base.check_quality_config(config, int(config.model.num_classes))


RELATIONS: Sequence[Callable] = (_schedule, _batch, _heads, _classes, _data, _quality)


def _var(config):
  from var_jax.train.tasks import var
  vae_cfg, var_cfg = var.model_configs(config)
  pg = config.progressive
  if float(pg.fraction) > 0 and int(pg.start_stage) >= len(var_cfg.patch_nums):
    fail('progressive.start_stage', pg.start_stage, f'must be < the {len(var_cfg.patch_nums)} scales of '
         f'model.patch_nums')


def _tokenizer(config):
  from var_jax.train.tasks import tokenizer
  tokenizer.tokenizer_configs(config)
  if int(config.grad_accum) != 1:
    fail('grad_accum', config.grad_accum, 'expected 1: the tokenizer step does not micro-batch')


def _bits(config):
  from var_jax.train.tasks import bits
  bits.model_configs(config)


TASK_CHECKS = {'var': _var, 'tokenizer': _tokenizer, 'elm_ar': _bits, 'elm_mlm': _bits, 'bigr': _bits}


def validate(config):
  """The whole config (see the module doc); ``ConfigError`` naming the first bad key, its value and what is
  allowed. Needs JAX's process / device count (the batch split) and nothing else: call it before any work."""
  check_leaves(config)
  for rel in RELATIONS:
    rel(config)
  try:
    TASK_CHECKS[config.task](config)
  except errors.TrainingError:
    raise
  except (ValueError, TypeError, KeyError, NotImplementedError) as e:
    msg = str(e)
    raise errors.ConfigError(msg if msg.startswith('config.') or '=' in msg else f'config: {msg}') from None
