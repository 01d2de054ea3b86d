r"""Ahead-of-time compilation of the real train step (and VAR's sampler) for a TPU slice, without a TPU.

  python -m var_jax.aot --config=configs/var_d30.py --topology=v5e:16x16 [--num_slices=2] [--config.x=...] \
      [--bisect] [--plan] --out=aot.json

The topology's devices come from libtpu (``jax.experimental.topologies.get_topology_desc``; ``pip install -e
".[tpu]"`` in a separate environment: libtpu installs on a CPU-only host), or ``--topology=cpu`` (this host's CPU
devices, e.g. 8 fake ones: the same code path, for tests). The mesh and logical rules are the config's
(``var_jax.sharding``), the task and its jitted step the trainer's (``var_jax.train.tasks.build`` / ``Task.
jit_step``), lowered with abstract arguments (``ShapeDtypeStruct`` + sharding) at the config's global batch and
compiled by the real XLA compiler. Reported (printed and written as JSON):

* ``compiled``, ``topology``, ``device_kind``, ``num_devices``, ``num_slices``, ``mesh`` (axis sizes),
  ``global_batch``, ``per_device_batch``, ``remat``;
* ``memory``: the compiler's per-device ``argument`` / ``output`` / ``alias`` (donated state: outputs written into
  the arguments) / ``temp`` / ``generated_code`` bytes; ``bytes_per_device`` = argument + output - alias + temp
  (the peak the compiler plans for), ``hbm_bytes_per_device`` (the chip's HBM) and ``fits``;
* ``state_bytes_per_device``: the analytic size of the sharded train state (params + optimizer + EMA), from the
  shardings alone;
* ``flops_per_step`` (XLA's cost analysis of the partitioned program x devices), ``flops_per_device``,
  ``model_flops_per_example`` (VAR: ``metrics.var_train_flops_per_image``; others: XLA's count / batch),
  ``min_step_s`` (FLOPs at the chip's peak: the 100%-MFU bound);
* ``collectives``: count and result bytes per kind (all-gather, reduce-scatter, all-reduce, all-to-all,
  collective-permute) in the optimized HLO (static counts: an op inside a loop body counts once);
* ``custom_calls``: the custom-call targets in the HLO (a Pallas kernel shows as ``tpu_custom_call``, with its
  kernel names in ``kernels``);
* ``sampler`` (VAR): the same report for the KV-cache sampler at ``--sample_batch``;
* ``bisect`` (``--bisect``, TPU): the largest global batch that fits, over powers of two of the per-device batch:
  predicted from the first compile's bytes (temp bytes linear in the batch), then compiled (``--max_compiles``);
* ``plan`` (``--plan``): when the config does not fit at its batch, the first of (FSDP mesh, FSDP + remat, FSDP +
  remat + gradient accumulation over 2, 3, 4 ... micro-batches) that does, whose report and bisection then
  follow.
"""
from __future__ import annotations

import collections
import copy
import json
import logging as std_logging
import math
import os
import re
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from var_jax import sharding as shd

logging = std_logging.getLogger('var_jax.aot')

GiB = 1 << 30
# HBM per chip (per JAX device: v4 and v5p in megacore mode, one device per chip)
HBM_BYTES = {'v4': 32 * GiB, 'v5e': 16 * GiB, 'v5 lite': 16 * GiB, 'v5p': 95 * GiB, 'v5': 95 * GiB,
             'v6e': 32 * GiB, 'v6 lite': 32 * GiB}
MEGACORE = ('v4', 'v5p')            # generations with two TensorCores per chip fused into one device
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
DTYPE_BYTES = {'pred': 1, 's4': 1, 'u4': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2,
               'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
               'c128': 16}
CKPT_KEYS = ('vae_ckpt', 'bae_ckpt', 'init_from')   # weights files: shapes come from the config alone


class AOTError(ValueError):
  """A bad topology / config combination (named), before any compilation."""


