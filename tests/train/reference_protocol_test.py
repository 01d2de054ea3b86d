"""The reference trainer's protocol (FoundationVision/VAR train.py, utils/arg_util.py, lr_control.py, amp_sc.py),
transcribed here: micro-batch schedule counting under --ac, lin<pg> under --pg, the reference's command line, and
fp16 dynamic loss scaling (against torch's GradScaler)."""
import math
import sys
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests_helpers import load_config, quickstart_config  # noqa: E402

from var_jax.train import optim, reference_args  # noqa: E402
from var_jax.train.tasks import base  # noqa: E402
from var_jax.train.tasks import var as var_task  # noqa: E402


def ref_lr_wd(sche, peak_lr, wd, wd_end, cur_it, wp_it, max_it, wp0=0.005, wpe=0.001):
  """utils/lr_control.py lr_wd_annealing, transcribed (-> (lr, wd))."""
  wp_it = round(wp_it)
  if cur_it < wp_it:
    cur_lr = wp0 + (1 - wp0) * cur_it / wp_it
  else:
    pasd = (cur_it - wp_it) / (max_it - 1 - wp_it)
    rest = 1 - pasd
    if sche == 'cos':
      cur_lr = wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * pasd))
    elif sche == 'lin':
      T = 0.15
      cur_lr = 1 if pasd < T else wpe + (1 - wpe) * rest / (1 - T)
    elif sche == 'lin0':
      T = 0.05
      cur_lr = 1 if pasd < T else wpe + (1 - wpe) * rest / (1 - T)
    elif sche == 'lin00':
      cur_lr = wpe + (1 - wpe) * rest
    elif sche.startswith('lin'):
      T = float(sche[3:])
      max_rest = 1 - T
      wpe_mid = (1 + wpe + (1 - wpe) * max_rest) / 2
      cur_lr = 1 + (wpe_mid - 1) * pasd / T if pasd < T else wpe + (wpe_mid - wpe) * rest / max_rest
    elif sche == 'exp':
      T = 0.15
      cur_lr = 1 if pasd < T else math.exp((pasd - T) / (1 - T) * math.log(wpe))
    else:
      raise NotImplementedError(sche)
  pasd = cur_it / (max_it - 1)
  return cur_lr * peak_lr, wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * pasd))


def ref_steps(ac, max_it):
  """train.py: the iterations g_it at which the optimizer steps ((g_it + 1) % ac == 0), in order."""
  return [g for g in range(max_it) if (g + 1) % ac == 0]


# ----------------------------------------------------------------------------- schedules
def test_exp_schedule_matches_reference():
  for it in [0, 3, 19, 20, 40, 63, 100, 200, 299]:
    want, _ = ref_lr_wd('exp', 1.0, 0, 0, it, 20.4, 300, wpe=0.05)
    np.testing.assert_allclose(float(optim.lr_factor(it, 20.4, 300, 'exp', 0.005, 0.05)), want, rtol=1e-5)
  optim.check_schedule('exp')
  assert 'exp' in optim.SCHEDULES


def _accum_config(unit, **kw):
  c = quickstart_config(grad_accum=2)   # batch 16 -> 20 steps / 40 micro-batches per epoch of 320 examples
  c.epochs = 8.0                        # the reference command below: --ep=8 (pinned: the quickstart's recipe may move)
  c.optim.schedule_unit = unit
  for k, v in kw.items():
    c[k] = v
  return c


