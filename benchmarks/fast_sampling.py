"""Cost of VAR's training-free sampling accelerations (``var_jax.sampling.var``): FLOPs, memory and images/s.

For each option alone and combined, on the released VAR shapes (random weights: the weights do not change the
work) at 256 px (patch_nums 1,2,3,4,5,6,8,10,13,16, the vae_ch160v4096z32 tokenizer, class-conditional CFG with
top-k 900 / top-p 0.96 as the release):

* FLOPs per image: XLA's ``cost_analysis()`` of the compiled sampler (the whole K-scale loop + the VQVAE decode) on
  this host's CPU, divided by the batch; with ``--tpu_topology`` (e.g. ``v5e:1x1``; needs libtpu, see
  ``var_jax/aot.py``) also from the TPU compiler, through the same ahead-of-time path with abstract arguments;
* peak memory: the compiled program's ``memory_analysis()`` (arguments + outputs + temporaries), per batch;
* images/s on this CPU for ``--wallclock_depth`` (default d16) at ``--batch`` (>= 8), one compiled program per
  option, every option timed in the same run as the full sampler (``--reps`` timed calls after the compile).

Draft/refine rows (``draft``) pair the target model with a smaller refiner (d30 drafts for d16, CoDe's pair): the
target is the drafter, so their ratios are against the drafter's full sampler (the d30 table), and the d16 table
has no draft row. Ratios: full / option for FLOPs and time (> 1 = faster), option / full for memory.

Usage (CPU; a d30 compile takes minutes on a small host):
  python benchmarks/fast_sampling.py                                   # d16 + d30 FLOPs/memory, d16 images/s, B=8
  python benchmarks/fast_sampling.py --depths 16 --reps 0              # FLOPs and memory only
  python benchmarks/fast_sampling.py --tpu_topology v5e:1x1            # + the TPU compiler's FLOPs (libtpu)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# name -> (SamplingOptions fields, refiner depth for a draft/refine pair or None)
OPTIONS = {
    'full': ({}, None),
    'cfg_until=6': ({'cfg_until': 6}, None),
    'prune 8:0.5,9:0.25': ({'prune': ((8, 0.5), (9, 0.25))}, None),
    'cfg_until=6 + prune': ({'cfg_until': 6, 'prune': ((8, 0.5), (9, 0.25))}, None),
    'draft d30->d16 k=8': ({'draft_scales': 8}, 16),
    'draft k=8 + cfg_until=6 + prune 9:0.5': ({'draft_scales': 8, 'cfg_until': 6, 'prune': ((9, 0.5),)}, 16),
    # the last scale only (the settings the 64 px digits model keeps within noise, README)
    'cfg_until=8 + prune 9:0.5': ({'cfg_until': 8, 'prune': ((9, 0.5),)}, None),
    'cfg_until=8 + prune 9:0.25': ({'cfg_until': 8, 'prune': ((9, 0.25),)}, None),
}


def configs(depth):
  from var_jax.models.var_config import VQVAEConfig, var_preset
  pn = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  return VQVAEConfig(patch_nums=pn), var_preset(depth, patch_nums=pn, attn_impl='xla')


def abstract_vars(vae_cfg, var_cfg):
  from var_jax.models.var import VAR
  from var_jax.models.vqvae import VQVAE
  from flax.core import meta
  s = vae_cfg.image_size
  vae = jax.eval_shape(lambda k: meta.unbox(VQVAE(vae_cfg).init(k, jnp.zeros((1, s, s, 3)), method=VQVAE.init_all)),
                       jax.random.key(0))
  var = jax.eval_shape(lambda k: meta.unbox(VAR(var_cfg).init(k, jnp.zeros((1,), jnp.int32), jnp.zeros(
      (1, var_cfg.seq_len - var_cfg.first_l, var_cfg.z_channels)))), jax.random.key(0))
  return vae, var


def build(depth, name, batch):
  """(jitted sampler, abstract args, concrete-arg builder) of option ``name`` with target depth ``depth``."""
  from var_jax.sampling import var as vs
  fields, refiner = OPTIONS[name]
  opts = vs.SamplingOptions(cfg=1.5, top_k=900, top_p=0.96, **fields)
  vae_cfg, var_cfg = configs(depth)
  if refiner is not None:      # the target (depth) drafts, the refiner samples the rest
    _, ref_cfg = configs(refiner)
    fn = vs.sampler_fn(vae_cfg, ref_cfg, opts, drafter_config=var_cfg)
    vae_a, dr_a = abstract_vars(vae_cfg, var_cfg)
    _, ref_a = abstract_vars(vae_cfg, ref_cfg)
    args = (vae_a, ref_a, dr_a)
  else:
    fn = vs.sampler_fn(vae_cfg, var_cfg, opts)
    vae_a, var_a = abstract_vars(vae_cfg, var_cfg)
    args = (vae_a, var_a)
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
  args += (jax.ShapeDtypeStruct((batch,), jnp.int32), keys)
  return jax.jit(fn), args


def cost(compiled, batch):
  c = compiled.cost_analysis()
  c = (c[0] if isinstance(c, (list, tuple)) else c) or {}
  m = compiled.memory_analysis()
  mem = None
  if m is not None:
    mem = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return float(c.get('flops', float('nan'))) / batch, mem


def lowered_flops(lowered, batch):
  """FLOPs of the lowered (not yet optimised) program per image: no XLA compile, so cheap for d30."""
  c = lowered.cost_analysis()
  c = (c[0] if isinstance(c, (list, tuple)) else c) or {}
  return float(c.get('flops', float('nan'))) / batch


def decode_flops(batch):
  """FLOPs per image of the VQVAE decode (f_hat -> image) that ends every option's program."""
  from var_jax.models.vqvae import VQVAE
  vae_cfg, _ = configs(16)
  vae_a, _ = abstract_vars(vae_cfg, configs(16)[1])
  pn = vae_cfg.patch_nums[-1]
  f = jax.ShapeDtypeStruct((batch, pn, pn, vae_cfg.z_channels), jnp.float32)
  return lowered_flops(jax.jit(lambda v, x: VQVAE(vae_cfg).apply(v, x, method=VQVAE.fhat_to_img)).lower(vae_a, f),
                       batch)