# ----------------------------------------------------------------------------- topology
def hbm_bytes(device_kind: str) -> Optional[int]:
  """The HBM of one device of ``device_kind`` ('TPU v5 lite', 'TPU v4', ...), None when unknown (CPU)."""
  kind = device_kind.lower().replace('tpu ', '')
  for k in sorted(HBM_BYTES, key=len, reverse=True):
    if kind.startswith(k):
      return HBM_BYTES[k]
  return None


def topology_devices(topology: str, num_slices: int = 1, chip_config: str = '') -> List[Any]:
  """The devices of ``topology``: 'cpu' (this host's CPU devices) or a TPU slice '<gen>:<AxB[xC]>' (libtpu's
  topology description; v4/v5p in megacore mode unless ``chip_config`` says otherwise)."""
  if topology == 'cpu':
    if num_slices != 1:
      raise AOTError('--num_slices applies to TPU topologies only (got --topology=cpu)')
    return jax.devices('cpu')
  if not re.fullmatch(r'v[0-9][a-z]*:[0-9]+(x[0-9]+)+', topology):
    raise AOTError(f'--topology={topology!r}: expected cpu or <generation>:<chips per axis>, e.g. v5e:16x16, '
                   f'v4:4x4x8, v5p:4x4x4')
  try:
    import libtpu  # noqa: F401  (only to give a clear error)
  except ImportError as e:
    raise AOTError(f'--topology={topology} needs libtpu: pip install -e ".[tpu]" (in a separate environment: '
                   f'it slows every JAX start); {e}') from e
  # no TPU VM metadata server here; and the plugin is loaded for its compiler only (no chip is opened), so several
  # AOT processes may load it at once (libtpu's /tmp/libtpu_lockfile otherwise admits one)
  for k, v in (('TPU_WORKER_HOSTNAMES', 'localhost'), ('TPU_SKIP_MDS_QUERY', '1'), ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')):
    os.environ.setdefault(k, v)
  from jax.experimental import topologies
  kw = {'num_slices': num_slices} if num_slices > 1 else {}
  gen = topology.split(':')[0]
  if chip_config or gen in MEGACORE:
    kw['chip_config_name'] = chip_config or 'megacore'
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform='tpu', **kw).devices)
  except Exception as e:  # noqa: BLE001 - libtpu's message names the problem
    raise AOTError(f'--topology={topology}: libtpu cannot describe it: {str(e).splitlines()[0][:300]}') from e


# ----------------------------------------------------------------------------- the task's abstract arguments
def prepare_config(config, global_batch: Optional[int] = None, overrides: Optional[Dict[str, Any]] = None):
  """A copy of ``config`` (reference args resolved, as the trainer does) with weights files cleared (the shapes
  come from the config; nothing is read) and ``global_batch`` / dotted ``overrides`` applied."""
  from var_jax.train import reference_args
  c = copy.deepcopy(config)
  c = reference_args.resolve(c)
  with c.unlocked():
    for k in CKPT_KEYS:
      if k in c:
        c[k] = ''
    if global_batch is not None:
      c.global_batch_size = int(global_batch)
    for k, v in (overrides or {}).items():
      node = c
      *parents, leaf = k.split('.')
      for p in parents:
        node = node[p]
      node[leaf] = v
  return c


def abstract_batch(config, task, global_batch: int) -> Dict[str, jax.ShapeDtypeStruct]:
  """The train batch the data pipeline yields (``var_jax.data.pipeline``), as sharded shapes."""
  sh = shd.batch_sharding(task.mesh)
  s = int(config.data.image_size)
  out = {'label': jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sh)}
  if config.task == 'var' and config.data.get('token_cache'):
    out['tokens'] = jax.ShapeDtypeStruct((global_batch, task.var_cfg.seq_len), jnp.int32, sharding=sh)
  else:
    out['image'] = jax.ShapeDtypeStruct((global_batch, s, s, 3), jnp.float32, sharding=sh)
  return out


def with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_frozen(task):
  """The frozen inputs (tokenizer variables, LPIPS weights) as replicated shapes (``Task.frozen_shapes``: nothing
  read or materialised)."""
  rep = shd.replicated(task.mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), task.frozen_shapes())


