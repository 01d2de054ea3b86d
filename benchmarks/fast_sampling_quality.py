"""Quality cost of VAR's training-free sampling accelerations on trained digits models (``var_jax.eval.digits``).

For the model ``--model`` (a VAR model directory, e.g. the README quickstart's ``/tmp/digits/var/model``) at its
training run's sampling settings (``sample.*`` of the run's config.json; ``--cfg/--top_k/--top_p`` override), draws
``--per_class`` images per digit with the full sampler and with each option (``--options``; draft/refine pairs with
each ``--drafter`` model directory, which must share the tokenizer), all at the same seed, and prints a table:

* class accuracy (%) and Frechet distance of the digits quality score (the same scorer as training's final score
  and ``python -m var_jax.evaluate --digits``);
* token agreement: the fraction of the L tokens equal to the full sampler's at the same seed and labels (and of the
  last scale's tokens alone);
* the full sampler's run-to-run noise: the same numbers for the full sampler at a second seed (``--seeds``), so an
  option whose difference to the full sampler is within that spread keeps the score "within noise".

Usage:
  python benchmarks/fast_sampling_quality.py --model=/tmp/digits/var/model \
      --drafter=/tmp/var_scaling/d6/model --per_class=50
  python benchmarks/fast_sampling_quality.py --model=/tmp/var_scaling/d2/model --drafter=/tmp/var_scaling/d6/model
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

import numpy as np  # noqa: E402


def default_options(k_scales: int):
  """Options for a K-scale model: guidance cut-offs, pruning of the last one or two scales, their combination."""
  last, prev = k_scales - 1, k_scales - 2
  return [
      ('cfg_until', {'cfg_until': prev}),
      ('cfg_until', {'cfg_until': prev - 1}),
      ('prune', {'prune': {last: 0.5}}),
      ('prune', {'prune': {last: 0.25}}),
      ('prune', {'prune': {prev: 0.5, last: 0.5}}),
      ('cfg_until+prune', {'cfg_until': prev, 'prune': {last: 0.5}}),
  ]


def describe(kw, drafter_name=''):
  parts = []
  if 'cfg_until' in kw:
    parts.append(f'cfg_until={kw["cfg_until"]}')
  if 'prune' in kw:
    parts.append('prune ' + ','.join(f'{s}:{f:g}' for s, f in sorted(kw['prune'].items())))
  if 'draft_scales' in kw:
    parts.append(f'{drafter_name} drafts k={kw["draft_scales"]}')
  return ' + '.join(parts) or 'full'


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--model', default='/tmp/digits/var/model')
  ap.add_argument('--drafter', action='append', default=[], help='model directory of a drafter (repeatable)')
  ap.add_argument('--draft_scales', default='', help='comma list of k for the pairs (default: 1 .. K-2)')
  ap.add_argument('--per_class', type=int, default=50)
  ap.add_argument('--seeds', default='0,1', help='the main seed, then the noise seed')
  ap.add_argument('--cfg', type=float, default=None)
  ap.add_argument('--top_k', type=int, default=None)
  ap.add_argument('--top_p', type=float, default=None)
  ap.add_argument('--batch_size', type=int, default=250)
  ap.add_argument('--no_single_options', action='store_true', help='only the draft/refine pairs')
  ap.add_argument('--json_out', default='')
  a = ap.parse_args()

  from var_jax.eval import digits
  from var_jax.pipelines.pretrained import load_pipeline
  pipe = load_pipeline(checkpoint=a.model)
  run_cfg = {}
  for d in (a.model, os.path.dirname(os.path.abspath(a.model))):
    p = os.path.join(d, 'config.json')
    if os.path.exists(p) and 'sample' in json.load(open(p)):
      run_cfg = json.load(open(p))
      break
  kw = dict(run_cfg.get('sample', {}))
  kw.update({k: v for k, v in (('cfg', a.cfg), ('top_k', a.top_k), ('top_p', a.top_p)) if v is not None})
  scorer = digits.scorer(*digits.view_of(run_path=a.model))
  labels = digits.balanced_labels(a.per_class)
  seeds = [int(s) for s in a.seeds.split(',')]
  k_scales = len(pipe.var_config.patch_nums)
  last_b, last_e = pipe.var_config.begin_ends[-1]

  rows = []

  def run(name, opts, seed, drafter=None):
    t0 = time.time()
    imgs, toks = pipe.sample(labels, seed, batch_size=a.batch_size, drafter=drafter, **kw, **opts)
    s = scorer.score(imgs, labels)
    return dict(option=name, seed=seed, class_acc=s['class_acc'], fd=s['fd'], seconds=time.time() - t0), toks

  full, ref_toks = run('full', {}, seeds[0])
  rows.append(full)
  for seed in seeds[1:]:
    r, t = run('full (noise seed)', {}, seed)
    r.update(agree=float(np.mean(t == ref_toks)), agree_last=float(np.mean(t[:, last_b:] == ref_toks[:, last_b:])))
    rows.append(r)
  options = [] if a.no_single_options else [(describe(o), o, None) for _, o in default_options(k_scales)]
  ks = [int(k) for k in a.draft_scales.split(',')] if a.draft_scales else list(range(1, k_scales - 1))
  for dpath in a.drafter:
    drafter = load_pipeline(checkpoint=dpath)
    dname = f'd{drafter.var_config.depth}'
    for k in ks:
      options.append((describe({'draft_scales': k}, dname), {'draft_scales': k}, drafter))
    options.append((describe({'draft_scales': ks[-1], 'cfg_until': k_scales - 2}, dname),
                    {'draft_scales': ks[-1], 'cfg_until': k_scales - 2}, drafter))
  for name, o, drafter in options:
    r, t = run(name, o, seeds[0], drafter)
    r.update(agree=float(np.mean(t == ref_toks)), agree_last=float(np.mean(t[:, last_b:] == ref_toks[:, last_b:])))
    rows.append(r)
    print(json.dumps(r), flush=True)

  print(f'\nmodel {a.model} (d{pipe.var_config.depth}, patch_nums {pipe.var_config.patch_nums}), {a.per_class} per '
        f'class, sampling {kw}, seed {seeds[0]}')
  print('| option | class acc (%) | Frechet distance | token agreement (all / last scale) |')
  print('| --- | --- | --- | --- |')
  for r in rows:
    ag = f'{100 * r["agree"]:.1f}% / {100 * r["agree_last"]:.1f}%' if 'agree' in r else '100% (reference)'
    print(f'| {r["option"]}{" (seed %d)" % r["seed"] if r["option"].startswith("full (") else ""} | '
          f'{r["class_acc"]:.1f} | {r["fd"]:.2f} | {ag} |')
  if a.json_out:
    with open(a.json_out, 'w') as f:
      json.dump({'model': a.model, 'sample': kw, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
