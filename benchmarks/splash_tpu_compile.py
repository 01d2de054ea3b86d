"""Lower + compile var_jax.ops.attention's splash path for a TPU topology on a CPU host (needs libtpu: run with a
venv that has jax[tpu], e.g. ``/work/venv_tpu/bin/python benchmarks/splash_tpu_compile.py --topology=v5e:2x2``).

Prints whether it compiled and the Mosaic/TPU custom calls in the optimized HLO (the splash kernel), for the VAR d16
block-causal mask (L=680, padded to 768), bfloat16, forward and backward, batch and heads sharded over the mesh.
"""
import argparse
import re

import jax
import numpy as np
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from var_jax import sharding as shd
from var_jax.models.var_config import PATCH_NUMS_256
from var_jax.ops import attention as A


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--topology', default='v5e:2x2')
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--heads', type=int, default=16)
  ap.add_argument('--head_dim', type=int, default=64)
  a = ap.parse_args()
  devices = topologies.get_topology_desc(topology_name=a.topology, platform='tpu').devices
  n = len(devices)
  mesh = jax.sharding.Mesh(np.array(devices).reshape(n, 1, 1), shd.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  L = sum(p * p for p in PATCH_NUMS_256)
  spec = NamedSharding(mesh, P(('data', 'fsdp'), None, None, None))
  arg = jax.ShapeDtypeStruct((a.batch, L, a.heads, a.head_dim), jnp.bfloat16, sharding=spec)
  mask = A.BlockCausal(PATCH_NUMS_256)

  def loss(q, k, v):
    return jnp.sum(A.attention(q, k, v, scale=1.0, mask=mask, implementation='auto').astype(jnp.float32))

  for name, fn in (('forward', lambda q, k, v: A.attention(q, k, v, scale=1.0, mask=mask)),
                   ('forward+backward', jax.grad(loss, argnums=(0, 1, 2)))):
    with shd.mesh_context(mesh):
      print(f'{name}: auto resolves to', A.resolve('auto', True, 'tpu'))
      compiled = jax.jit(fn).lower(arg, arg, arg).compile()
    hlo = compiled.as_text()
    calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
    kernels = re.findall(r'kernel_name[^,}]*splash[^,}]*|splash_[a-z_]+', hlo)
    print(f'{name}: compiled OK for {a.topology} ({n} {devices[0].device_kind}); custom calls: {calls}; '
          f'splash kernel names: {sorted(set(kernels))[:6]}')
    mem = compiled.memory_analysis()
    if mem is not None:
      print(f'  temp bytes/device {mem.temp_size_in_bytes}, args {mem.argument_size_in_bytes}')


if __name__ == '__main__':
  main()
