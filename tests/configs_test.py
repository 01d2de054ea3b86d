"""Every config file loads, is consistent, and matches the reference recipes; schedules follow the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests_helpers import REPO, load_config, quickstart_config
from var_jax.train import tasks
from var_jax.train.tasks import var as var_task

CONFIGS = sorted(p.stem for p in (REPO / 'configs').glob('*.py') if p.stem not in ('common', 'bits_common'))


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_and_validates(name):
  from var_jax.train import stages
  c = load_config(name)
  if stages.is_multistage(c):                      # configs/digits.py: every stage, its references resolved
    stages.check(c)
    for stage in c.stage_order:
      _validate(stages.resolve(c.stages[stage], stages.stage_dirs(c, '/workdir')))
  else:
    _validate(c)


def _validate(c):
  assert c.global_batch_size > 0
  tasks.task_class(c.task)                         # a known task
  if c.task == 'tokenizer':
    from var_jax.train.tasks import tokenizer
    vae_cfg, disc_cfg = tokenizer.tokenizer_configs(c)
    assert c.optim_g.lr > 0 and c.optim_d.lr > 0
  elif c.task in ('elm_ar', 'elm_mlm', 'bigr'):
    from var_jax.train.tasks import bits
    bits.model_configs(c)          # raises on inconsistent BAE / generator / data
    assert c.optim.lr > 0
  else:
    vae_cfg, var_cfg = var_task.model_configs(c)        # raises on inconsistent tokenizer/transformer/data
    assert var_cfg.patch_nums == vae_cfg.patch_nums and c.optim.base_lr > 0


def test_reference_recipes():
  d16, d30, d36 = load_config('var_d16'), load_config('var_d30'), load_config('var_d36')
  assert (d16.model.depth, d16.model.embed_dim, d16.model.num_heads) == (16, 1024, 16)
  assert (d16.global_batch_size, d16.epochs, d16.optim.end_ratio, d16.model.init_adaln_gamma) == (768, 200, 0.1, 1e-3)
  assert (d30.global_batch_size, d30.optim.base_lr, d30.optim.weight_decay_end) == (1024, 8e-5, 0.08)
  assert d36.model.shared_aln and d36.data.image_size == 512 and d36.model.patch_nums[-1] == 32
  np.testing.assert_allclose(d16.model.drop_path_rate, 0.1 * 16 / 24)
  # defaults from docs/aot.md: d16/d20 data-parallel, d24+ FSDP over every chip, d30/d36 rematerialised
  meshes = {d: (c.mesh.data, c.mesh.fsdp, c.model.remat) for d, c in
            ((d, load_config(f'var_d{d}')) for d in (16, 20, 24, 30, 36))}
  assert meshes == {16: (-1, 1, False), 20: (-1, 1, False), 24: (1, -1, False), 30: (1, -1, True), 36: (1, -1, True)}


def test_progressive_schedule_matches_reference():
  c = quickstart_config()
  c.total_steps = 1000
  c.progressive.update(fraction=0.8, start_stage=1, warmup_epochs=0.5)
  s = var_task.make_schedule(c, 16 * 20)     # 20 steps per epoch at the test batch of 16
  assert (s.steps_per_epoch, s.warmup_steps, s.prog_warmup_steps) == (20, 10, 10)   # quickstart: 0.5-epoch warmup
  K = len(c.model.patch_nums)

  def ref_si(it):   # the reference train.py, transcribed
    if it <= s.warmup_steps:
      return 1
    if it >= 1000 * 0.8:
      return K - 1
    progress = min(max((it - s.warmup_steps) / (1000 * 0.8 - s.warmup_steps), 0), 1)
    return 1 + round(progress * (K - 1 - 1))

  for it in [0, 5, 20, 21, 300, 500, 799, 800, 999]:
    si, ramp = s.stage(it)
    want = ref_si(it)
    assert si == (-1 if want == K - 1 else want), it
    assert 0.01 <= ramp <= 1
  assert s.stage(0)[1] == 1.0                          # no ramp at the first stage
  no_prog = var_task.make_schedule(quickstart_config(), 1000)
  assert no_prog.stage(10) == (-1, 1.0)


def test_progressive_train_step_runs():
  from var_jax import sharding as shd
  c = quickstart_config()
  mesh = shd.make_mesh({'data': 1}, devices=jax.devices()[:1])
  task = tasks.build(c, mesh, 1000)
  state = task.init_state()
  batch = {'image': jnp.zeros((16, 32, 32, 3)), 'label': jnp.arange(16) % 10}
  step = jax.jit(task.train_step(1))
  state2, m = step(state, batch, task.frozen, jnp.float32(0.5))
  assert np.isfinite(float(m['train_loss'])) and int(state2.step) == 1
  assert m['loss_per_scale'].shape == (2,)             # scales 0 and 1 only