def test_micro_batch_unit_lr_wd_per_step_equal_reference():
  n = 16 * 20
  for unit in ('step', 'micro_batch'):
    c = _accum_config(unit)
    c.optim.update(weight_decay=0.05, weight_decay_end=0.08, end_ratio=0.1)
    s = var_task.make_schedule(c, n)
    lr = optim.lr_schedule(c.optim, c.global_batch_size, s.schedule_total, s.warmup_steps,
                           accum=s.iters_per_step)
    peak = c.optim.base_lr * 16 / 256
    if unit == 'step':     # ours: 20 steps / epoch, 0.5-epoch warmup = 10 steps
      assert (s.total_steps, s.warmup_steps, s.iters_per_step) == (160, 10, 1)
      np.testing.assert_allclose(float(lr(0)) / peak, 0.005, rtol=1e-6)
      continue
    # the reference with --bs=16 --ac=2 --ep=8 --wp=0.5: glb_batch_size 8, iters_train 40, max_it 320, wp_it 20
    iters_train, ep, ac = 40, 8, 2
    max_it, wp_it = ep * iters_train, 0.5 * iters_train
    tlr = ac * c.optim.base_lr * (16 // ac) / 256
    assert (s.total_steps, s.warmup_steps, s.schedule_total, s.iters_per_step) == (160, 20, 320, 2)
    np.testing.assert_allclose(float(lr(0)) / peak, 0.005 + 0.995 / 20, rtol=1e-6)    # 0.05475
    g_its = ref_steps(ac, max_it)
    assert len(g_its) == s.total_steps
    for k, g in enumerate(g_its):
      want_lr, want_wd = ref_lr_wd('lin0', tlr, 0.05, 0.08, g, wp_it, max_it, wp0=0.005, wpe=0.1)
      np.testing.assert_allclose(float(lr(k)), want_lr, rtol=2e-5, err_msg=f'step {k} (g_it {g})')
      np.testing.assert_allclose(float(optim.wd_value(optim.schedule_iteration(k, 2), s.schedule_total, 0.05, 0.08)),
                                 want_wd, rtol=1e-5)


def test_micro_batch_progressive_stages_equal_reference_trainer():
  """train.py's prog_si at g_it and trainer.py's prog_wp counter (prog_it per micro-batch, no ramp at the first
  stage), at each stepping micro-batch, == Schedule.stage(optimizer step)."""
  c = _accum_config('micro_batch', total_steps=-1)
  c.progressive.update(fraction=0.8, start_stage=1, warmup_epochs=0.2)
  s = var_task.make_schedule(c, 16 * 20)
  K, ac, iters_train, ep = len(c.model.patch_nums), 2, 40, 8
  max_it, wp_it, pgwp_it = ep * iters_train, 0.5 * iters_train, 0.2 * iters_train
  prog_it, last, first = 0, -1, True
  k = 0
  for g in range(max_it):
    if g <= wp_it:
      si = 1
    elif g >= max_it * 0.8:
      si = K - 1
    else:
      si = 1 + round(min(max((g - wp_it) / (max_it * 0.8 - wp_it), 0), 1) * (K - 1 - 1))
    if last != si:
      if last != -1:
        first = False
      last, prog_it = si, 0
    prog_it += 1
    wp = 1 if first else max(min(prog_it / pgwp_it, 1), 0.01)
    if (g + 1) % ac == 0:
      got_si, got_wp = s.stage(k)
      assert got_si == (-1 if si == K - 1 else si), (k, g)
      if si != K - 1:
        np.testing.assert_allclose(got_wp, wp, rtol=1e-9, err_msg=f'step {k} g_it {g}')
      k += 1


def test_progressive_training_derives_lin_pg():
  c = quickstart_config()
  assert var_task.lr_schedule_name(c) == 'lin0'                  # pg = 0: as configured
  c.optim.schedule = 'cos'
  assert var_task.lr_schedule_name(c) == 'cos'
  c.progressive.fraction = 0.8
  with pytest.raises(ValueError, match="lin0.8"):
    var_task.lr_schedule_name(c)                                 # pg > 0 with a non-default schedule: loud
  c.optim.schedule = 'lin0'
  assert var_task.lr_schedule_name(c) == 'lin0.8'                # the reference's sche = f'lin{pg:g}'
  c.optim.schedule = 'lin0.8'
  assert var_task.lr_schedule_name(c) == 'lin0.8'
  assert reference_args.apply(load_config('var_d16'), '--pg=0.5 --sche=cos').optim.schedule == 'lin0.5'


# ----------------------------------------------------------------------------- the reference loop, in torch
def test_losses_equal_torch_reference_loop_ac2():
  """A toy linear model trained by the reference's loop (lr/wd set every micro-batch, loss x 1/ac backward,
  clip + AdamW step at (g_it + 1) % ac == 0, nowd group for the bias) in torch, and by ours (micro_batch unit,
  base.accumulate, make_optimizer): the per-micro-batch losses and the final params agree."""
  torch = pytest.importorskip('torch')
  ac, iters_train, ep, din, dout, mb = 2, 5, 3, 6, 3, 4
  max_it, wp_it = ep * iters_train, 1.0 * iters_train
  tblr, twd, twde, tclip, wpe = 1e-2, 0.05, 0.08, 0.5, 0.1
  rng = np.random.RandomState(0)
  W0 = rng.randn(dout, din).astype(np.float32) * 0.5
  b0 = rng.randn(dout).astype(np.float32) * 0.1
  X = rng.randn(max_it, mb, din).astype(np.float32)
  Y = rng.randn(max_it, mb, dout).astype(np.float32)
  glb = mb
  tlr = ac * tblr * glb / 256

  # torch: the reference loop
  W, b = torch.nn.Parameter(torch.tensor(W0)), torch.nn.Parameter(torch.tensor(b0))
  opt = torch.optim.AdamW([{'params': [W], 'wd_sc': 1.0, 'lr_sc': 1.0}, {'params': [b], 'wd_sc': 0.0, 'lr_sc': 1.0}],
                          lr=tlr, weight_decay=0, betas=(0.9, 0.95), foreach=False)
  t_losses = []
  for g in range(max_it):
    cur_lr, cur_wd = ref_lr_wd('lin0', tlr, twd, twde, g, wp_it, max_it, wp0=0.005, wpe=wpe)
    for pg in opt.param_groups:
      pg['lr'], pg['weight_decay'] = cur_lr * pg['lr_sc'], cur_wd * pg['wd_sc']
    loss = ((torch.tensor(X[g]) @ W.T + b - torch.tensor(Y[g])) ** 2).mean()
    t_losses.append(float(loss.detach()))
    loss.mul(1 / ac).backward()
    if (g + 1) % ac == 0:
      torch.nn.utils.clip_grad_norm_([W, b], tclip)
      opt.step()
      opt.zero_grad(set_to_none=True)

  # ours
  o = ml_collections.ConfigDict(dict(base_lr=tblr, lr_batch_ref=256, b1=0.9, b2=0.95, eps=1e-8, weight_decay=twd,
                                     weight_decay_end=twde, schedule='lin0', warmup_start=0.005, end_ratio=wpe,
                                     grad_clip=tclip, nowd_keys=optim.REFERENCE_NOWD_KEYS,
                                     schedule_unit='micro_batch'))
  tx = optim.make_optimizer(o, ac * mb, total_steps=max_it, warmup_steps=wp_it, accum=ac)
  params = {'dense': {'kernel': jnp.asarray(W0.T), 'bias': jnp.asarray(b0)}}
  opt_state = tx.init(params)

  def micro(p, batch, key):
    del key
    f = lambda p: jnp.mean((batch['x'] @ p['dense']['kernel'] + p['dense']['bias'] - batch['y']) ** 2)
    loss, g = jax.value_and_grad(f)(p)
    return g, {'loss': loss}

  j_losses = []
  for k in range(max_it // ac):
    sl = slice(k * ac, (k + 1) * ac)
    batch = {'x': jnp.asarray(X[sl].reshape(ac * mb, din)), 'y': jnp.asarray(Y[sl].reshape(ac * mb, dout))}
    for i in range(ac):   # each micro-batch's loss at the step's params
      j_losses.append(float(micro(params, {'x': batch['x'][i * mb:(i + 1) * mb],
                                           'y': batch['y'][i * mb:(i + 1) * mb]}, None)[1]['loss']))
    grads, _ = base.accumulate(micro, params, batch, jax.random.key(0), ac)
    upd, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, upd)
  n = len(j_losses)
  np.testing.assert_allclose(j_losses, t_losses[:n], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(params['dense']['kernel']), W.detach().numpy().T, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(params['dense']['bias']), b.detach().numpy(), rtol=2e-5, atol=2e-6)
  assert abs(j_losses[-1] - j_losses[0]) > 1e-3      # it trained


# ----------------------------------------------------------------------------- the reference command line
# utils/arg_util.py Args defaults, transcribed independently of var_jax.train.reference_args
ARG_UTIL_DEFAULTS = dict(depth=16, ini=-1, hd=0.02, aln=0.5, alng=1e-5, fp16=0, tblr=1e-4, twd=0.05, twde=0, tclip=2.,
                         ls=0.0, bs=768, ac=1, ep=250, wp=0, wp0=0.005, wpe=0.01, sche='lin0', opt='adamw',
                         saln=False, anorm=True, pn='1_2_3_4_5_6_8_10_13_16', patch_size=16, mid_reso=1.125,
                         hflip=False, pg=0.0, pg0=4, pgwp=0)

# the reference README's training commands
README_COMMANDS = {
    16: '--depth=16 --bs=768 --ep=200 --fp16=1 --alng=1e-3 --wpe=0.1',
    20: '--depth=20 --bs=768 --ep=250 --fp16=1 --alng=1e-3 --wpe=0.1',
    24: '--depth=24 --bs=768 --ep=350 --tblr=8e-5 --fp16=1 --alng=1e-4 --wpe=0.01',
    30: '--depth=30 --bs=1024 --ep=350 --tblr=8e-5 --fp16=1 --alng=1e-5 --wpe=0.01 --twde=0.08',
    36: '--depth=36 --saln=1 --pn=512 --bs=768 --ep=350 --tblr=8e-5 --fp16=1 --alng=5e-6 --wpe=0.01 --twde=0.08',
}
# depth: (global_batch_size, epochs, base_lr, init_adaln_gamma, end_ratio, weight_decay_end, shared_aln, image_size)
README_EXPECTED = {
    16: (768, 200.0, 1e-4, 1e-3, 0.1, -1.0, False, 256),
    20: (768, 250.0, 1e-4, 1e-3, 0.1, -1.0, False, 256),
    24: (768, 350.0, 8e-5, 1e-4, 0.01, -1.0, False, 256),
    30: (1024, 350.0, 8e-5, 1e-5, 0.01, 0.08, False, 256),
    36: (768, 350.0, 8e-5, 5e-6, 0.01, 0.08, True, 512),
}


def _key(c):
  return (c.global_batch_size, c.epochs, c.optim.base_lr, c.model.init_adaln_gamma, c.optim.end_ratio,
          c.optim.weight_decay_end, c.model.shared_aln, c.data.image_size)


@pytest.mark.parametrize('depth', sorted(README_COMMANDS))
def test_readme_commands_translate(depth):
  cfg_file = load_config(f'var_d{depth}')
  c = reference_args.apply(load_config('var_d16'), README_COMMANDS[depth])
  assert _key(c) == README_EXPECTED[depth]
  assert _key(cfg_file) == README_EXPECTED[depth]               # our recipe configs are those commands
  assert (c.model.depth, c.model.embed_dim, c.model.num_heads) == (depth, 64 * depth, depth)
  np.testing.assert_allclose(c.model.drop_path_rate, 0.1 * depth / 24)
  assert c.model.patch_nums == cfg_file.model.patch_nums == c.vae.patch_nums
  assert c.dtype == 'float16' and cfg_file.dtype == 'bfloat16'  # --fp16=1; our recipe files keep bf16
  assert (c.optim.warmup_epochs, c.progressive.warmup_epochs) == (-1.0, -1.0)   # wp=0 / pgwp=0: ep/50, ep/300
  assert (c.optim.schedule, c.optim.weight_decay, c.optim.grad_clip, c.label_smoothing) == ('lin0', 0.05, 2.0, 0.0)
  assert (c.optim.b1, c.optim.b2, c.optim.eps, c.optim.warmup_start) == (0.9, 0.95, 1e-8, 0.005)
  assert c.optim.schedule_unit == 'micro_batch' and c.grad_accum == 1
  assert reference_args.apply(c, README_COMMANDS[depth]).to_dict() == c.to_dict()   # idempotent


def test_reference_defaults():
  args, given = reference_args.parse('')
  assert given == ()
  for k, v in ARG_UTIL_DEFAULTS.items():
    assert args[k] == v, k
  c = reference_args.apply(load_config('var_d30'), '')         # a bare `python train.py`
  want = dict(depth=16, embed_dim=1024, num_heads=16, init_std=-1.0, init_head=0.02, init_adaln=0.5,
              init_adaln_gamma=1e-5, shared_aln=False, attn_l2_norm=True, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
  for k, v in want.items():
    assert c.model[k] == v, k
  assert (c.dtype, c.global_batch_size, c.grad_accum, c.epochs, c.total_steps) == ('float32', 768, 1, 250.0, -1)
  o = c.optim
  assert (o.base_lr, o.lr_batch_ref, o.weight_decay, o.weight_decay_end, o.grad_clip) == (1e-4, 256, 0.05, -1.0, 2.0)
  assert (o.warmup_epochs, o.warmup_start, o.end_ratio, o.schedule) == (-1.0, 0.005, 0.01, 'lin0')
  assert (c.progressive.fraction, c.progressive.start_stage, c.progressive.warmup_epochs) == (0.0, 4, -1.0)
  assert (c.data.mid_reso, c.data.hflip, c.data.image_size, c.label_smoothing) == (1.125, False, 256, 0.0)


def test_reference_conventions_and_errors():
  d16 = load_config('var_d16')
  ap = lambda s: reference_args.apply(d16, s)
  assert ap('--wp=0').optim.warmup_epochs == -1.0 and ap('--wp=2').optim.warmup_epochs == 2.0
  assert ap('--twde=0').optim.weight_decay_end == -1.0 and ap('--twde=0.1').optim.weight_decay_end == 0.1
  assert ap('--pgwp=0').progressive.warmup_epochs == -1.0 and ap('--pgwp 3').progressive.warmup_epochs == 3.0
  assert ap('--fp16=2').dtype == 'bfloat16' and ap('--fp16=0').dtype == 'float32'
  assert ap('--tclip=0').optim.grad_clip == 0.0
  c = ap('--bs=768 --ac=2 --pg=0.8 --pg0=2 --saln=true --hflip=1 --data_path=/data/in --seed=3')
  assert (c.global_batch_size, c.grad_accum, c.optim.schedule_unit) == (768, 2, 'micro_batch')
  assert (c.progressive.fraction, c.progressive.start_stage, c.optim.schedule) == (0.8, 2, 'lin0.8')
  assert c.model.shared_aln and c.data.hflip and c.data.path == '/data/in' and c.seed == 3
  assert ap('--pn=1_2_3_4_6_9_13_18_24_32').data.image_size == 512
  with pytest.raises(ValueError, match='--bogus'):
    ap('--depth=16 --bogus=1')
  with pytest.raises(ValueError, match='--tlr'):
    ap('--tlr=1e-4')
  with pytest.raises(ValueError, match='--glb_batch_size'):
    ap('--glb_batch_size=8')
  with pytest.raises(ValueError, match='--ep'):
    ap('--ep=1.5')                                            # an int in the reference
  with pytest.raises(ValueError, match='multiple of ac'):
    ap('--bs=768 --ac=5')
  with pytest.raises(ValueError, match='--opt'):
    ap('--opt=lion')
  # resolve: the config field, applied once, a no-op when empty
  d16.reference_args = '--depth=20 --ep=250'
  r = reference_args.resolve(d16)
  assert r.model.depth == 20 and reference_args.resolve(r).to_dict() == r.to_dict()
  assert reference_args.resolve(load_config('var_d16')) is not None
  from var_jax.train import tasks
  q = quickstart_config()
  q.reference_args = '--depth=2'
  with pytest.raises(ValueError, match='reference_args is not applied'):
    tasks.build(q, None, 1000)                                  # unresolved: loud, not half-applied


# ----------------------------------------------------------------------------- fp16 dynamic loss scaling
def _toy_tx(**ls):
  o = ml_collections.ConfigDict(dict(base_lr=1e-2, lr_batch_ref=256, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
                                     weight_decay_end=-1.0, schedule='lin0', warmup_start=0.005, end_ratio=0.01,
                                     grad_clip=2.0, nowd_keys=optim.REFERENCE_NOWD_KEYS))
  return optim.make_optimizer(o, 256, total_steps=100, warmup_steps=5, loss_scale=ls)


def _counts(opt_state):
  """(Adam count, lr schedule count, wd schedule count) of the wrapped chain."""
  names = ('ScaleByAdamState', 'ScaleByScheduleState', 'WeightDecaySchedule')
  out = {}
  for s in jax.tree.leaves(opt_state.inner, is_leaf=lambda x: type(x).__name__ in names):
    if type(s).__name__ in names:
      out[type(s).__name__] = int(s.count)
  return out['ScaleByAdamState'], out['ScaleByScheduleState'], out['WeightDecaySchedule']


def test_loss_scale_skips_non_finite_step_and_backs_off():
  tx = _toy_tx(init=2.0 ** 11, growth_interval=1000)
  p = {'w': jnp.full((2, 2), 2.0), 'bias': jnp.ones((2,))}
  st = tx.init(p)
  assert float(optim.loss_scale_of(st)) == 2048.0
  g = jax.tree.map(lambda x: jnp.full_like(x, 0.5) * 2048.0, p)           # gradients of loss x scale
  upd, st1 = tx.update(g, st, p)
  p1 = optax.apply_updates(p, upd)
  assert not np.allclose(p1['w'], p['w'])
  assert _counts(st1) == (1, 1, 1) and float(st1.scale) == 2048.0 and int(st1.growth_tracker) == 1
  bad = {'w': g['w'].at[0, 1].set(jnp.inf), 'bias': g['bias']}          # planted overflow
  upd, st2 = tx.update(bad, st1, p1)
  p2 = optax.apply_updates(p1, upd)
  for k in p:
    np.testing.assert_array_equal(p2[k], p1[k])                         # the step is skipped
  assert float(st2.scale) == 1024.0 and int(st2.growth_tracker) == 0    # and the scale lowered
  assert _counts(st2) == (1, 2, 2)            # Adam untouched; lr/wd schedules advance (the reference's g_it)
  jax.tree.map(np.testing.assert_array_equal, st2.inner[1], st1.inner[1])   # Adam moments kept
  upd, st3 = tx.update(jax.tree.map(lambda x: x * jnp.nan, g), st2, p2)  # NaN too
  assert float(st3.scale) == 512.0 and np.all(np.asarray(upd['w']) == 0)
  # the unscaled gradient drives the update: same params as an unscaled optimizer
  o_plain = optim.make_optimizer(ml_collections.ConfigDict(dict(
      base_lr=1e-2, lr_batch_ref=256, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, weight_decay_end=-1.0,
      schedule='lin0', warmup_start=0.005, end_ratio=0.01, grad_clip=2.0, nowd_keys=optim.REFERENCE_NOWD_KEYS)),
      256, total_steps=100, warmup_steps=5)
  upd_plain, _ = o_plain.update(jax.tree.map(lambda x: x / 2048.0, g), o_plain.init(p), p)
  np.testing.assert_allclose(optax.apply_updates(p, upd_plain)['w'], p1['w'], rtol=1e-6)


def test_loss_scale_growth_and_cap_equal_torch_gradscaler():
  """The scale sequence over planted finite / non-finite steps == torch.amp.GradScaler's with the reference's
  AmpOptimizer rule (a step taken at a scale > 2^15 resets it to 2^15)."""
  torch = pytest.importorskip('torch')
  interval, init, cap = 3, 2.0 ** 13, 2.0 ** 15
  pattern = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
  scaler = torch.amp.GradScaler('cpu', init_scale=init, growth_interval=interval)
  w = torch.nn.Parameter(torch.ones(3))
  opt = torch.optim.SGD([w], lr=0.0)
  want = []
  for bad in pattern:
    scaler.scale(w.sum()).backward()
    if bad:
      w.grad[1] = float('inf')
    scaler.unscale_(opt)
    scaler.step(opt)
    sc = scaler.get_scale()
    if sc > cap:
      scaler.update(new_scale=cap)
    else:
      scaler.update()
    opt.zero_grad(set_to_none=True)
    want.append(scaler.get_scale())
  tx = _toy_tx(init=init, growth_interval=interval, max=cap)
  p = {'w': jnp.ones((3,))}
  st = tx.init(p)
  got = []
  update = jax.jit(tx.update)
  for bad in pattern:
    g = {'w': jnp.ones((3,)) * st.scale}
    if bad:
      g['w'] = g['w'].at[1].set(jnp.inf)
    _, st = update(g, st, p)
    got.append(float(st.scale))
  assert got == want, (got, want)
  assert any(a == 2.0 ** 16 and b == cap for a, b in zip(want, want[1:]))   # the cap is reached and applied


@pytest.mark.slow   # ~2.5 min on 2 CPU cores (a VAR step compiles)
def test_float16_var_step_skips_overflow_and_is_replicated():
  """dtype='float16' gives the VAR task the scaler (its state replicated, in the train state). XLA:CPU has no
  float16 dot, so on CPU the transformer computes in bfloat16 here (the scaling path is the same). The overflow is
  planted as an inf in the head's kernel: non-finite gradients -> the step is skipped and the scale halved."""
  from var_jax import sharding as shd
  from var_jax.models.var import VAR
  from var_jax.train import tasks
  c = quickstart_config(dtype='float16')
  mesh = shd.make_mesh({'data': 1}, devices=jax.devices()[:1])
  batch = {'image': jnp.zeros((16, 32, 32, 3)), 'label': jnp.arange(16) % 10}
  task = tasks.build(c, mesh, 1000)
  if jax.default_backend() == 'cpu':
    task.var = VAR(task.var_cfg, dtype=jnp.bfloat16)
  assert task.shardings.opt_state.scale.is_fully_replicated
  step = task.jit_step(-1)
  state = task.init_state()
  assert float(state.opt_state.scale) == 2.0 ** 11
  before = jax.device_get(state.params)
  state, m = step(state, batch, task.frozen, *task.stage(0)[1])
  after = jax.device_get(state.params)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
  assert float(state.opt_state.scale) == 2.0 ** 11 and int(state.opt_state.growth_tracker) == 1
  assert np.isfinite(float(m['grad_norm'])) and float(m['loss_scale']) == 2.0 ** 11
  params = dict(state.params, head=dict(state.params['head'], kernel=state.params['head']['kernel'].at[0, 0].set(
      jnp.inf)))
  state = state.replace(params=jax.device_put(params, task.shardings.params))
  before = jax.device_get(state.params)
  state, m = step(state, batch, task.frozen, *task.stage(0)[1])
  after = jax.device_get(state.params)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))   # skipped
  assert float(state.opt_state.scale) == 2.0 ** 10 and int(state.opt_state.growth_tracker) == 0
  assert int(state.step) == 2
