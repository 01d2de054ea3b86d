"""What a task is: the few things a model family says to the shared loop (``var_jax.train.loop``).

A task builds its models, frozen inputs (a tokenizer's variables, LPIPS weights) and optimizer from the config,
and exposes the abstract state and its shardings; the base class compiles its steps with those shardings and
holds what every family shares (schedule, gradient accumulation, the optimizer update with the EMA).

To add a family: subclass ``Task``, implement ``boxed_params`` / ``init_state`` (or rely on the default), a
``train_step(stage)`` and optionally ``eval_step`` / ``periodic_output`` / ``export``, and register it in
``var_jax.train.tasks.TASKS``.
"""
from __future__ import annotations

import dataclasses
import logging as std_logging
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from var_jax import sharding as shd
from var_jax.train import state as state_lib
from var_jax.train.state import TrainState

logging = std_logging.getLogger('var_jax.train')


@dataclasses.dataclass(frozen=True)
class Schedule:
  steps_per_epoch: int
  total_steps: int


def total_steps(config, num_train_examples: int) -> Schedule:
  """``config.total_steps`` when > 0, else ``config.epochs`` epochs of ``ceil(n / global_batch)`` steps."""
  from var_jax.data.pipeline import epoch_steps
  spe = epoch_steps(num_train_examples, config.global_batch_size)   # ceil, as the reference's sampler
  total = int(config.total_steps) if config.total_steps > 0 else max(int(round(config.epochs * spe)), 1)
  return Schedule(spe, total)


def random_tokenizer(flag: str, seed: int, init: Callable):
  """A frozen tokenizer's variables from ``init(key(seed + 1))`` (unboxed), for an empty ``config.<flag>``."""
  logging.warning('config.%s is empty: using a randomly initialised tokenizer (fine for smoke tests and the '
                  'quickstarts; train or load a real one for meaningful codes and samples)', flag)
  return jax.jit(lambda k: state_lib.unbox(init(k)))(jax.random.key(int(seed) + 1))