def random_like(tree, seed):
  leaves, tdef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tdef, [0.02 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


def tpu_flops(fn, args, topology, batch):
  from var_jax import aot
  devs = aot.topology_devices(topology)
  sh = jax.sharding.SingleDeviceSharding(devs[0])
  a = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), args)
  return cost(fn.lower(*a).compile(), batch)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--depths', default='16,30')
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--wallclock_depth', type=int, default=16)
  ap.add_argument('--reps', type=int, default=1, help='timed calls per option after compiling (0: no timing)')
  ap.add_argument('--options', default='',
                  help='comma list of indices into the option table (default all)')
  ap.add_argument('--tpu_topology', default='', help='also compile for this TPU topology (libtpu), e.g. v5e:1x1')
  ap.add_argument('--lowered_only', action='store_true', help='FLOPs of the lowered program only (no compile: no '
                  'memory, no timing); minutes faster for d30 on a small CPU host')
  ap.add_argument('--json_out', default='')
  a = ap.parse_args()
  names = list(OPTIONS)
  if a.options:
    names = [names[int(i)] for i in a.options.split(',')]
  rows = []
  for depth in [int(d) for d in a.depths.split(',')]:
    for name in names:
      if OPTIONS[name][1] is not None and OPTIONS[name][1] >= depth:
        continue
      fn, args = build(depth, name, a.batch)
      t0 = time.perf_counter()
      lowered = fn.lower(*args)
      row = dict(depth=depth, option=name, hlo_flops_per_image=lowered_flops(lowered, a.batch))
      if not a.lowered_only:
        compiled = lowered.compile()
        row['flops_per_image'], row['memory_bytes'] = cost(compiled, a.batch)
      row['compile_s'] = time.perf_counter() - t0
      if a.tpu_topology:
        try:
          row['tpu_flops_per_image'], row['tpu_memory_bytes'] = tpu_flops(fn, args, a.tpu_topology, a.batch)
        except Exception as e:   # noqa: BLE001  (libtpu missing or unable: reported, not fatal)
          row['tpu_error'] = str(e).splitlines()[0][:200]
      if a.reps and depth == a.wallclock_depth and not a.lowered_only:
        concrete = [random_like(x, i) for i, x in enumerate(args[:-2])]
        labels = jnp.arange(a.batch, dtype=jnp.int32) % 1000
        keys = jax.random.split(jax.random.key(0), a.batch)
        lats = []
        for r in range(a.reps):
          t0 = time.perf_counter()
          jax.block_until_ready(compiled(*concrete, labels, keys))
          lats.append(time.perf_counter() - t0)
        row['images_per_s'] = a.batch / float(np.mean(lats))
      rows.append(row)
      print(json.dumps(row), flush=True)
  dec = decode_flops(a.batch)
  print(f'VQVAE decode (every option): {dec / 1e9:.0f} GFLOPs/image (lowered HLO)')
  for r in rows:
    r['decode_flops_per_image'] = dec
  print_table(rows)
  if a.json_out:
    with open(a.json_out, 'w') as f:
      json.dump(rows, f, indent=1)


def print_table(rows):
  """Markdown table of the ratios against each depth's full sampler."""
  full = {r['depth']: r for r in rows if r['option'] == 'full'}
  for r in rows:
    r.setdefault('flops_per_image', r['hlo_flops_per_image'])
  print('\n| model | option | GFLOPs/image | FLOPs ratio (full/opt) | ratio without the decode | TPU FLOPs ratio '
        '| memory (MiB, batch) | memory ratio | images/s (CPU) | speed ratio |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
  for r in rows:
    f = full.get(r['depth'], {})
    ratio = lambda k, inv=False: (f'{(f[k] / r[k]) if not inv else (r[k] / f[k]):.2f}x'
                                  if f.get(k) and r.get(k) else '-')
    model = f'd{r["depth"]}' if OPTIONS[r['option']][1] is None else f'd{r["depth"]}+d{OPTIONS[r["option"]][1]}'
    ips = f'{r["images_per_s"]:.3f}' if r.get('images_per_s') else '-'
    mem = f'{r["memory_bytes"] / 2 ** 20:.0f}' if r.get('memory_bytes') else '-'
    dec = r.get('decode_flops_per_image', 0.0)
    nodec = f'{(f["flops_per_image"] - dec) / (r["flops_per_image"] - dec):.2f}x' if f else '-'
    print(f'| {model} | {r["option"]} | {r["flops_per_image"] / 1e9:.0f} | {ratio("flops_per_image")} | {nodec} | '
          f'{ratio("tpu_flops_per_image")} | {mem} | {ratio("memory_bytes", True)} | {ips} | {ratio("images_per_s", True) if r.get("images_per_s") else "-"} |')


if __name__ == '__main__':
  main()
