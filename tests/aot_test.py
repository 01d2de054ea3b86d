"""AOT compilation (var_jax.aot): the real train step of a tiny VAR compiled over 8 fake CPU devices through the same
code path as a TPU topology, its memory report checked against an analytic parameter + optimizer-state count; a
slow test compiles for a v5e:2x2 slice when libtpu is importable."""
import importlib.util
import math

import jax
import numpy as np
import pytest

from tests_helpers import load_config
from var_jax import aot

KEYS = ('compiled', 'topology', 'num_devices', 'mesh', 'global_batch', 'bytes_per_device', 'memory',
        'hbm_bytes_per_device', 'fits', 'flops_per_step', 'model_flops_per_example', 'collectives',
        'state_bytes_per_device')


def tiny_var(**mesh):
  c = load_config('quickstart')
  c.model.update(depth=1, embed_dim=32, num_heads=1)
  c.vae.update(ch=32, ch_mult=(1, 1))
  c.vae.patch_nums = c.model.patch_nums = (1, 2)
  c.data.image_size = 4
  c.global_batch_size = 8
  c.mesh.update(mesh)
  return c


def analytic_state_bytes(task) -> int:
  """fp32 params + the two AdamW moments, each leaf divided by its shard count (the golden specs' sharding)."""
  total = 0
  for x, s in zip(jax.tree.leaves(task.abstract.params), jax.tree.leaves(task.shardings.params)):
    assert x.dtype == np.float32
    shards = math.prod(x.shape) // math.prod(s.shard_shape(x.shape)) if x.shape else 1
    total += 3 * 4 * math.prod(x.shape) // shards
  return total


