r"""The reference trainer's command line (FoundationVision/VAR ``train.py``, ``utils/arg_util.py``) in our config.

``--config.reference_args='--depth=16 --bs=768 --ep=200 --fp16=1 --alng=1e-3 --wpe=0.1'`` means what that command
means to the reference: every flag it leaves out takes the reference's default (``REFERENCE_DEFAULTS``, from its
``Args``), and its conventions are translated, not copied — ``--wp=0`` is ep/50 (ours: -1), ``--twde=0`` is twd
(ours: -1), ``--pgwp=0`` is ep/300 (ours: -1), ``--pg>0`` replaces ``--sche`` by ``lin<pg>``, ``--ac`` counts the
schedule in micro-batches (``optim.schedule_unit='micro_batch'``), ``--fp16=1`` is float16 with the dynamic loss
scaler (2: bfloat16, 0: float32). The fields it sets (``FIELDS``) replace what the config file or other
``--config.*`` flags gave them; the rest (data path, mesh, tokenizer checkpoint, loop settings) stay ours. A flag
the reference does not define raises naming it (the reference itself only warns), and so does one it computes
itself (``--tlr``, ``--batch_size``, ...: its value would be overwritten there).

Applied by ``resolve(config)`` when training starts (``loop.train``, and the VAR task, idempotently).
"""
from __future__ import annotations

import copy
import logging as std_logging
import shlex
from typing import Any, Dict, Tuple

logging = std_logging.getLogger('var_jax.train')

# utils/arg_util.py ``class Args(Tap)``: the user-settable fields and their defaults (transcribed).
REFERENCE_DEFAULTS: Dict[str, Any] = dict(
    data_path='/path/to/imagenet', exp_name='text', vfast=0, tfast=0,
    depth=16, ini=-1.0, hd=0.02, aln=0.5, alng=1e-5,
    fp16=0, tblr=1e-4, twd=0.05, twde=0.0, tclip=2.0, ls=0.0,
    bs=768, ac=1, ep=250, wp=0.0, wp0=0.005, wpe=0.01, sche='lin0',
    opt='adamw', afuse=True, saln=False, anorm=True, fuse=True,
    pn='1_2_3_4_5_6_8_10_13_16', patch_size=16, mid_reso=1.125, hflip=False, workers=0,
    pg=0.0, pg0=4, pgwp=0.0,
    tf32=True, seed=None, same_seed_for_all_ranks=0, dbg_nan=False,
)
_TYPES = dict(data_path=str, exp_name=str, vfast=int, tfast=int, depth=int, ini=float, hd=float, aln=float,
              alng=float, fp16=int, tblr=float, twd=float, twde=float, tclip=float, ls=float, bs=int, ac=int, ep=int,
              wp=float, wp0=float, wpe=float, sche=str, opt=str, afuse=bool, saln=bool, anorm=bool, fuse=bool,
              pn=str, patch_size=int, mid_reso=float, hflip=bool, workers=int, pg=float, pg0=int, pgwp=float,
              tf32=bool, seed=int, same_seed_for_all_ranks=int, dbg_nan=bool)
# Args fields the reference sets itself ("[automatically set; don't specify this]", and tlr, recomputed from tblr)
REFERENCE_AUTOMATIC = ('tlr', 'batch_size', 'glb_batch_size', 'patch_nums', 'resos', 'data_load_reso', 'cmd',
                       'branch', 'commit_id', 'commit_msg', 'acc_mean', 'acc_tail', 'L_mean', 'L_tail', 'vacc_mean',
                       'vacc_tail', 'vL_mean', 'vL_tail', 'grad_norm', 'cur_lr', 'cur_wd', 'cur_it', 'cur_ep',
                       'remain_time', 'finish_time', 'local_out_dir_path', 'tb_log_dir_path', 'log_txt_path',
                       'last_ckpt_path', 'device', 'local_debug')
# accepted, no effect here: naming, torch.compile, fused kernels / TF32 (numerics of the same maths), sampler seeding
NO_EFFECT = ('exp_name', 'vfast', 'tfast', 'afuse', 'fuse', 'tf32', 'same_seed_for_all_ranks', 'dbg_nan')
PN_ALIASES = {'256': '1_2_3_4_5_6_8_10_13_16', '512': '1_2_3_4_6_9_13_18_24_32',
              '1024': '1_2_3_4_5_7_9_12_16_21_27_36_48_64'}
_BOOL = {'true': True, 't': True, 'yes': True, 'y': True, '1': True,
         'false': False, 'f': False, 'no': False, 'n': False, '0': False}

