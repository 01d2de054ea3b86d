r"""The AOT table: VAR d16-d36 (256 / 512 px), ELM 2B and BiGR XXL compiled for TPU slices (``var_jax.aot``), one
``python -m var_jax.aot`` process per (model, topology) cell, then one markdown table from their JSON.

  /work/venv_tpu/bin/python benchmarks/aot_table.py --table=docs/aot.md --json_dir=docs/aot [--jobs=2]

Every cell: the config's recipe (global batch, dtype) on an FSDP mesh (``mesh.data=1 mesh.fsdp=-1``: params and
optimizer state sharded over every chip), ``--plan`` (remat when the recipe batch does not fit) and ``--bisect``
(the largest power-of-two per-chip batch). Cells whose JSON exists are not recompiled (delete it to redo one);
cells not started within ``--budget_s`` are listed as not run.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_string('table', 'docs/aot.md', 'markdown output')
flags.DEFINE_string('json_dir', 'docs/aot', 'one JSON report per cell')
flags.DEFINE_string('python', sys.executable, 'interpreter with jax[tpu] (libtpu)')
flags.DEFINE_integer('jobs', 1, 'cells compiled at once')
flags.DEFINE_integer('budget_s', 3600, 'start no cell after this many seconds')
flags.DEFINE_list('only', [], 'cell names to run (default: all)')
flags.DEFINE_bool('sampler', False, 'also compile VAR\'s sampler in every cell')
flags.DEFINE_bool('extra', False, 'also the other resolutions (VAR d36 at 256 px, d30 at 512 px)')
flags.DEFINE_integer('max_compiles', 0, 'per cell: compiles spent verifying the bisection\'s predicted batch')
FLAGS = flags.FLAGS

P256 = '(1,2,3,4,5,6,8,10,13,16)'
P512 = '(1,2,3,4,6,9,13,18,24,32)'
RES256 = [f'--config.vae.patch_nums={P256}', f'--config.model.patch_nums={P256}', '--config.data.image_size=256']
RES512 = [f'--config.vae.patch_nums={P512}', f'--config.model.patch_nums={P512}', '--config.data.image_size=512']
MODELS = {   # name: (config, extra overrides); VAR d16-d30 at 256 px and d36 at 512 px, as released
    'var_d16': ('configs/var_d16.py', []),
    'var_d20': ('configs/var_d20.py', []),
    'var_d24': ('configs/var_d24.py', []),
    'var_d30': ('configs/var_d30.py', []),
    'var_d36_512': ('configs/var_d36.py', []),
    'elm_ar_2b': ('configs/elm_ar_2b.py', []),
    'bigr_xxl': ('configs/bigr_xxl.py', []),
}
EXTRA_MODELS = {   # --extra: the other resolutions
    'var_d36_256': ('configs/var_d36.py', RES256),
    'var_d30_512': ('configs/var_d30.py', RES512),
}
TOPOLOGIES = {'v5e-64': 'v5e:8x8', 'v5e-256': 'v5e:16x16', 'v4-256': 'v4:4x4x8'}   # v4-256: 128 chips
# every cell starts from FSDP without remat, whatever the config's defaults: --plan adds remat only where needed
FSDP = ['--config.mesh.data=1', '--config.mesh.fsdp=-1', '--config.mesh.tensor=1', '--config.model.remat=False']


def models():
  return {**MODELS, **EXTRA_MODELS} if FLAGS.extra else MODELS


def cells():
  """(name, model, slice), slice-major: every model on the first slice, then the next."""
  return [(f'{m}__{t}', m, t) for t in TOPOLOGIES for m in models()]


def run_cell(name, model, topo, out):
  cfg, extra = models()[model]
  cmd = [FLAGS.python, '-m', 'var_jax.aot', f'--config={cfg}', f'--topology={TOPOLOGIES[topo]}', *FSDP, *extra,
         '--plan', '--bisect', f'--max_compiles={FLAGS.max_compiles}',
         f'--{"" if FLAGS.sampler or name == "var_d16__v5e-64" else "no"}sampler',
         f'--out={out}']
  t0 = time.time()
  p = subprocess.run(['nice', *cmd], capture_output=True, text=True)
  dt = time.time() - t0
  if p.returncode:
    err = (p.stderr.strip().splitlines() or ['?'])[-1]
    with open(out, 'w') as f:
      json.dump({'compiled': False, 'error': err[:500], 'command': ' '.join(cmd), 'wall_s': round(dt, 1)}, f)
  else:
    with open(out) as f:
      rep = json.load(f)
    rep['command'], rep['wall_s'] = ' '.join(cmd), round(dt, 1)
    with open(out, 'w') as f:
      json.dump(rep, f, indent=1, sort_keys=True)
  print(f'{name}: {dt:.0f} s, rc {p.returncode}', flush=True)


def gib(b):
  return '' if b is None else f'{b / 2 ** 30:.1f}'


def row(model, topo, rep):
  if rep is None:
    return f'| {model} | {topo} | not run | | | | | | |'
  if not rep.get('compiled'):
    return f'| {model} | {topo} | compile failed: {rep.get("error", "")[:80]} | | | | | | |'
  mesh = 'x'.join(f'{k}{v}' for k, v in rep['mesh'].items() if v > 1) or 'single'
  b = rep.get('bisect') or {}
  dp = rep['mesh']['data'] * rep['mesh']['fsdp']
  seen = max([t['global_batch'] for t in b.get('tried', []) if t['fits']], default=None)   # compiled and fits
  pred = b.get('predicted')
  mx, tag = (pred, ' pred.') if pred and (seen is None or pred > seen) else (seen, '')
  best = '' if mx is None else f'{mx} ({mx // dp}/chip){tag}'
  coll = rep.get('collectives', {})
  short = {'all-gather': 'AG', 'reduce-scatter': 'RS', 'all-reduce': 'AR', 'all-to-all': 'A2A',
           'collective-permute': 'CP', 'all-gather-via-all-reduce': 'AG-as-AR'}
  c = ', '.join(f'{short.get(k, k)} {v["count"]} ({v["bytes"] / 2 ** 20:.0f})' for k, v in coll.items() if v['count'])
  if rep.get('collectives_counted_by') != 'channel_id':
    c = 'not counted (report from before the channel_id count)'
  fits = 'yes' if rep.get('fits') else 'no'
  mem = rep['memory']
  remat = 'yes' if rep.get('remat') else 'no'
  accum = re.search(r'accum(\d+)', rep.get('variant') or '')
  if accum:
    remat += f', {accum.group(1)} micro-batches'
  first = (rep.get('plan') or [{}])[0]
  if rep.get('remat') and first.get('variant') == 'config' and not first.get('fits'):
    m = re.search(r'HLO temporaries \(([0-9.]+G)\)', first.get('error') or '')
    remat += f' (without: {m.group(1)} temp)' if m else ' (without: does not fit)'
  return (f'| {model} | {topo} | {mesh} | {rep["global_batch"]} | {gib(rep["bytes_per_device"])} / '
          f'{gib(rep["hbm_bytes_per_device"])} ({fits}) | {gib(mem["argument"])} / {gib(mem["temp"])} | '
          f'{remat} | {best} | {rep["flops_per_step"]:.2e} | {c} | '
          f'{rep.get("compile_s", "")} |')


PREAMBLE = """# AOT compilation for TPU slices

