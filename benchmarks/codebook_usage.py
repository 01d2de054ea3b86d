r"""Codebook collapse at the coarse scales: per-scale code usage of the tokenizer quickstart under each mitigation.

Trains configs/vqvae_quickstart.py (digits, CPU) once per variant and prints the final per-scale usage (% of codes
whose EMA hits reach the reference's margin), perplexity, L1 and PSNR:

  python benchmarks/codebook_usage.py --steps=300 [--variants=baseline,restart,znorm,znorm_restart]
"""
import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer('steps', 300, 'training steps per variant')
flags.DEFINE_list('variants', ['baseline', 'restart', 'znorm', 'znorm_restart'], 'which variants to run')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    'baseline': ['--config.codebook.restart_every=0'],
    'restart': ['--config.codebook.restart_every=50'],
    'znorm': ['--config.codebook.restart_every=0', '--config.vae.using_znorm=True'],
    'znorm_restart': ['--config.codebook.restart_every=50', '--config.vae.using_znorm=True'],
}


def run(name, steps, workdir):
  cmd = [sys.executable, '-m', 'var_jax.train', '--config=configs/vqvae_quickstart.py', f'--workdir={workdir}',
         f'--config.total_steps={steps}', '--config.sample_every=0', f'--config.ckpt_every={steps}',
         '--config.log_every=25'] + VARIANTS[name]
  subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
  recs = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return recs[-1]


def main(argv):
  del argv
  rows = []
  for name in FLAGS.variants:
    with tempfile.TemporaryDirectory() as d:
      r = run(name, FLAGS.steps, d)
    k = sorted(int(key[len('usage_scale'):]) for key in r if key.startswith('usage_scale'))
    rows.append((name, [r[f'usage_scale{i}'] for i in k], [r[f'perplexity_scale{i}'] for i in k], r['l1'], r['psnr']))
    print(f'{name:14s} usage % per scale {" ".join(f"{u:5.1f}" for u in rows[-1][1])} | perplexity '
          f'{" ".join(f"{p:6.1f}" for p in rows[-1][2])} | L1 {r["l1"]:.4f} PSNR {r["psnr"]:.2f}', flush=True)


if __name__ == '__main__':
  app.run(main)