def sharded_bytes(abstract, shardings) -> int:
  """Bytes per device of ``abstract`` under ``shardings`` (the largest shard of each leaf)."""
  total = 0
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    shape = s.shard_shape(x.shape) if x.shape else ()
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return int(total)


# ----------------------------------------------------------------------------- HLO analysis
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$')
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$')
_ARRAY = re.compile(r'\b([a-z]+[0-9]*(?:e[0-9]m[0-9](?:fn)?)?)\[([0-9,]*)\]')
_OPERAND = re.compile(r'%([\w.\-]+)')


def _shape_bytes(shape: str) -> List[int]:
  out = []
  for dt, dims in _ARRAY.findall(shape):
    if dt in DTYPE_BYTES:
      out.append(math.prod(int(d) for d in dims.split(',') if d) * DTYPE_BYTES[dt])
  return out


def collectives(hlo: str) -> Dict[str, Dict[str, int]]:
  """{kind: {'count', 'bytes'}} of the collectives in optimized HLO text (result bytes; static counts: an op in a
  loop body counts once). Async pairs count once (at ``-start``, whose result tuple holds the operand and the
  result: the larger is counted). One collective is one ``channel_id``: the TPU compiler prints an asynchronous
  collective's instruction up to three times (in its start, body and done fusions), counted once. Two forms of the
  TPU compiler are recognised:

  * a reduce-scatter emitted as a fusion calling an ``all-reduce-scatter`` computation (an all-reduce followed by
    this device's slice) counts as one reduce-scatter of the fusion's (sliced) result, not as an all-reduce;
  * an all-gather emitted as an all-reduce of buffers each device wrote its shard into (most operands of a combined
    all-reduce are ``dynamic-update-slice`` results) counts under ``all-gather-via-all-reduce`` (the gathered
    bytes; all-reduce traffic).
  """
  out = {k: {'count': 0, 'bytes': 0} for k in COLLECTIVES + ('all-gather-via-all-reduce',)}
  channels = {}                    # channel_id -> (kind, bytes) counted
  comp = ''
  for line in hlo.splitlines():
    c = _COMPUTATION.match(line)
    if c:
      comp = c.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    shape, op, rest = m.groups()
    sizes = _shape_bytes(shape)
    if op == 'fusion' and re.search(r'calls=%all-reduce-scatter', rest):
      out['reduce-scatter']['count'] += 1
      out['reduce-scatter']['bytes'] += sum(sizes)
      continue
    base_op = op[:-len('-start')] if op.endswith('-start') else op
    if base_op not in COLLECTIVES or (base_op == 'all-reduce' and comp.startswith('all-reduce-scatter')):
      continue
    if base_op == 'all-reduce':
      args = _OPERAND.findall(rest.split(')', 1)[0])
      if args and 2 * sum('dynamic-update-slice' in a for a in args) > len(args):
        base_op = 'all-gather-via-all-reduce'
    nbytes = (max(sizes) if op.endswith('-start') else sum(sizes)) if sizes else 0
    ch = re.search(r'\bchannel_id=(\d+)', rest)
    if ch:                         # one collective, however many times its instruction is printed
      if ch.group(1) in channels:
        kind, seen = channels[ch.group(1)]
        if nbytes > seen:
          out[kind]['bytes'] += nbytes - seen
          channels[ch.group(1)] = (kind, nbytes)
        continue
      channels[ch.group(1)] = (base_op, nbytes)
    out[base_op]['count'] += 1
    out[base_op]['bytes'] += nbytes
  return out


