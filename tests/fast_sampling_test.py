"""VAR's training-free sampling accelerations (``var_jax.sampling.var``): guidance cut-off, token pruning, a drafter.

Tiny random models (4 scales); the full sampler's own parity with the reference is ``sampling_vs_reference_test``.
"""
import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax import VARConfig, VQVAEConfig, VARPipeline
from var_jax.sampling import var as vs

PN = (1, 2, 3, 4)
LABELS = [0, 1, 2, 4]
KW = dict(cfg=2.0, top_k=1, shard=False)


@functools.lru_cache(maxsize=None)
def make(depth: int, seed: int) -> VARPipeline:
  """A tiny VAR on one shared tokenizer (weights randomised so every block matters)."""
  vae = VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=PN,
                    using_sa=False, using_mid_sa=False)
  var = VARConfig(vocab_size=32, z_channels=8, num_classes=5, depth=depth, embed_dim=32, num_heads=2, patch_nums=PN)
  pipe = VARPipeline.init_random(vae, var, jax.random.key(0))
  leaves, tdef = jax.tree.flatten(pipe.var_variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  pipe.var_variables = jax.tree.unflatten(tdef, [l + 0.1 * jax.random.normal(k, l.shape) for l, k in
                                                 zip(leaves, keys)])
  return pipe


@functools.lru_cache(maxsize=None)
def full_tokens():
  return make(2, 1).sample(LABELS, 0, **KW)[1]


def test_options_off_is_the_plain_sampler():
  """Every option at its off value is the same SamplingOptions (one compiled program, today's)."""
  pipe = make(2, 1)
  a = pipe.sample(LABELS, 0, **KW)[1]
  n = len(pipe._jit_cache)
  b = pipe.sample(LABELS, 0, cfg_until=None, prune={}, drafter=None, draft_scales=None, **KW)[1]
  np.testing.assert_array_equal(a, b)
  assert len(pipe._jit_cache) == n
  assert vs.SamplingOptions(prune={}) == vs.SamplingOptions()


def test_cut_off_at_the_last_scale_and_keeping_every_token_are_the_full_sampler():
  """cfg_until=K-1 (guidance at every scale) with keep fraction 1.0 at every pruned scale (each option's code path:
  the kept tokens gathered, run with a packed cache, scattered back) is the full sampler. One compiled program."""
  pipe = make(2, 1)
  _, same = pipe.sample(LABELS, 0, cfg_until=len(PN) - 1, prune={2: 1.0, 3: 1.0}, **KW)
  np.testing.assert_array_equal(same, full_tokens())


def test_cfg_until_and_prune_shapes_determinism():
  """One compiled program for both options (each alone is the same code path; compiles are the cost here)."""
  pipe = make(2, 1)
  img, tok = pipe.sample(LABELS, 0, cfg_until=1, prune='3:0.5', **KW)
  _, tok2 = pipe.sample(LABELS, 0, cfg_until=1, prune={3: 0.5}, **KW)
  assert img.shape == (4, 8, 8, 3) and np.isfinite(img).all()
  assert tok.shape == full_tokens().shape and tok.dtype == np.int32
  np.testing.assert_array_equal(tok, tok2)                            # deterministic at a fixed seed
  np.testing.assert_array_equal(tok[:, :5], full_tokens()[:, :5])     # scales 0..1 (guided, unpruned) unchanged
  assert not np.array_equal(tok, full_tokens())


def test_prune_layout_and_scores():
  spans, length = vs.cache_layout((1, 2, 3, 4), ((2, 0.5), (3, 0.25)))
  assert spans == [(0, 1), (1, 5), (5, 10), (10, 14)] and length == 14
  assert vs.cache_layout((1, 2, 3, 4), ((3, 0.25),), dense_scales=4)[1] == 30
  np.testing.assert_array_equal(vs._nearest_up_index(2, 4), [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3])
  prev = jnp.zeros((1, 2, 2, 3))
  cur = jnp.zeros((1, 3, 3, 3)).at[0, 1, 2].set(1.0)
  s = vs.prune_scores(cur, prev)
  assert s.shape == (1, 9) and int(jnp.argmax(s[0])) == 5


def test_prefilled_cache_equals_decoded_cache():
  """The refiner's block-causal prefill from scales 0..k-1's input maps writes the keys/values that sampling those
  scales itself writes (given the same tokens)."""
  pipe = make(2, 1)
  k = 3
  opts = vs.SamplingOptions(cfg=2.0, top_k=1)
  var, vae = pipe.var, pipe.vae
  labels = jnp.asarray(LABELS, jnp.int32)
  keys = jax.random.split(jax.random.key(0), len(LABELS))

  @jax.jit
  def run(vae_vars, var_vars):
    st = vs._run_scales(vae, var, vae_vars, var_vars, labels, keys, opts, 0, k, vs._initial_state(var, 4))
    return st['caches'], vs.prefill_caches(var, var_vars, labels, st['in_maps'][:k], opts)

  decoded, prefilled = run(pipe.vae_variables, pipe.var_variables)
  end = pipe.var_config.begin_ends[k - 1][1]
  for d, p in zip(decoded, prefilled):
    for name in ('k', 'v'):
      assert d[name].shape == p[name].shape == (8, 30, 2, 16)
      np.testing.assert_allclose(p[name][:, :end], d[name][:, :end], atol=1e-5, rtol=1e-5)


def test_self_drafter_is_the_full_sampler():
  """A model drafting for itself: its prefilled cache replaces its own, so the tokens are the full sampler's."""
  pipe = make(2, 1)
  _, same = pipe.sample(LABELS, 0, drafter=pipe, draft_scales=2, **KW)
  np.testing.assert_array_equal(same, full_tokens())


@pytest.mark.slow
def test_drafter_with_every_option():
  pipe = make(2, 1)
  big = make(3, 2)
  img, tok = pipe.sample(LABELS, 0, drafter=big, draft_scales=2, cfg_until=2, prune={3: 0.5}, **KW)
  _, tok2 = pipe.sample(LABELS, 0, drafter=big, draft_scales=2, cfg_until=2, prune={3: 0.5}, **KW)
  assert img.shape == (4, 8, 8, 3) and tok.shape == full_tokens().shape
  np.testing.assert_array_equal(tok, tok2)
  # the drafter's scales are the drafter's own tokens (its full sampler's, up to its cut-off scale 2 >= k)
  _, big_tok = big.sample(LABELS, 0, cfg_until=2, prune={3: 0.5}, **KW)
  np.testing.assert_array_equal(tok[:, :5], big_tok[:, :5])


def test_drafter_must_share_the_tokenizer():
  pipe = make(2, 1)
  other = copy.copy(make(2, 1))
  other.vae_variables = jax.tree.map(lambda a: a + 1e-3 if a.dtype == jnp.float32 else a, other.vae_variables)
  with pytest.raises(ValueError, match='drafter: its tokenizer'):
    pipe.sample(LABELS, 0, drafter=other, draft_scales=2)


@pytest.mark.parametrize('kw, match', [
    (dict(cfg_until=4), r'cfg_until must be a scale index in \[0, 3\]'),
    (dict(cfg_until=-1), 'cfg_until must be an integer >= 0'),
    (dict(cfg_until=1.5), 'cfg_until must be an integer'),
    (dict(prune='0:0.5'), 'prune: scale index must be >= 1'),
    (dict(prune={3: 0.0}), r'prune: keep fraction of scale 3 must be in \(0, 1\]'),
    (dict(prune={4: 0.5}), 'prune: scale 4 is out of range'),
    (dict(prune='3=0.5'), 'prune must map scale indices to keep fractions'),
    (dict(draft_scales=2), 'drafter and draft_scales go together'),
    (dict(draft_scales=4, drafter='self'), r'draft_scales must be in \[1, 3\]'),
    (dict(draft_scales=0), 'draft_scales must be an integer >= 1'),
    (dict(draft_scales=1, drafter=object()), 'drafter must be a VARPipeline'),
])
def test_bad_arguments(kw, match):
  pipe = make(2, 1)
  if kw.get('drafter') == 'self':
    kw = dict(kw, drafter=pipe)
  with pytest.raises(ValueError, match=match):
    pipe.sample(LABELS, 0, **kw)
  with pytest.raises(ValueError, match=match):      # the CLIs' view checks the same, before any work
    pipe.with_sampling(**kw)


def test_with_sampling_defaults_and_identity():
  pipe = make(2, 1)
  fast = pipe.with_sampling(cfg_until=len(PN) - 1, prune={2: 1.0, 3: 1.0})    # the compiled program above
  np.testing.assert_array_equal(fast.sample(LABELS, 0, **KW)[1], full_tokens())
  assert fast.var_variables is pipe.var_variables and not pipe._fast_defaults
  assert fast.sampling_config.cfg_until == 3 and not hasattr(pipe, 'sampling_config')
  assert fast.identity()['sampling_config'] == {'cfg_until': 3, 'prune': ((2, 1.0), (3, 1.0)), 'draft_scales': 0}