# reference flag -> the config fields it sets (the README table)
FIELDS = {
    'depth': ('model.depth', 'model.embed_dim (64 x depth)', 'model.num_heads (depth)',
              'model.drop_path_rate (0.1 x depth / 24)'),
    'ini': ('model.init_std',), 'hd': ('model.init_head',), 'aln': ('model.init_adaln',),
    'alng': ('model.init_adaln_gamma',), 'saln': ('model.shared_aln',), 'anorm': ('model.attn_l2_norm',),
    'pn': ('model.patch_nums', 'vae.patch_nums'), 'patch_size': ('data.image_size (max(pn) x patch_size)',),
    'fp16': ('dtype',), 'tblr': ('optim.base_lr (x global_batch_size / optim.lr_batch_ref=256)',),
    'twd': ('optim.weight_decay',), 'twde': ('optim.weight_decay_end (0 -> -1)',), 'tclip': ('optim.grad_clip',),
    'ls': ('label_smoothing',), 'bs': ('global_batch_size',),
    'ac': ('grad_accum', "optim.schedule_unit='micro_batch'"),
    'ep': ('epochs', 'total_steps=-1'), 'wp': ('optim.warmup_epochs (0 -> -1)',), 'wp0': ('optim.warmup_start',),
    'wpe': ('optim.end_ratio',), 'sche': ('optim.schedule',), 'opt': ('optim.b1/b2/eps (0.9, 0.95, 1e-8)',),
    'pg': ('progressive.fraction', 'optim.schedule (lin<pg>)'), 'pg0': ('progressive.start_stage',),
    'pgwp': ('progressive.warmup_epochs (0 -> -1)',), 'mid_reso': ('data.mid_reso',), 'hflip': ('data.hflip',),
    'workers': ('data.num_workers (if > 0)',), 'data_path': ('data.path (if given)',), 'seed': ('seed (if given)',),
}


def _value(name: str, text: str):
  typ = _TYPES[name]
  try:
    if typ is bool:
      return _BOOL[text.lower()]
    return typ(text)
  except (KeyError, ValueError):
    raise ValueError(f'reference argument --{name}={text!r}: expected {typ.__name__}') from None


def parse(text: str) -> Tuple[Dict[str, Any], Tuple[str, ...]]:
  """A reference command line -> (the reference's ``Args`` values: defaults + the flags, the names given).
  ``--name=value`` and ``--name value``; '-' in a name reads as '_'."""
  args, given = dict(REFERENCE_DEFAULTS), []
  toks = shlex.split(text)
  i = 0
  while i < len(toks):
    tok = toks[i]
    if not tok.startswith('--'):
      raise ValueError(f'reference_args: expected --name=value, got {tok!r}')
    name, eq, val = tok[2:].partition('=')
    name = name.replace('-', '_')
    if not eq:
      if i + 1 >= len(toks) or toks[i + 1].startswith('--'):
        raise ValueError(f'reference argument --{name} has no value')
      val, i = toks[i + 1], i + 1
    i += 1
    if name in REFERENCE_AUTOMATIC:
      raise ValueError(f'reference argument --{name}: the reference sets it itself (its value would be overwritten);'
                       ' leave it out' + (' (lr = tblr x bs / 256)' if name == 'tlr' else ''))
    if name not in REFERENCE_DEFAULTS:
      raise ValueError(f'unknown reference argument --{name} (utils/arg_util.py Args defines no such flag)')
    args[name] = _value(name, val)
    given.append(name)
  return args, tuple(given)


