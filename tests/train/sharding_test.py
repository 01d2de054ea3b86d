"""Sharded (data=2, fsdp=2, tensor=2 on 8 fake CPU devices) and single-device training agree; params are really
sharded as the logical-axis rules say."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from var_jax import sharding as shd
from var_jax.train import tasks
from tests_helpers import quickstart_config


def _setup(config, mesh):
  task = tasks.build(config, mesh, 1000)
  return task.init_state(), task.frozen, task.jit_step(-1)


def _batches(config, n):
  rng = np.random.default_rng(0)
  s = config.data.image_size
  for _ in range(n):
    yield {'image': rng.uniform(-1, 1, (config.global_batch_size, s, s, 3)).astype(np.float32),
           'label': rng.integers(0, 10, (config.global_batch_size,)).astype(np.int32)}


def _run(config, mesh, n=3):
  state, vae_vars, step = _setup(config, mesh)
  losses = []
  with shd.mesh_context(mesh):
    for b in _batches(config, n):
      state, m = step(state, shd.host_local_to_global(b, mesh), vae_vars, jnp.float32(1.0))
      losses.append(float(m['train_loss']))
  return losses, state


def test_sharded_equals_single_device():
  config = quickstart_config(global_batch_size=16, grad_accum=2)   # micro-batching on too
  config.model.drop_path_rate = 0.1          # exercises the dropout rng under sharding too
  single = shd.make_mesh({'data': 1}, devices=jax.devices()[:1])
  sharded = shd.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  l1, s1 = _run(config, single)
  l8, s8 = _run(config, sharded)
  np.testing.assert_allclose(l8, l1, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5)
  # the parameters and Adam moments are sharded as the rules say
  fc1 = s8.params['blocks_0']['ffn']['fc1']['kernel']
  assert fc1.sharding.spec == P('fsdp', 'tensor')
  assert fc1.addressable_shards[0].data.shape == (fc1.shape[0] // 2, fc1.shape[1] // 2)
  assert s8.params['class_emb'].sharding.spec == P(None, 'fsdp')
  assert s8.params['head']['kernel'].sharding.spec == P('fsdp', 'tensor')
  mu = s8.opt_state[1].mu['blocks_0']['attn']['mat_qkv']['kernel']
  assert mu.sharding.spec == P('fsdp', 'tensor')


def test_mesh_shapes_and_errors():
  assert shd.mesh_shape({'data': -1, 'fsdp': 2}, 8) == (4, 2, 1)
  assert shd.mesh_shape({'data': 1, 'fsdp': -1, 'tensor': 2}, 8) == (1, 4, 2)
  with pytest.raises(ValueError, match='at most one axis may be -1'):
    shd.mesh_shape({'data': -1, 'fsdp': -1}, 8)
  with pytest.raises(ValueError, match='needs 6 devices'):
    shd.mesh_shape({'data': 3, 'fsdp': 2}, 8)
  mesh = shd.make_mesh({'data': 4, 'fsdp': 2})
  with pytest.raises(ValueError, match='not divisible by data x fsdp = 8'):
    shd.global_batch_size_ok(12, mesh)


def test_a_mesh_that_cannot_split_a_parameter_is_one_clear_error():
  """FSDP over 8 devices and a width of 36: one error naming a parameter, its dim and a mesh that works, before
  anything is placed."""
  import pytest
  from tests_helpers import quickstart_config
  from var_jax.train import tasks
  c = quickstart_config()
  c.model.update(embed_dim=36)
  c.mesh.update(data=1, fsdp=8, tensor=1)
  with pytest.raises(shd.MeshDivisibilityError, match=r"has dim 0 of 36 split 8 ways over mesh axis fsdp; the largest "
                                                       r"split of fsdp dividing every such dim is 4: e\.g\. "
                                                       r"--config\.mesh\.fsdp=4 --config\.mesh\.data=-1"):
    tasks.build(c, shd.make_mesh(c.mesh.to_dict()), 1000)
