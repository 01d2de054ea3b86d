"""remat (rematerialised blocks, the AOT planner's memory option) changes neither the parameter tree nor the loss
nor the gradients in training mode (dropout and drop path on), for VAR, ELM AR / MLM and BiGR."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.models.bigr import BiGR, BiGRConfig
from var_jax.models.elm import ELMAR, ELMMLM, ELMConfig
from var_jax.models.var import VAR
from var_jax.models.var_config import VARConfig

LLAMA = dict(dim=64, n_layer=2, n_head=4, block_size=16, num_classes=10, resid_dropout_p=0.1, ffn_dropout_p=0.1,
             drop_path_rate=0.2)
LABELS = jnp.array([1, 2])
TOKENS = jax.random.randint(jax.random.key(4), (2, 16, 2), 0, 8)
BITS = (jax.random.uniform(jax.random.key(5), (2, 16, 8)) > 0.5).astype(jnp.float32)
RNGS = {'dropout': jax.random.key(3)}


def _var(remat):
  cfg = VARConfig(vocab_size=32, z_channels=8, num_classes=5, depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2),
                  drop_path_rate=0.3, remat=remat)
  x = jax.random.normal(jax.random.key(0), (2, 4, 8))
  return VAR(cfg), (jnp.array([1, 3]), x), lambda m, v, a: m.apply(v, *a, deterministic=False, rngs=RNGS)


CASES = {
    'var': _var,
    'elm_ar': lambda r: (ELMAR(ELMConfig(modeling='ar', token_each=2, code_dim=3, remat=r, **LLAMA)), (TOKENS, LABELS),
                         lambda m, v, a: m.apply(v, *a, train=True, rngs=RNGS)),
    'elm_mlm': lambda r: (ELMMLM(ELMConfig(modeling='mlm', token_each=2, code_dim=3, remat=r, **LLAMA)),
                          (TOKENS, LABELS), lambda m, v, a: m.apply(v, *a, train=True, rngs=RNGS)),
    'bigr': lambda r: (BiGR(BiGRConfig(seq_len=16, binary_size=8, num_block_mlp=1, denoise_hidden_dim=32,
                                       use_adaLN=True, remat=r, **LLAMA)), (BITS, LABELS),
                       lambda m, v, a: m.apply(v, *a, deterministic=False, rngs=RNGS, method=BiGR.backbone)),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_remat_is_the_same_function(name):
  got = []
  for remat in (False, True):
    model, args, fwd = CASES[name](remat)
    v = model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, *args)
    leaves, tdef = jax.tree.flatten(v)       # zero-initialised heads: randomise so every parameter matters
    keys = jax.random.split(jax.random.key(7), len(leaves))
    v = jax.tree.unflatten(tdef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    loss, grads = jax.jit(jax.value_and_grad(lambda v: jnp.mean(jnp.square(fwd(model, v, args)))))(v)
    got.append((loss, grads))
  (l0, g0), (l1, g1) = got
  chex.assert_trees_all_equal_structs(g0, g1)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  assert float(l0) > 0
  chex.assert_trees_all_close(g1, g0, rtol=1e-5, atol=1e-7)
