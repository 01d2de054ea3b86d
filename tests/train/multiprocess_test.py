"""Every task trains to completion on two processes (jax.distributed on CPU, 2 devices each, gloo collectives),
writes each output once, and exports the same model as one process with 4 devices: the global batches are the same
(each process feeds its contiguous block of the single-process batch), so the two runs differ only by the order of
floating-point reductions across processes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests_helpers import free_port, process_env
from conftest import REPO

TINY_BAE = ['--config.data.image_size=8', "--config.bae.ch_mult=(1,1)", '--config.bae.res_blocks=1',
            '--config.bae.resolution=8', "--config.bae.attn_resolutions=()"]
TINY_GEN = ['--config.model.dim=32', '--config.model.n_head=2', '--config.model.n_layer=1', '--config.eval_every=4']
RUNS = {
    'var': ['--config=configs/quickstart.py', '--config.model.depth=2', '--config.model.embed_dim=64',
            '--config.model.num_heads=1', '--config.sample_every=4', "--config.sample_classes=(0,1)",
            '--config.eval_every=4'],
    'vqvae': ['--config=configs/vqvae_quickstart.py', '--config.data.image_size=8', '--config.data.mid_reso=1.0',
              '--config.vae.vocab_size=64', '--config.vae.z_channels=8', '--config.vae.ch=32',
              "--config.vae.ch_mult=(1,2)", "--config.vae.patch_nums=(1,2,4)",
              '--config.loss.disc_start=2', '--config.disc.n_layers=1', '--config.sample_every=4'],
    'bae': ['--config=configs/bae_quickstart.py', '--config.data.mid_reso=1.0', '--config.bae.nf=32',
            '--config.bae.codebook_size=8', '--config.bae.emb_dim=32', '--config.loss.disc_start=2', '--config.disc.n_layers=1',
            '--config.sample_every=4'] + TINY_BAE,
    'elm_ar': ['--config=configs/elm_quickstart.py', '--config.eval_batches=1'] + TINY_BAE + TINY_GEN,
    'elm_mlm': ['--config=configs/elm_mlm_quickstart.py', '--config.eval_batches=1'] + TINY_BAE + TINY_GEN,
    'bigr': ['--config=configs/bigr_quickstart.py', '--config.eval_batches=1', '--config.model.denoise_hidden_dim=32',
             '--config.model.n_sample_steps=16'] + TINY_BAE + TINY_GEN,
}
COMMON = ['--config.global_batch_size=16', '--config.total_steps=4', '--config.log_every=1', '--config.ckpt_every=2',
          '--config.mesh.data=-1']
KINDS = ['var', 'vqvae', 'bae', 'elm_ar', 'elm_mlm', 'bigr']


def _train(kind, workdir, processes):
  cmd = [sys.executable, '-m', 'var_jax.train', f'--workdir={workdir}'] + RUNS[kind] + COMMON
  if processes == 1:
    r = subprocess.run(cmd, cwd=REPO, env=process_env(4), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return [r.stdout]
  port = free_port()
  procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=process_env(2, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
                                     JAX_PROCESS_ID=str(i))) for i in range(processes)]
  outs = []
  for p in procs:
    out, _ = p.communicate(timeout=900)
    outs.append(out)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, '\n\n'.join(outs)
  return outs


def _metrics(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


def _exported(kind, workdir):
  """The exported weights as {name: array}."""
  if kind == 'var':
    from var_jax import checkpoint
    from flax import traverse_util
    _, _, vae, var = checkpoint.load_model(os.path.join(workdir, 'model'))
    return {'/'.join(k): v for k, v in traverse_util.flatten_dict({'vae': vae, 'var': var}).items()}
  from var_jax.interop.state_dict import load_state_dict
  name = {'vqvae': 'vqvae.safetensors', 'bae': 'binaryae.safetensors', 'elm_ar': 'model.pth',
          'elm_mlm': 'model.pth', 'bigr': 'bigr.pt'}[kind]
  sd = load_state_dict(os.path.join(workdir, name), wrapper_key='ema' if kind == 'bigr' else None)
  return {k: np.asarray(v) for k, v in sd.items()}


@pytest.mark.slow
@pytest.mark.parametrize('kind', KINDS)
def test_two_processes_match_one(kind, tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  _train(kind, one, 1)
  outs = _train(kind, two, 2)
  assert 'process 1/2' in outs[1]
  m1, m2 = _metrics(one), _metrics(two)
  train1 = [r for r in m1 if r['split'] == 'train']
  train2 = [r for r in m2 if r['split'] == 'train']
  assert [r['step'] for r in train2] == [1, 2, 3, 4]                      # written once, by process 0
  loss = 'train_loss' if kind == 'var' else ('l1' if kind in ('vqvae', 'bae') else 'loss')
  np.testing.assert_allclose([r[loss] for r in train2], [r[loss] for r in train1], rtol=1e-5)
  assert sorted(os.listdir(two / 'checkpoints')) == ['2', '4']
  a, b = _exported(kind, one), _exported(kind, two)
  assert sorted(a) == sorted(b) and a
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=2e-5, err_msg=k)
  leftovers = [f for f in os.listdir(two) if f.endswith('.tmp') or 'tmp-' in f]
  assert not leftovers, leftovers