def custom_calls(hlo: str) -> Dict[str, Any]:
  """{'targets': {target: count}, 'kernels': {Pallas/Mosaic kernel: count}} of the HLO's custom calls. A TPU
  kernel is a ``tpu_custom_call`` named after its kernel (``%splash_mha_fwd_residuals.2 = ... custom-call(...)``:
  the name without its ``.N`` suffix)."""
  targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))
  kernels = collections.Counter(
      re.sub(r'\.\d+$', '', m) for m in re.findall(
          r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*custom_call_target="tpu_custom_call"', hlo, re.M))
  return {'targets': dict(targets), 'kernels': dict(kernels)}


def memory_report(compiled, hbm: Optional[int]) -> Dict[str, Any]:
  m = compiled.memory_analysis()
  if m is None:
    return {'memory': None, 'bytes_per_device': None, 'fits': None}
  mem = {k: int(getattr(m, f'{k}_size_in_bytes', 0) or 0)
         for k in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  peak = mem['argument'] + mem['output'] - mem['alias'] + mem['temp']
  return {'memory': mem, 'bytes_per_device': peak, 'fits': None if hbm is None else bool(peak <= hbm)}


def _cost(compiled) -> Dict[str, float]:
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):
    c = c[0] if c else {}
  return dict(c or {})


def analyse(compiled, num_devices: int, hbm: Optional[int], device_kind: str) -> Dict[str, Any]:
  """Memory, cost and HLO facts of a compiled (partitioned) program."""
  from var_jax.train import metrics as metrics_lib
  out = memory_report(compiled, hbm)
  cost = _cost(compiled)
  flops = float(cost.get('flops', 0.0) or 0.0)
  out.update(flops_per_device=flops, flops_per_step=flops * num_devices,
             bytes_accessed_per_device=float(cost.get('bytes accessed', 0.0) or 0.0))
  peak = next((v for k, v in metrics_lib.PEAK_FLOPS.items() if device_kind.startswith(k)), None)
  out['min_step_s'] = flops / peak if peak and flops else None
  hlo = compiled.as_text()
  out['collectives'] = collectives(hlo)
  out['collectives_counted_by'] = 'channel_id'      # (reports without it counted printed instructions)
  out['custom_calls'] = custom_calls(hlo)
  return out


# ----------------------------------------------------------------------------- compilation
def build_task(config, devices, num_slices: int = 1, num_train_examples: int = 1_281_167):
  """(task, mesh, rules) of ``config`` over ``devices`` (its mesh settings and logical rules), as the trainer
  builds them (``loop.setup_mesh`` + ``tasks.build``), without data or weights."""
  from var_jax.train import tasks
  rules = shd.rules_from_config(config.logical_axis_rules)
  mesh = shd.make_mesh(config.mesh.to_dict(), devices, num_slices=num_slices)
  shd.global_batch_size_ok(config.global_batch_size, mesh)
  if config.global_batch_size % int(config.grad_accum):
    raise AOTError(f'global_batch_size {config.global_batch_size} must divide into grad_accum='
                   f'{config.grad_accum} micro-batches')
  return tasks.build(config, mesh, num_train_examples, rules), mesh, rules


def compile_train(config, devices, num_slices: int = 1, num_train_examples: int = 1_281_167) -> Dict[str, Any]:
  """Lower and compile the task's jitted train step (``Task.jit_step`` of the first stage, with the config's
  non-finite guard, exactly what the loop runs) at ``config.global_batch_size`` over ``devices``."""
  t0 = time.time()
  task, mesh, rules = build_task(config, devices, num_slices, num_train_examples)
  kind = devices[0].device_kind
  hbm = hbm_bytes(kind) if devices[0].platform == 'tpu' else None
  gb = int(config.global_batch_size)
  n = len(devices)
  rep = {'compiled': False, 'topology': None, 'device_kind': kind, 'num_devices': n, 'num_slices': num_slices,
         'mesh': {k: int(v) for k, v in mesh.shape.items()}, 'global_batch': gb,
         'per_device_batch': gb / (mesh.shape['data'] * mesh.shape['fsdp']),
         'remat': bool(config.model.get('remat', False)) if 'model' in config else False,
         'hbm_bytes_per_device': hbm,
         'state_bytes_per_device': sharded_bytes(task.abstract, task.shardings),
         'params': int(sum(math.prod(x.shape) for x in jax.tree.leaves(_params_of(task.abstract))))}
  stage, extra = task.stage(0)
  extra = tuple(jax.ShapeDtypeStruct(jnp.shape(x), jnp.asarray(x).dtype, sharding=shd.replicated(mesh))
                for x in extra)
  # built outside the mesh context: concrete values made there (the stage's ramp) would go to the mesh's devices
  step_fn = task.jit_step(stage, config.nonfinite)
  args = (with_shardings(task.abstract, task.shardings), abstract_batch(config, task, gb), abstract_frozen(task))
  with shd.mesh_context(mesh, rules):
    lowered = step_fn.lower(*args, *extra)
    t1 = time.time()
    compiled = lowered.compile()
  rep.update(compiled=True, lower_s=round(t1 - t0, 2), compile_s=round(time.time() - t1, 2))
  rep.update(analyse(compiled, n, hbm, kind))
  mf = task.train_flops_per_example
  rep['model_flops_per_example'] = float(mf) if mf else (rep['flops_per_step'] / gb if gb else None)
  rep['model_flops_source'] = 'analytic' if mf else 'xla'
  rep['_task'] = task
  return rep


def _params_of(state):
  return getattr(state, 'params', None) or getattr(state, 'g_params', {})


def compile_sampler(task, sample_batch: int) -> Dict[str, Any]:
  """VAR's KV-cache sampler (``var_jax.sampling.var.make_sampler``, bfloat16, the config's sampling options) over
  the task's mesh: the params with their training shardings, labels and keys over data x fsdp."""
  from var_jax.sampling import var as sampling
  config, mesh = task.config, task.mesh
  bsh, rep = shd.batch_sharding(mesh), shd.replicated(mesh)
  opts = sampling.SamplingOptions(cfg=config.sample.cfg, top_k=config.sample.top_k, top_p=config.sample.top_p)
  fn = sampling.make_sampler(task.vae_cfg, task.var_cfg, opts, dtype=jnp.bfloat16,
                             in_shardings=(rep, {'params': task.shardings.params}, bsh, bsh),
                             out_shardings=(bsh, bsh))
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), sample_batch))
  t0 = time.time()
  args = (abstract_frozen(task), {'params': with_shardings(task.abstract.params, task.shardings.params)},
          jax.ShapeDtypeStruct((sample_batch,), jnp.int32, sharding=bsh),
          jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=bsh))
  with shd.mesh_context(mesh, task.rules):
    lowered = fn.lower(*args)
    compiled = lowered.compile()
  kind = mesh.devices.flat[0].device_kind
  hbm = hbm_bytes(kind) if mesh.devices.flat[0].platform == 'tpu' else None
  out = {'compiled': True, 'batch': sample_batch, 'compile_s': round(time.time() - t0, 2)}
  out.update(analyse(compiled, mesh.size, hbm, kind))
  return out