def accumulate(micro: Callable, params, batch, keys, accum: int):
  """``micro(params, micro_batch, keys) -> (grads, metrics)`` averaged over ``accum`` micro-batches (one
  ``lax.scan``); every key leaf of ``keys`` is split into one key per micro-batch (accum = 1: used as is)."""
  if accum == 1:
    return micro(params, batch, keys)
  mbs = jax.tree.map(lambda a: a.reshape((accum, a.shape[0] // accum) + a.shape[1:]), batch)
  ks = jax.tree.map(lambda k: jax.random.split(k, accum), keys)

  def body(carry, xs):
    g, m = micro(params, *xs)
    return jax.tree.map(jnp.add, carry, (g, m)), None

  first = jax.tree.map(lambda a: a[0], (mbs, ks))
  zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(lambda: micro(params, *first)))
  (grads, m), _ = jax.lax.scan(body, zero, (mbs, ks))
  return jax.tree.map(lambda a: a / accum, (grads, m))


class Task:
  """Base of the per-family tasks. Subclasses set, in ``__init__``: ``self.schedule``, ``self.tx``, and call
  ``self._set_state_shapes(boxed_params)``; ``load_frozen()`` gives the replicated pytree passed to every step (a
  frozen tokenizer's variables, LPIPS weights), loaded on first use of ``self.frozen`` — shapes, shardings and
  compilation need no weights."""
  name = ''
  vector_metrics: Dict[str, str] = {}      # metric -> format of its per-index scalars ('loss_scale{}')
  has_eval = False
  has_periodic_output = False
  train_flops_per_example: Optional[float] = None
  tokens_per_example: Optional[int] = None
  # the config keys naming files the task reads and never trains (a frozen tokenizer's weights, LPIPS): their
  # fingerprints are part of the run's identity (var_jax.train.identity); a rerun with other files is refused
  frozen_input_keys: Tuple[str, ...] = ()

  def __init__(self, config, mesh, rules=None):
    self.config, self.mesh = config, mesh
    self.rules = shd.rules_from_config(config.logical_axis_rules) if rules is None else rules
    self._steps: Dict[Any, Callable] = {}
    self._eval = None
    self._frozen = None
    e = config.ema
    self.ema = (float(e.decay), int(e.every), int(e.start))
    if self.ema[1] < 1:
      raise ValueError(f'config.ema.every must be >= 1, got {self.ema[1]}')

  def load_frozen(self):
    return {}

  def frozen_shapes(self):
    """The frozen inputs as ``jax.ShapeDtypeStruct`` leaves without reading any weights file (what ``var_jax.aot``
    compiles against): ``load_frozen`` traced by ``jax.eval_shape``; a task whose frozen inputs can only come from
    a file overrides it."""
    return jax.eval_shape(self.load_frozen)

  @property
  def frozen(self):
    if self._frozen is None:
      self._frozen = self.load_frozen()
    return self._frozen

  @frozen.setter
  def frozen(self, value):
    self._frozen = value

  # ---- state
  def ema_select(self, params):
    """The part of the params the EMA tracks (all of them); None-returning subclasses keep no EMA."""
    return params

  def _ema_fn(self):
    return self.ema_select if self.ema[0] > 0 else None

  def _set_state_shapes(self, boxed_params, aux_boxed=None):
    self.abstract, self.shardings = state_lib.abstract_and_shardings(
        boxed_params, self.tx, self.mesh, self.rules, ema_select=self._ema_fn(), aux_boxed=aux_boxed)

  def init_params(self, rng):
    """rng -> (unboxed params, aux variables or None) of a fresh state."""
    raise NotImplementedError

  def init_state(self) -> TrainState:
    """The initial state, born sharded (each device allocates only its shards)."""

    def init(rng):
      params, aux = self.init_params(rng)
      return state_lib.fresh_state(params, self.tx, self._ema_fn(), aux)

    return state_lib.born_sharded(init, self.shardings, self.config.seed)

  def apply_gradients(self, state: TrainState, grads, **replace) -> TrainState:
    """The optimizer update, the EMA, step + 1 (``replace``: other fields the step computed, e.g. ``aux``)."""
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return self.finish_step(state, params, opt_state, **replace)

  def finish_step(self, state: TrainState, params, opt_state, **replace) -> TrainState:
    ema = state.ema
    if self.ema[0] > 0:
      ema = state_lib.update_ema(ema, self.ema_select(params), state.step, *self.ema)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, **replace)

  def init_from(self, state: TrainState, path: str) -> TrainState:
    raise ValueError(f'config.init_from is not supported by task {self.name!r}')

  # ---- steps
  def stage(self, step: int) -> Tuple[Any, tuple]:
    """(a key for the compiled step of this stage, extra step arguments): one stage unless overridden."""
    return None, ()

  def train_step(self, stage) -> Callable:
    """-> ``fn(state, batch, frozen, *extra) -> (state, metrics)`` (to be jitted with the state's shardings)."""
    raise NotImplementedError

  def eval_step(self) -> Callable:
    """-> ``fn(params, batch (with 'mask'), frozen, key) -> {name: (sum, count)}`` with an 'examples' entry."""
    raise NotImplementedError

  def jit_step(self, stage=None, nonfinite: Optional[str] = None):
    """The compiled train step of ``stage``; ``nonfinite`` ('stop' / 'skip'): wrapped by
    ``var_jax.train.nonfinite.guard`` (the loop's)."""
    if (stage, nonfinite) not in self._steps:
      n_extra = len(self.stage(0)[1])
      rep = shd.replicated(self.mesh)
      fn = self.train_step(stage)
      if nonfinite is not None:
        from var_jax.train import nonfinite as nonfinite_lib
        fn = nonfinite_lib.guard(fn, nonfinite)
      self._steps[stage, nonfinite] = jax.jit(fn, in_shardings=(self.shardings, shd.batch_sharding(self.mesh), rep)
                                              + (None,) * n_extra,
                                              out_shardings=(self.shardings, rep), donate_argnums=(0,))
    return self._steps[stage, nonfinite]

  def jit_eval(self):
    if self._eval is None:
      rep = shd.replicated(self.mesh)
      self._eval = jax.jit(self.eval_step(), in_shardings=(self.shardings.params, shd.batch_sharding(self.mesh),
                                                            rep, None), out_shardings=rep)
    return self._eval

  # ---- reporting and outputs
  def describe(self, state) -> str:
    return f'{self.name} params: {state_lib.num_params(state.params) / 1e6:.2f}M'

  lr_schedule: Optional[Callable] = None   # step -> learning rate (set by tasks with one optimizer)

  def step_metrics(self, step: int, stage) -> Dict[str, float]:
    """Host-side metrics of the step just taken: its learning rate."""
    return {'lr': float(self.lr_schedule(step))} if self.lr_schedule else {}

  def log_line(self, m: Dict[str, float]) -> str:
    return f'loss {m["loss"]:.4f}'

  def scalars_line(self, split: str, values: Dict[str, float]) -> str:
    """The log line of a periodic output's scalars (``Summaries.scalars[split]``)."""
    if split == 'quality':
      from var_jax.eval import digits
      return digits.format_score(values)
    return ' '.join(f'{k} {v:.4g}' for k, v in values.items())

  def periodic_output(self, state, batch, step: int, workdir: str):
    """Every ``config.sample_every`` steps, on every process (sampling is collective): -> a
    ``var_jax.train.metrics.Summaries`` (images, also as PNG files in the workdir, histograms) on process 0, None
    elsewhere; the loop writes it to TensorBoard."""
    return None

  def run_info(self, state) -> Optional[Dict[str, Any]]:
    return None

  def export_tree(self, state):
    """The part of the final state the export needs (gathered to the host on every process)."""
    return {'params': state.params, 'ema': state.ema, 'aux': state.aux}

  def export(self, host, workdir: str, step: int) -> List[Tuple[str, str]]:
    """Write the trained model into ``workdir`` (process 0 only); -> [(path, what it is)]."""
    return []


def check_quality_config(config, num_classes: int):
  """``config.quality_per_class`` > 0 scores samples with the digits quality score (``var_jax.eval.digits``): only
  for a 10-class model of the built-in digits; checked before any work."""
  n = int(config.quality_per_class)
  if n < 0:
    from var_jax.train import errors
    raise errors.ConfigError(f'config.quality_per_class={n}: give 0 (off) or the samples per class to score')
  if n and (config.data.name != 'digits' or int(num_classes) != 10):
    from var_jax.train import errors
    raise errors.ConfigError(f'config.quality_per_class={n} scores samples of the built-in digits (var_jax.eval.digits)'
                             f', but data.name={config.data.name!r} and the model has {num_classes} classes: set '
                             f'--config.quality_per_class=0')


def quality_scalars(config, sample: Callable) -> Dict[str, Dict[str, float]]:
  """The digits quality score of ``config.quality_per_class`` samples of each class (``{}`` when 0):
  ``sample(labels) -> images`` in [0, 1] on process 0 (None elsewhere; it may be collective) -> ``Summaries.scalars``
  ``{'quality': score}``."""
  n = int(config.quality_per_class)
  if n <= 0:
    return {}
  from var_jax.eval import digits
  labels = digits.balanced_labels(n)
  images = sample(labels)
  if images is None:
    return {}
  return {'quality': digits.scorer(config.data.image_size, config.data.mid_reso).score(images, labels)}


def image_output(workdir: str, tag: str, step: int, image, histograms=None, scalars=None):
  """``image`` (uint8 (H, W, C)) as ``<workdir>/<tag>/step_XXXXXXXX.png`` and as TensorBoard image ``tag``
  (+ ``histograms`` {tag: values}, ``scalars`` {split: {name: value}}): the ``Summaries`` a ``periodic_output``
  returns."""
  from var_jax.train.metrics import Summaries
  path = write_png(f'{workdir}/{tag}', step, image)
  return Summaries(images={tag: image}, histograms=dict(histograms or {}), files=[path], scalars=dict(scalars or {}))


def write_png(directory: str, step: int, image) -> str:
  """``<directory>/step_XXXXXXXX.png`` (the directory is made; local or remote through epath)."""
  from etils import epath
  from var_jax import images
  epath.Path(directory).mkdir(parents=True, exist_ok=True)
  return images.write_png(f'{directory}/step_{step:08d}.png', image)