Made by `{command}` ({versions}), from one JSON report per cell in `{json_dir}/`: each cell is `python -m var_jax.aot`
on the model's training recipe (its global batch, bf16 compute, f32 params and AdamW state), compiled by libtpu's
XLA TPU compiler for the slice's devices, on a CPU-only host.

- **mesh**: FSDP over every chip (`mesh.data=1 mesh.fsdp=-1`): params, optimizer state and EMA sharded.
- **GiB/chip**: the compiler's peak per device, argument + output - aliased (the donated state) + temp, against the
  chip's HBM (v5e 16 GiB, v4 32 GiB); **args / temp**: its parts (args: the sharded state, the replicated frozen
  tokenizer and this chip's images).
- **remat**: `--plan` turns rematerialisation of the transformer blocks on only when the recipe does not fit
  without, then, if still needed, gradient accumulation (N micro-batches, the recipe's global batch kept).
- **largest batch that fits**: powers of two per chip; `pred.` = predicted from the recipe compile (state bytes fixed,
  temp bytes scaled linearly with the batch: conservative), else compiled and seen to fit.
- **collectives**: count and MiB in the optimized per-device program (static: one per channel_id, an op in a loop
  body once; AG-as-AR: all-gathers the TPU compiler emitted as an all-reduce of shard-filled buffers, RS:
  reduce-scatter fusions).
- The train step includes the frozen tokenizer's encoding of the images (as `config.data.token_cache` off).

"""


def table(reports):
  head = ('| model | slice | mesh | recipe batch | GiB/chip at recipe batch / HBM (fits) | args / temp GiB | remat | '
          'largest batch that fits | FLOPs/step | collectives: count (MiB) | compile s |\n'
          '|---|---|---|---|---|---|---|---|---|---|---|')
  return head + '\n' + '\n'.join(row(m, t, reports.get(n)) for n, m, t in cells())


def versions():
  code = ('import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("jax", "jaxlib", '
          '"libtpu")))')
  p = subprocess.run([FLAGS.python, '-c', code], capture_output=True, text=True)
  return p.stdout.strip() or 'versions unknown'


def main(argv):
  del argv
  os.makedirs(FLAGS.json_dir, exist_ok=True)
  todo = [(n, m, t) for n, m, t in cells() if (not FLAGS.only or n in FLAGS.only)
          and not os.path.exists(os.path.join(FLAGS.json_dir, n + '.json'))]
  t0 = time.time()
  with concurrent.futures.ThreadPoolExecutor(FLAGS.jobs) as ex:
    futs = []
    for n, m, t in todo:
      def job(n=n, m=m, t=t):
        if time.time() - t0 > FLAGS.budget_s:
          print(f'{n}: not run (budget)', flush=True)
          return
        run_cell(n, m, t, os.path.join(FLAGS.json_dir, n + '.json'))
      futs.append(ex.submit(job))
    for f in futs:
      f.result()
  reports = {}
  for n, _, _ in cells():
    p = os.path.join(FLAGS.json_dir, n + '.json')
    if os.path.exists(p):
      with open(p) as f:
        reports[n] = json.load(f)
  command = 'python benchmarks/aot_table.py ' + ' '.join(
      f'--{k}={FLAGS[k].value}' for k in ('table', 'json_dir') if FLAGS[k].present)
  with open(FLAGS.table, 'w') as f:
    f.write(PREAMBLE.format(command=command.strip(), versions=versions(), json_dir=FLAGS.json_dir))
    f.write(table(reports) + '\n')
  print(table(reports))


if __name__ == '__main__':
  app.run(main)