def _try(fn, *args, **kw) -> Dict[str, Any]:
  """``fn(*args, **kw)``; a compiler failure (e.g. out of memory at compile time) is a report, not a crash."""
  try:
    return fn(*args, **kw)
  except AOTError:
    raise
  except Exception as e:  # noqa: BLE001 - XLA's errors (RESOURCE_EXHAUSTED, ...) become part of the report
    msg = str(e).strip().splitlines()
    return {'compiled': False, 'fits': False, 'error': (msg[0] if msg else type(e).__name__)[:500]}


def predict_batch(rep: Dict[str, Any], dp: int, accum: int = 1) -> Optional[int]:
  """The largest power-of-two per-device batch (x ``dp`` = global) whose bytes, extrapolated from one compile,
  fit: the state-like part (argument + output - alias) fixed, the temp bytes proportional to the batch (an
  over-estimate above the compiled batch: its constant part is scaled too)."""
  mem, hbm = rep.get('memory'), rep.get('hbm_bytes_per_device')
  if not mem or not hbm:
    return None
  p0 = rep['per_device_batch']
  fixed = mem['argument'] + mem['output'] - mem['alias']
  per = mem['temp'] / p0
  p, best = 1, None
  while p <= 1 << 16 and fixed + per * p <= hbm:
    if (p * dp) % accum == 0:
      best = p
    p *= 2
  return None if best is None else best * dp


