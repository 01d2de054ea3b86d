"""The training tasks, by ``config.task``: 'var' (VAR on a frozen VQVAE), 'tokenizer' (the VQVAE or the BAE with
its discriminator; ``config.tokenizer`` picks which), 'elm_ar' | 'elm_mlm' | 'bigr' (on a frozen BAE's bits).
``build(config, mesh, num_train_examples)`` returns a ready task: models, frozen inputs, schedule, optimizer,
abstract state and shardings (``var_jax.train.tasks.base.Task``)."""
from __future__ import annotations

import importlib

# task name -> (module, class)
TASKS = {
    'var': ('var_jax.train.tasks.var', 'VARTask'),
    'tokenizer': ('var_jax.train.tasks.tokenizer', 'TokenizerTask'),
    'elm_ar': ('var_jax.train.tasks.bits', 'BitsTask'),
    'elm_mlm': ('var_jax.train.tasks.bits', 'BitsTask'),
    'bigr': ('var_jax.train.tasks.bits', 'BitsTask'),
}


def task_class(name: str):
  if name not in TASKS:
    raise ValueError(f'config.task={name!r}: expected one of {", ".join(TASKS)}')
  module, cls = TASKS[name]
  return getattr(importlib.import_module(module), cls)


def build(config, mesh=None, num_train_examples: int = None, rules=None):
  """The task ``config.task`` names, on ``mesh`` (default: ``config.mesh`` over all devices) for a training set of
  ``num_train_examples`` (default: the size of ``config.data``'s train split)."""
  from var_jax import sharding as shd
  if config.task != 'var' and 'token_cache' in config.data and config.data.token_cache:
    from var_jax.train.errors import ConfigError
    raise ConfigError(f'config.data.token_cache is for task=\'var\' (VAR on a frozen VQVAE\'s tokens), but '
                      f'config.task={config.task!r}: set --config.data.token_cache=')
  if mesh is None:
    mesh = shd.make_mesh(config.mesh.to_dict())
  if num_train_examples is None:
    from var_jax.data import pipeline as data_lib
    num_train_examples = len(data_lib.make_source(config.data, config.data.train_split))
  return task_class(config.task)(config, mesh, num_train_examples, rules)