def test_cpu_compile_reports_memory_and_keys():
  c = tiny_var(data=2, fsdp=4, tensor=1)
  rep = aot.run(c, 'cpu', sampler=False)
  assert set(KEYS) <= set(rep), sorted(set(KEYS) - set(rep))
  assert rep['compiled'] is True and rep['num_devices'] == 8 and rep['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert rep['global_batch'] == 8 and rep['hbm_bytes_per_device'] is None and rep['fits'] is None
  task, _, _ = aot.build_task(aot.prepare_config(c), jax.devices())
  want = analytic_state_bytes(task)
  assert want < rep['state_bytes_per_device'] < 1.1 * want       # + the step counter and small optimizer scalars
  assert rep['bytes_per_device'] >= want
  assert rep['memory']['argument'] >= want
  assert rep['flops_per_step'] > 0 and rep['collectives']['all-reduce']['count'] + \
      rep['collectives']['reduce-scatter']['count'] > 0       # gradients are reduced over data x fsdp


def test_hlo_collective_parsing():
  hlo = '''
  %all-gather-start.1 = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(bf16[4,8]{1,0} %p), dimensions={0}
  %all-gather-done.1 = bf16[16,8]{1,0} all-gather-done((bf16[4,8]{1,0}, bf16[16,8]{1,0}) %all-gather-start.1)
  ROOT %all-reduce.2 = f32[10]{0} all-reduce(f32[10]{0} %x), to_apply=%add
  %rs = f32[2,3]{1,0} reduce-scatter(f32[8,3]{1,0} %y), dimensions={0}
  %splash_mha_fwd_residuals.2 = f32[2]{0} custom-call(f32[2]{0} %z), custom_call_target="tpu_custom_call"
  '''
  got = aot.collectives(hlo)
  assert got['all-gather-via-all-reduce']['count'] == 0
  assert got['all-gather'] == {'count': 1, 'bytes': 16 * 8 * 2}
  assert got['all-reduce'] == {'count': 1, 'bytes': 40}
  assert got['reduce-scatter'] == {'count': 1, 'bytes': 24}
  assert got['all-to-all']['count'] == 0
  assert aot.custom_calls(hlo) == {'targets': {'tpu_custom_call': 1}, 'kernels': {'splash_mha_fwd_residuals': 1}}


def test_hlo_tpu_collective_forms():
  """The TPU compiler's reduce-scatter (a fusion calling an all-reduce-scatter computation: all-reduce, then this
  device's slice) and its all-gather as an all-reduce of shard-filled buffers are named as such."""
  hlo = '''
%all-reduce-scatter.9 (input_0: f32[256,768], input_1: f32[256,256]) -> (f32[64,768], f32[256,64]) {
  %input_0 = f32[256,768]{1,0} parameter(0)
  %all-reduce.112 = (f32[256,768]{1,0}, f32[256,256]{0,1}) all-reduce(%input_0, %input_1), to_apply=%add
  ROOT %tuple = (f32[64,768]{1,0}, f32[256,64]{0,1}) tuple(%a, %b)
}

ENTRY %main.1 (p: f32[8]) -> f32[8] {
  %fusion.731 = (f32[64,768]{1,0:T(8,128)S(1)}, f32[256,64]{0,1:T(8,128)S(1)}) fusion(%c1, %c2), kind=kOutput, calls=%all-reduce-scatter.9
  %all-reduce.124 = (bf16[1024]{0}, bf16[32,1024]{1,0}, bf16[64]{0}) all-reduce(%dynamic-update-slice.3, %convert_dynamic-update-slice_fusion.4, %fusion.12), channel_id=1
  ROOT %all-reduce.5 = f32[10]{0} all-reduce(%x), to_apply=%add
}
'''
  got = aot.collectives(hlo)
  assert got['reduce-scatter'] == {'count': 1, 'bytes': (64 * 768 + 256 * 64) * 4}
  assert got['all-gather-via-all-reduce'] == {'count': 1, 'bytes': (1024 + 32 * 1024 + 64) * 2}
  assert got['all-reduce'] == {'count': 1, 'bytes': 40}


def test_hlo_async_collective_printed_three_times_counts_once():
  """The TPU compiler prints an asynchronous all-gather in its start, body and done fusions: one channel_id, one
  collective (the VAR quickstart's 4 blocks on v5e:2x2: 206 printed all-gathers, 44 channels)."""
  hlo = '''
%fused_computation.1 (param_0.1: bf16[32,384]) -> bf16[128,384] {
  %param_0.1 = bf16[32,384]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[128,384]{1,0:T(8,128)(2,1)} all-gather(%param_0.1), channel_id=28, dimensions={0}
}
%async_collective_fusion.2 (param_0.2: bf16[32,384]) -> bf16[128,384] {
  %param_0.2 = bf16[32,384]{1,0} parameter(0)
  ROOT %all-gather.2 = bf16[128,384]{1,0:T(8,128)(2,1)S(1)} all-gather(%param_0.2), channel_id=28, dimensions={0}
}
%fused_computation.3 (param_0.3: bf16[32,384]) -> bf16[128,384] {
  %param_0.3 = bf16[32,384]{1,0} parameter(0)
  ROOT %all-gather.3 = bf16[128,384]{1,0} all-gather(%param_0.3), channel_id=28, dimensions={0}
  %all-gather.4 = bf16[128,64]{1,0} all-gather(%param_0.3), channel_id=29, dimensions={0}
}
'''
  got = aot.collectives(hlo)
  assert got['all-gather'] == {'count': 2, 'bytes': (128 * 384 + 128 * 64) * 2}


def test_tokenizer_compiles_without_lpips_weights():
  """Every task compiles from its config alone: the tokenizer's LPIPS comes from its layout table, not a file."""
  c = load_config('vqvae_quickstart')
  c.global_batch_size = 8
  c.mesh.update(data=8, fsdp=1, tensor=1)
  c.loss.lpips = 1.0                      # on, with no weights file (lpips_path '')
  assert not c.loss.lpips_path
  rep = aot.run(c, 'cpu')
  assert rep['compiled'] is True and rep['config_task'] == 'tokenizer', rep.get('error')
  assert 'sampler' not in rep and rep['flops_per_step'] > 0


def test_plan_variants_fsdp_remat_then_micro_batches():
  c = load_config('var_d36')                                   # 768 images: 12 per device on 64 devices
  c.mesh.update(data=-1, fsdp=1, tensor=1)                     # from data parallelism without remat
  c.model.remat = False
  names = [n for n, _ in aot.plan_variants(c, 64)]
  assert names == ['fsdp', 'fsdp+remat', 'fsdp+remat+accum2', 'fsdp+remat+accum3', 'fsdp+remat+accum4',
                   'fsdp+remat+accum6']
  assert dict(aot.plan_variants(c, 64))['fsdp+remat+accum4'] == {'mesh.data': 1, 'mesh.fsdp': -1, 'mesh.tensor': 1,
                                                                 'model.remat': True, 'grad_accum': 4}
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  assert [n for n, _ in aot.plan_variants(c, 256)] == ['fsdp+remat', 'fsdp+remat+accum3']   # 3 per device
  d30 = load_config('var_d30')                                 # FSDP + remat already: only micro-batches left
  assert [n for n, _ in aot.plan_variants(d30, 64)] == ['fsdp+remat+accum2', 'fsdp+remat+accum4',
                                                         'fsdp+remat+accum8', 'fsdp+remat+accum16']
  t = load_config('vqvae_f16')
  assert [n for n, _ in aot.plan_variants(t, 8)] == ['fsdp']         # no remat option, no micro-batching


def test_mesh_that_does_not_divide_the_width_becomes_hybrid():
  """FSDP over 8 devices cannot split a width of 36 (VAR-d30's 1920 over 256 chips alike): the report compiles on
  data 2 x fsdp 4 and says why."""
  c = tiny_var(data=1, fsdp=-1, tensor=1)
  c.model.update(embed_dim=36, num_heads=1)
  rep = aot.run(c, 'cpu', sampler=False)
  assert rep['compiled'] is True and rep['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1}, rep.get('error')
  assert rep['mesh_note'].startswith('fsdp shrunk to 4 (data takes the rest): ') and 'split 8 ways' in rep['mesh_note']


def test_bad_topology_is_one_clear_error():
  with pytest.raises(aot.AOTError, match='v5e-256.*expected cpu or'):
    aot.topology_devices('v5e-256')
  with pytest.raises(aot.AOTError, match='num_slices'):
    aot.topology_devices('cpu', num_slices=2)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='libtpu is not importable (pip install -e ".[tpu]" in a separate environment)')
def test_v5e_2x2_memory_matches_analytic_state():
  c = tiny_var(data=1, fsdp=4, tensor=1)
  c.model.update(depth=2, embed_dim=256, num_heads=4)
  rep = aot.run(c, 'v5e:2x2', sampler=True)
  assert rep['compiled'] is True and rep['num_devices'] == 4 and rep['device_kind'].startswith('TPU v5')
  assert rep['hbm_bytes_per_device'] == 16 * 2 ** 30 and rep['fits'] is True
  devices = aot.topology_devices('v5e:2x2')
  task, _, _ = aot.build_task(aot.prepare_config(c), devices)
  want = analytic_state_bytes(task)
  frozen = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(aot.abstract_frozen(task)))
  batch = 8 // 4 * (4 * 4 * 3 + 1) * 4
  # the arguments are the sharded state + the replicated tokenizer + this device's batch (+ small padding)
  assert want + frozen + batch <= rep['memory']['argument'] <= 1.15 * (want + frozen + batch) + 65536
  assert rep['sampler']['compiled'] is True