def bisect_batch(config, devices, num_slices: int, start: Dict[str, Any], max_compiles: int, **kw) -> Dict[str, Any]:
  """The largest global batch that fits, per-device batch over powers of two: predicted from the first compile
  (``predict_batch``), then compiled; on a miss, halved until it fits; on a fit, doubled while compiles remain (at
  most ``max_compiles`` in all). -> {'max_global_batch', 'predicted', 'verified', 'tried': [...]}."""
  mesh = start['mesh']
  dp = mesh['data'] * mesh['fsdp']
  accum = int(config.grad_accum)
  tried = {int(start['global_batch']): (bool(start.get('fits')), start.get('bytes_per_device'))}
  budget = [max_compiles]

  def fits(gb):
    if gb not in tried:
      if budget[0] <= 0:
        return None
      budget[0] -= 1
      r = _try(compile_train, prepare_config(config, gb), devices, num_slices, **kw)
      tried[gb] = (bool(r.get('fits')), r.get('bytes_per_device'))
      logging.info('bisect: global batch %d -> %s (%s bytes/device)', gb, 'fits' if tried[gb][0] else 'no',
                   tried[gb][1])
    return tried[gb][0]

  guess = predict_batch(start, dp, accum) if start.get('memory') else None
  if guess is None:
    guess = dp * max(accum, 1)
  best = None
  g = guess
  ok = fits(g)
  if ok:
    best = g
    while fits(g * 2):
      g *= 2
      best = g
  elif ok is False:
    while g > dp * accum and g % 2 == 0:
      g //= 2
      ok = fits(g)
      if ok:
        best = g
        break
      if ok is None:
        break
  fitting = [g_ for g_, (f, _) in tried.items() if f]
  if fitting and (best is None or max(fitting) > best):
    best = max(fitting)
  return {'max_global_batch': best, 'max_per_device_batch': None if best is None else best / dp,
          'predicted': predict_batch(start, dp, accum),
          'tried': [{'global_batch': g_, 'fits': f, 'bytes_per_device': b} for g_, (f, b) in sorted(tried.items())]}


FSDP_ALL = {'mesh.data': 1, 'mesh.fsdp': -1, 'mesh.tensor': 1}


def fit_mesh(config, devices, num_slices: int = 1):
  """(config, note): ``config`` itself when its mesh splits every parameter evenly; else (e.g. FSDP over 256 chips
  and VAR-d30's 1920 channels) a copy whose offending axis is the largest size that does, 'data' taking the rest
  (a hybrid data x fsdp mesh), and a note saying so."""
  try:
    build_task(config, devices, num_slices)
    return config, None
  except shd.MeshDivisibilityError as e:
    if len(e.axes) != 1 or e.axes[0] == 'data':
      raise AOTError(str(e)) from None
    fitted = prepare_config(config, overrides={f'mesh.{e.axes[0]}': e.fits, 'mesh.data': -1})
    build_task(fitted, devices, num_slices)
    return fitted, f'{e.axes[0]} shrunk to {e.fits} (data takes the rest): {e}'


def plan_variants(config, num_devices: int, fsdp: Optional[Dict[str, Any]] = None) -> List[Tuple[str, Dict[str, Any]]]:
  """What ``--plan`` tries after the config as it is, in order, until one fits: the FSDP mesh ``fsdp`` (default
  FSDP over every device; unless the config's mesh is already that), FSDP with remat (where the model has a remat
  option), then that with gradient accumulation over 2, 3, 4 ... micro-batches (the recipe's global batch kept;
  each divides the per-device batch, at most 4 such tries)."""
  fsdp = dict(fsdp or FSDP_ALL)
  m = config.mesh
  mesh_now = (int(m.data), int(m.fsdp), int(m.tensor))
  out = [] if mesh_now == tuple(int(fsdp[f'mesh.{a}']) for a in ('data', 'fsdp', 'tensor')) else [('fsdp', fsdp)]
  name, last = 'fsdp', fsdp
  if 'model' in config and 'remat' in config.model:
    name, last = 'fsdp+remat', dict(fsdp, **{'model.remat': True})
    if out or not config.model.remat:               # not the config itself again (e.g. var_d30: FSDP + remat)
      out.append((name, last))
  if config.task != 'tokenizer':                     # the tokenizer step does not micro-batch
    accum = int(config.grad_accum)
    per_device = int(config.global_batch_size) // (accum * num_devices)
    splits = [k for k in range(2, per_device + 1) if per_device % k == 0][:4]
    out += [(f'{name}+accum{accum * k}', dict(last, grad_accum=accum * k)) for k in splits]
  return out


