"""The train state of every task and its abstract shapes / shardings: born sharded, never materialised whole.

``TrainState(step, params, opt_state, ema, aux)``: ``params`` is what the optimizer updates (for the tokenizer
``{'generator': ..., 'discriminator': ...}`` under one ``optax.multi_transform``), ``ema`` an EMA of (a part of)
the params or ``{}``, ``aux`` the task's other variables (the VQVAE's code-hit EMA, BatchNorm statistics) or ``{}``.
Parameter shardings come from the logical axis names of the Linen params (``var_jax.sharding``); the optimizer
state follows its parameters (``optax.tree_map_params``), the EMA its parameters, everything else is replicated.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from var_jax import sharding as shd


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any = flax.struct.field(default_factory=dict)
  aux: Any = flax.struct.field(default_factory=dict)


def unbox(tree):
  """Strip Linen's logical-axis boxes without sharding constraints (the jit's out_shardings place the arrays)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def abstract_and_shardings(boxed_params, tx: optax.GradientTransformation, mesh, rules, *,
                           ema_select: Optional[Callable[[Any], Any]] = None, aux=None, aux_boxed=None
                           ) -> Tuple[TrainState, TrainState]:
  """(abstract state, its NamedShardings) from the abstract boxed params (``jax.eval_shape`` of a Linen init).
  ``ema_select(params)``: the part of the params the EMA tracks (None: no EMA); ``aux_boxed``: abstract boxed aux
  variables (sharded by their logical names)."""
  rep = shd.replicated(mesh)
  param_sh = shd.logical_to_shardings(boxed_params, mesh, rules)
  params = unbox(boxed_params)
  opt_state = jax.eval_shape(tx.init, params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_state, param_sh, transform_non_params=lambda _: rep)
  aux_abs = unbox(aux_boxed) if aux_boxed is not None else {}
  aux_sh = shd.logical_to_shardings(aux_boxed, mesh, rules) if aux_boxed is not None else {}
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state,
                        ema=ema_select(params) if ema_select else {}, aux=aux_abs)
  shardings = TrainState(step=rep, params=param_sh, opt_state=opt_sh, ema=ema_select(param_sh) if ema_select else {},
                         aux=aux_sh)
  del aux
  return abstract, shardings


def fresh_state(params, tx, ema_select=None, aux=None) -> TrainState:
  """Step 0: the optimizer state of ``params`` and the EMA initialised to the params (traceable)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema=jax.tree.map(lambda p: p + 0, ema_select(params)) if ema_select else {},
                    aux=aux if aux is not None else {})


def born_sharded(init: Callable[[jax.Array], TrainState], shardings: TrainState, seed: int) -> TrainState:
  """``init(key(seed))`` compiled with the state's out_shardings: each device allocates only its shards."""
  return jax.jit(init, out_shardings=shardings)(jax.random.key(int(seed)))


def update_ema(ema, params, step, decay: float, every: int, start: int):
  """``ema <- decay * ema + (1 - decay) * params`` at steps ``s >= start`` with ``s % every == 0`` (``step`` is the
  step being taken, before its increment), else unchanged."""
  do = jnp.logical_and(step >= start, step % every == 0)
  return jax.tree.map(lambda e, p: jnp.where(do, e * decay + (1 - decay) * p.astype(e.dtype), e), ema, params)


def num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
