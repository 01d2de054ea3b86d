"""The reference optimisation recipe: no-decay groups, lr/wd schedules, AdamW update."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from var_jax import VAR, VARConfig
from var_jax.train import optim


def _ref_lr(sche, cur_it, wp_it, max_it, wp0=0.005, wpe=0.01):
  """The reference lr_wd_annealing factor, transcribed for the test (scalar Python)."""
  wp_it = round(wp_it)
  if cur_it < wp_it:
    return wp0 + (1 - wp0) * cur_it / wp_it
  pasd = (cur_it - wp_it) / (max_it - 1 - wp_it)
  rest = 1 - pasd
  if sche == 'cos':
    return wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * pasd))
  if sche in ('lin', 'lin0'):
    t = 0.15 if sche == 'lin' else 0.05
    return 1 if pasd < t else wpe + (1 - wpe) * rest / (1 - t)
  if sche == 'lin00':
    return wpe + (1 - wpe) * rest
  t = float(sche[3:])
  mid = (1 + wpe + (1 - wpe) * (1 - t)) / 2
  return 1 + (mid - 1) * pasd / t if pasd < t else wpe + (mid - wpe) * rest / (1 - t)


def test_lr_schedules_match_reference():
  for sche in ('lin0', 'lin', 'cos', 'lin00', 'lin0.8'):
    for it in [0, 1, 7, 19, 20, 21, 50, 63, 150, 299]:
      want = _ref_lr(sche, it, 20.4, 300, wpe=0.1)
      got = float(optim.lr_factor(it, 20.4, 300, sche, 0.005, 0.1))
      np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f'{sche} @ {it}')


def test_weight_decay_cosine():
  np.testing.assert_allclose(optim.wd_value(0, 101, 0.05, 0.08), 0.05, rtol=1e-6)
  np.testing.assert_allclose(optim.wd_value(50, 101, 0.05, 0.08), 0.065, rtol=1e-6)
  np.testing.assert_allclose(optim.wd_value(100, 101, 0.05, 0.08), 0.08, rtol=1e-6)


def _params(shared_aln):
  cfg = VARConfig(vocab_size=16, z_channels=4, num_classes=3, depth=2, embed_dim=64, num_heads=1, patch_nums=(1, 2),
                  shared_aln=shared_aln)
  from flax.core import meta
  return meta.unbox(VAR(cfg).init(jax.random.key(0), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 4, 4))))['params']


def test_no_decay_groups_follow_reference():
  from flax import traverse_util
  for saln in (False, True):
    mask = traverse_util.flatten_dict(optim.decay_mask(_params(saln)))
    names = {'/'.join(k): v for k, v in mask.items()}
    for name, decayed in names.items():
      if name.endswith('bias') or any(k in name for k in ('pos_1LC', 'pos_start', 'lvl_embed', 'scale_mul',
                                                             'ada_gss', 'q_bias', 'v_bias')):
        assert not decayed, name
      elif name.endswith('kernel') or name == 'class_emb':   # the reference decays the class embedding
        assert decayed, name


def test_adamw_step_matches_decoupled_formula():
  c = ml_collections.ConfigDict(dict(base_lr=1e-3, lr_batch_ref=256, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
                                     weight_decay_end=-1.0, schedule='lin0', warmup_start=0.005, end_ratio=0.01,
                                     grad_clip=0.0, nowd_keys=optim.REFERENCE_NOWD_KEYS))
  tx = optim.make_optimizer(c, 256, total_steps=100, warmup_steps=0)
  p = {'w': jnp.full((2, 2), 2.0), 'b': jnp.full((2,), 2.0)}
  g = {'w': jnp.full((2, 2), 0.5), 'b': jnp.full((2,), 0.5)}
  upd, _ = tx.update(g, tx.init(p), p)
  new = optax.apply_updates(p, upd)
  # first Adam step: m_hat/sqrt(v_hat) = sign(g) = 1; decoupled decay on the kernel only
  np.testing.assert_allclose(new['w'], 2.0 - 1e-3 * (1.0 + 0.05 * 2.0), rtol=1e-5)
  np.testing.assert_allclose(new['b'], 2.0 - 1e-3 * 1.0, rtol=1e-5)


def test_schedule_unit_and_iteration():
  assert optim.schedule_iteration(0, 1) == 0 and optim.schedule_iteration(5, 1) == 5
  assert [optim.schedule_iteration(s, 2) for s in range(3)] == [1, 3, 5]   # the step's last micro-batch
  assert optim.schedule_unit(ml_collections.ConfigDict(dict(schedule='lin0'))) == 'step'   # absent: 'step'
  import pytest
  with pytest.raises(ValueError, match='schedule_unit'):
    optim.schedule_unit(ml_collections.ConfigDict(dict(schedule_unit='epoch')))