def run(config, topology: str, num_slices: int = 1, chip_config: str = '', bisect: bool = False, plan: bool = False,
        sampler: bool = True, sample_batch: int = 0, max_compiles: int = 2,
        num_train_examples: int = 1_281_167) -> Dict[str, Any]:
  """The whole report of ``config`` on ``topology`` (see the module docstring). ``sample_batch`` 0: one image per
  device."""
  devices = topology_devices(topology, num_slices, chip_config)
  base_cfg, mesh_note = fit_mesh(prepare_config(config), devices, num_slices)
  kw = dict(num_train_examples=num_train_examples)
  rep = _try(compile_train, base_cfg, devices, num_slices, **kw)
  variant, cfg = 'config', base_cfg
  tried_variants = [{'variant': 'config', 'fits': rep.get('fits'), 'bytes_per_device': rep.get('bytes_per_device'),
                     'error': rep.get('error')}]
  if plan and not rep.get('fits'):
    fsdp_cfg, _ = fit_mesh(prepare_config(base_cfg, overrides=FSDP_ALL), devices, num_slices)
    fsdp = {f'mesh.{a}': int(fsdp_cfg.mesh[a]) for a in ('data', 'fsdp', 'tensor')}
    for name, over in plan_variants(base_cfg, len(devices), fsdp):
      c = prepare_config(base_cfg, overrides=over)
      r = _try(compile_train, c, devices, num_slices, **kw)
      tried_variants.append({'variant': name, 'fits': r.get('fits'), 'bytes_per_device': r.get('bytes_per_device'),
                             'error': r.get('error')})
      if r.get('fits') or not rep.get('compiled'):
        rep, variant, cfg = r, name, c
      if r.get('fits'):
        break
  task = rep.pop('_task', None)
  rep.update(topology=topology, num_slices=num_slices, config_task=str(cfg.task), variant=variant,
             mesh_note=mesh_note)
  if plan:
    rep['plan'] = tried_variants
  if 'num_devices' not in rep:
    rep['num_devices'] = len(devices)
  if sampler and task is not None and cfg.task == 'var':
    rep['sampler'] = _try(compile_sampler, task, sample_batch or len(devices))
  if bisect and rep.get('compiled') and rep.get('hbm_bytes_per_device'):
    rep['bisect'] = bisect_batch(cfg, devices, num_slices, rep, max_compiles, **kw)
  return rep


