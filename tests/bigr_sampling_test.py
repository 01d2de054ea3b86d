"""BiGR generation against the reference fixture (injected noise) and the cosine unmasking schedule."""
import json
import math
import re

import jax
import numpy as np
import pytest

from conftest import SHARED
from var_jax.sampling import bigr as bs
from var_jax.interop import bigr as ib
from var_jax.models.bigr import BiGR

REF = SHARED / 'fixtures' / 'elm_bigr_reference'
FIX = REF / 'bigr_k8'


@pytest.fixture(scope='module')
def ref():
  io = dict(np.load(FIX / 'io.npz'))
  cj = json.loads((FIX / 'config.json').read_text())
  cfg, variables = ib.load_bigr(FIX / 'bigr.pt', **cj['model_args'])
  return BiGR(cfg), variables, io, cj


def _settings(cj):
  return dict(num_iter=cj['num_iter'], cfg_scale=cj['cfg_scale'], cfg_schedule=cj['cfg_schedule'],
              gumbel_temp=cj['gumbel_temp'], gumbel_schedule=cj['gumbel_schedule'])


def test_injected_noise_reproduces_reference(ref):
  model, variables, io, cj = ref
  noise = {'u_diff': io['sample_u_diff'], 'u_select': io['sample_u_select'], 'gumbel': io['sample_gumbel']}
  out = jax.tree.map(np.asarray, bs.generate(model, variables, io['labels'], noise=noise, **_settings(cj)))
  np.testing.assert_array_equal(out['bits'], io['sample_bits'])
  np.testing.assert_array_equal(out['unmask_iter'], io['sample_unmask_iter'])
  np.testing.assert_array_equal(out['unmask_count'], io['sample_unmask_count'])
  np.testing.assert_array_equal(out['mask_before'], io['sample_mask_before'].astype(bool))
  assert float(np.max(np.abs(out['pred'] - io['sample_pred']))) < 1e-4
  assert not out['final_mask'].any()


def test_schedules_json():
  table = json.loads((REF / 'schedules.json').read_text())
  n_checked = 0
  for key, want in table.items():
    m = re.fullmatch(r'bigr_cos_N(\d+)_iter(\d+)', key)
    if m:
      got = bs.cosine_unmask_counts(int(m.group(1)), int(m.group(2)))
      np.testing.assert_array_equal(got, want, err_msg=key)
      assert got.sum() == int(m.group(1))
      n_checked += 1
  assert n_checked >= 15
  # README example: N = 256, 20 iterations
  np.testing.assert_array_equal(bs.cosine_unmask_counts(256, 20),
                                [1, 3, 4, 5, 7, 8, 10, 11, 13, 13, 15, 16, 17, 17, 19, 18, 20, 19, 20, 20])


def test_cfg_and_gumbel_schedules():
  np.testing.assert_allclose(bs.cfg_scales(3.0, 'linear', 4), [1.5, 2.0, 2.5, 3.0])
  np.testing.assert_allclose(bs.cfg_scales(3.0, 'constant', 3), [3.0] * 3)
  np.testing.assert_allclose(bs.gumbel_scales(0.5, 'down', 4), [0.375, 0.25, 0.125, 0.0])
  np.testing.assert_allclose(bs.gumbel_scales(0.5, 'up', 2), [0.25, 0.5])
  np.testing.assert_allclose(bs.gumbel_scales(0.5, 'constant', 2), [0.5, 0.5])
  with pytest.raises(ValueError, match='cfg_schedule'):
    bs.cfg_scales(3.0, 'cos', 4)
  with pytest.raises(ValueError, match='gumbel_schedule'):
    bs.gumbel_scales(1.0, 'sideways', 4)


def test_prng_key_sampling(ref):
  model, variables, io, cj = ref
  n = model.config.seq_len
  fn = bs.make_generate_fn(model, 2, num_iter=3, cfg_scale=2.0, cfg_schedule='linear', gumbel_temp=1.0,
                           gumbel_schedule='constant', infer_steps=4)
  a = jax.tree.map(np.asarray, fn(variables, io['labels'], jax.random.key(0)))
  b = jax.tree.map(np.asarray, fn(variables, io['labels'], jax.random.key(0)))
  c = jax.tree.map(np.asarray, fn(variables, io['labels'], jax.random.key(1)))
  np.testing.assert_array_equal(a['bits'], b['bits'])
  assert not np.array_equal(a['bits'], c['bits'])
  assert set(np.unique(a['bits'])) <= {0, 1} and a['bits'].shape == (2, n, 8)
  counts = bs.cosine_unmask_counts(n, 3)
  for it in range(3):   # each iteration fixes exactly its count of positions per image
    np.testing.assert_array_equal((a['unmask_iter'] == it).sum(1), [counts[it]] * 2)
  assert not a['final_mask'].any() and (a['unmask_iter'] >= 0).all()
  # a position is masked before iteration it iff it is fixed at it or later
  for it in range(3):
    np.testing.assert_array_equal(a['mask_before'][it], a['unmask_iter'] >= it)
  assert ((a['pred'] >= 0) & (a['pred'] <= 1)).all() and math.isfinite(float(a['pred'].sum()))