def updates(args: Dict[str, Any], given=()) -> Dict[str, Any]:
  """The reference's ``Args`` (after ``parse``) -> {dotted config field: value}, with the reference's derivations
  (``init_dist_and_get_args``, ``build_vae_var``) applied."""
  a = args
  for k in ('wp', 'pgwp', 'twde'):
    if a[k] < 0:
      raise ValueError(f'reference argument --{k}={a[k]:g} < 0 has no counterpart here (0 means the default)')
  if a['bs'] % a['ac']:
    raise ValueError(f'reference arguments --bs={a["bs"]} --ac={a["ac"]}: bs must be a multiple of ac (the '
                     'reference rounds bs / ac to the world size; give the batch it ends up with)')
  if a['patch_size'] != 16:
    raise ValueError(f'reference argument --patch_size={a["patch_size"]}: the VQVAE downsamples 16x; only 16 works')
  if a['fp16'] not in (0, 1, 2):
    raise ValueError(f'reference argument --fp16={a["fp16"]}: expected 0 (float32), 1 (float16) or 2 (bfloat16)')
  if a['opt'].lower().strip() not in ('adam', 'adamw'):
    raise ValueError(f'reference argument --opt={a["opt"]!r}: the reference knows adam / adamw (both AdamW)')
  pn_s = PN_ALIASES.get(a['pn'], a['pn'])
  pn = tuple(map(int, pn_s.replace('-', '_').split('_')))
  from var_jax.train import optim
  sche = f'lin{a["pg"]:g}' if a['pg'] > 0 else a['sche']
  optim.check_schedule(sche, 'reference argument --sche')
  d = a['depth']
  u = {
      # build_vae_var: the hard-coded VQVAE (V=4096, Cvae=32, ch=160, share_quant_resi=4) and VAR hyperparameters
      'vae.vocab_size': 4096, 'vae.z_channels': 32, 'vae.ch': 160, 'vae.share_quant_resi': 4, 'vae.patch_nums': pn,
      'model.vocab_size': 4096, 'model.z_channels': 32, 'model.patch_nums': pn,
      'model.depth': d, 'model.embed_dim': 64 * d, 'model.num_heads': d, 'model.mlp_ratio': 4.0,
      'model.drop_path_rate': 0.1 * d / 24, 'model.drop_rate': 0.0, 'model.attn_drop_rate': 0.0,
      'model.norm_eps': 1e-6, 'model.cond_drop_rate': 0.1, 'model.shared_aln': a['saln'],
      'model.attn_l2_norm': a['anorm'], 'model.init_std': a['ini'], 'model.init_head': a['hd'],
      'model.init_adaln': a['aln'], 'model.init_adaln_gamma': a['alng'],
      'data.image_size': max(pn) * a['patch_size'], 'data.mid_reso': a['mid_reso'], 'data.hflip': a['hflip'],
      'dtype': {0: 'float32', 1: 'float16', 2: 'bfloat16'}[a['fp16']],
      'global_batch_size': a['bs'], 'grad_accum': a['ac'], 'epochs': float(a['ep']), 'total_steps': -1,
      'label_smoothing': a['ls'],
      'optim.base_lr': a['tblr'], 'optim.lr_batch_ref': 256, 'optim.b1': 0.9, 'optim.b2': 0.95, 'optim.eps': 1e-8,
      'optim.weight_decay': a['twd'], 'optim.weight_decay_end': a['twde'] if a['twde'] else -1.0,
      'optim.grad_clip': max(a['tclip'], 0.0),
      'optim.schedule': sche, 'optim.warmup_epochs': a['wp'] if a['wp'] else -1.0,
      'optim.warmup_start': a['wp0'], 'optim.end_ratio': a['wpe'], 'optim.schedule_unit': 'micro_batch',
      'optim.loss_scale': dict(init=2.0 ** 11, growth_interval=1000, growth_factor=2.0, backoff_factor=0.5,
                               max=2.0 ** 15),
      'progressive.fraction': a['pg'], 'progressive.start_stage': a['pg0'],
      'progressive.warmup_epochs': a['pgwp'] if a['pgwp'] else -1.0,
  }
  if a['workers'] > 0:
    u['data.num_workers'] = a['workers']
  if 'data_path' in given:
    u['data.path'] = a['data_path']
  if a['seed'] is not None:
    u['seed'] = a['seed']
  return u


def apply(config, text: str):
  """A copy of ``config`` with the fields of the reference command line ``text`` set (see the module doc)."""
  if config.get('task', 'var') != 'var':
    raise ValueError(f'config.reference_args is for the VAR task, not {config.task!r}')
  args, given = parse(text)
  new = copy.deepcopy(config)
  for path, v in updates(args, given).items():
    *parents, leaf = path.split('.')
    node = new
    for p in parents:
      node = node[p]
    old = node.get(leaf, None)
    if hasattr(old, 'to_dict'):
      old = old.to_dict()
    if isinstance(old, dict):
      node[leaf].update(v)
    elif isinstance(old, tuple) or isinstance(v, tuple):
      node[leaf] = tuple(v)
    else:
      node[leaf] = type(old)(v) if isinstance(old, float) and isinstance(v, int) and not isinstance(v, bool) else v
    if old != v:
      logging.info('reference_args: %s = %r (was %r)', path, v, old)
  return new


def resolve(config):
  """``config`` with ``config.reference_args`` applied (unchanged when empty or absent). Idempotent."""
  text = config.get('reference_args', '') if hasattr(config, 'get') else ''
  return apply(config, text) if text else config