def summary(rep: Dict[str, Any]) -> str:
  """A few human lines of a report."""
  def gib(b):
    return 'n/a' if b is None else f'{b / GiB:.2f} GiB'
  lines = [f"{rep.get('topology')} ({rep.get('num_devices')} x {rep.get('device_kind', '?')}), mesh "
           f"{rep.get('mesh')}, global batch {rep.get('global_batch')}, variant {rep.get('variant')}, "
           f"remat {rep.get('remat')}: compiled {rep.get('compiled')}"]
  if rep.get('error'):
    lines.append(f"  error: {rep['error']}")
  if rep.get('memory'):
    m = rep['memory']
    lines.append(f"  per device: {gib(rep['bytes_per_device'])} of {gib(rep.get('hbm_bytes_per_device'))} "
                 f"(fits {rep.get('fits')}): args {gib(m['argument'])}, out {gib(m['output'])}, alias "
                 f"{gib(m['alias'])}, temp {gib(m['temp'])}; state (analytic) {gib(rep['state_bytes_per_device'])}")
    lines.append(f"  FLOPs/step {rep['flops_per_step']:.3e}, model FLOPs/example "
                 f"{rep['model_flops_per_example']:.3e} ({rep['model_flops_source']}), compile {rep['compile_s']} s")
    lines.append('  collectives: ' + ', '.join(f"{k} {v['count']} ({v['bytes'] / 2**20:.1f} MiB)"
                                               for k, v in rep['collectives'].items() if v['count']))
  s = rep.get('sampler')
  if s:
    lines.append(f"  sampler batch {s.get('batch')}: compiled {s.get('compiled')}, "
                 f"{gib(s.get('bytes_per_device'))}/device" + (f", error {s['error']}" if s.get('error') else ''))
  b = rep.get('bisect')
  if b:
    lines.append(f"  largest global batch that fits: {b['max_global_batch']} "
                 f"(tried {[t['global_batch'] for t in b['tried']]})")
  return '\n'.join(lines)


# ----------------------------------------------------------------------------- CLI
def define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'path to a configs/*.py file', lock_config=True)
  flags.DEFINE_string('topology', 'cpu', "'cpu' (this host's CPU devices) or a TPU slice: v5e:16x16, v4:4x4x8, "
                      'v5p:4x4x4, v6e:8x8 (chips per axis)')
  flags.DEFINE_integer('num_slices', 1, 'TPU slices over DCN (multislice: the slices split the data axis)')
  flags.DEFINE_string('chip_config', '', "libtpu chip config ('' = megacore on v4/v5p, the default elsewhere)")
  flags.DEFINE_bool('bisect', False, 'find the largest global batch that fits (powers of two per device)')
  flags.DEFINE_integer('max_compiles', 2, '--bisect: at most this many extra compiles (the first is predicted '
                       'from the config\'s compile)')
  flags.DEFINE_bool('plan', False, 'if the config does not fit: try FSDP over all devices, then FSDP + remat, then '
                    'that with gradient accumulation (the global batch kept)')
  flags.DEFINE_bool('sampler', True, 'VAR: also compile the KV-cache sampler')
  flags.DEFINE_integer('sample_batch', 0, 'sampler batch (0: one image per device)')
  flags.DEFINE_integer('num_train_examples', 1_281_167, 'training set size (only the schedule depends on it; '
                       'default: ImageNet-1k train)')
  flags.DEFINE_string('out', '', 'write the JSON report here')


def main():
  from absl import flags
  from var_jax import fileio
  f = flags.FLAGS
  if not os.environ.get('JAX_PLATFORMS'):
    # compile-only: the local backend is never used for a TPU topology (its devices come from libtpu's description);
    # the CPU backend skips libtpu's ~20 s search for a local TPU and its /tmp/libtpu_lockfile
    jax.config.update('jax_platforms', 'cpu')
  if f.config is None:
    raise AOTError('--config is required (a configs/*.py file)')
  if f.out:
    fileio.check_output_file(f.out, '--out', suffixes=('.json',))
  if f.num_slices < 1:
    raise AOTError(f'--num_slices={f.num_slices}: must be >= 1')
  rep = run(f.config, f.topology, f.num_slices, f.chip_config, bisect=f.bisect, plan=f.plan, sampler=f.sampler,
            sample_batch=f.sample_batch, max_compiles=f.max_compiles, num_train_examples=f.num_train_examples)
  from ml_collections import config_flags
  rep['config'] = config_flags.get_config_filename(f['config'])
  print(summary(rep))
  if f.out:
    fileio.atomic_write_text(f.out, json.dumps(rep, indent=1, sort_keys=True) + '\n')
    print(f'wrote {f.out}')


if __name__ == '__main__':
  from var_jax import cli, fileio
  define_flags()
  cli.run(main, errors=(AOTError, ValueError, fileio.OutputError))
