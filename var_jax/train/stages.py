"""Multi-stage runs: a tokenizer, then a generator on its codes, from one command and one config.

A multi-stage config (``configs/digits.py``) holds ``stage_order`` (names) and ``stages.<name>``: each an ordinary
training config. ``python -m var_jax.train --config=configs/digits.py --workdir=W`` trains them in order, each in
``W/<name>`` (its own checkpoints, metrics, ``config.json`` and exports), and then scores the last stage's model:

* A stage's string fields may name an earlier stage's directory as ``{<name>}``: the VAR stage's
  ``vae_ckpt='{tokenizer}/vqvae.safetensors'`` reads what the tokenizer stage exported, without the user naming files.
* Rerunning the command resumes: a finished stage (``W/<name>/stage.json`` records its resolved config) is skipped,
  an interrupted one resumes from its last checkpoint (the loop's usual resume). A finished stage whose config has
  changed since is trained again from its checkpoints (e.g. more steps), and the stages after it too.
* At the end (``final``): ``final.per_class`` samples of each class from the last stage's exported model at its
  ``sample`` settings, a labelled grid (``W/samples.png``, ``final.grid_per_class`` per class, a row per class) and
  the digits quality score (``var_jax.eval.digits``) printed and written to ``W/quality.json``, with the
  unconditional baseline beside it (as many samples of the null class, scored against the same labels).
"""
from __future__ import annotations

import json
import logging as std_logging
import time
from typing import Dict, List

import numpy as np

logging = std_logging.getLogger('var_jax.train')

STAGE_RECORD = 'stage.json'


def is_multistage(config) -> bool:
  return 'stages' in config


def stage_dirs(config, workdir: str) -> Dict[str, str]:
  return {name: f'{workdir}/{name}' for name in config.stage_order}


def check(config):
  """The stage list before any work: every name has a config, every ``{name}`` reference an earlier stage."""
  from var_jax.train import errors
  order = list(config.stage_order)
  if not order:
    raise errors.ConfigError('config.stage_order is empty: name the stages to train, in order')
  missing = [n for n in order if n not in config.stages]
  if missing:
    raise errors.ConfigError(f'config.stage_order names {missing} but config.stages has only {sorted(config.stages)}')
  for i, name in enumerate(order):
    for key, _, _, value in _string_fields(config.stages[name]):
      for ref in _references(value):
        if ref not in order[:i]:
          raise errors.ConfigError(f'config.stages.{name}.{key}={value!r} refers to stage {{{ref}}}, which is not an '
                                   f'earlier stage (stages: {order})')


def _string_fields(cfg, prefix=''):
  """(dotted key, the ConfigDict holding it, its name there, value) of every string field, depth first."""
  for k in cfg.keys():
    v = cfg[k]
    if hasattr(v, 'keys'):
      yield from _string_fields(v, f'{prefix}{k}.')
    elif isinstance(v, str):
      yield prefix + k, cfg, k, v


def _references(value: str) -> List[str]:
  import string
  return [f for _, f, _, _ in string.Formatter().parse(value) if f]


def resolve(stage_cfg, dirs: Dict[str, str]):
  """A stage's config with ``{name}`` references replaced by those stages' directories (a copy)."""
  out = stage_cfg.copy_and_resolve_references()
  for _, parent, name, value in list(_string_fields(out)):
    if _references(value):
      parent[name] = value.format(**dirs)
  return out


def _record(cfg) -> str:
  return cfg.to_json_best_effort(sort_keys=True)


def _comparable(rec):
  """A stage record without the run-identity allowances (they do not change what a finished stage is)."""
  from var_jax.train import identity
  return {k: v for k, v in rec.items() if k not in identity.ALWAYS_IGNORED} if isinstance(rec, dict) else rec


def referenced_keys(stage_cfg, earlier) -> List[str]:
  """The dotted keys of a stage's string fields that name one of the ``earlier`` stages' directories."""
  return [key for key, _, _, value in _string_fields(stage_cfg) if set(_references(value)) & set(earlier)]


def is_finished(stage_dir: str, cfg) -> bool:
  """The stage finished with this very config (its ``stage.json``)."""
  from var_jax import fileio
  path = f'{stage_dir}/{STAGE_RECORD}'
  if not fileio.exists(path):
    return False
  try:
    rec = json.loads(fileio.path(path).read_text())
  except (ValueError, OSError):
    return False
  return _comparable(rec.get('config')) == _comparable(json.loads(_record(cfg)))


def run(config, workdir: str):
  """Train every stage of ``config`` in ``workdir`` (see the module docstring), then score the last one.
  -> the final quality score (``{}`` when a stage stopped early, e.g. preempted)."""
  import jax
  from var_jax import fileio
  from var_jax.train import errors, loop
  check(config)
  dirs = stage_dirs(config, workdir)
  from var_jax.train import reference_args, validate
  for name in config.stage_order:     # every stage's config before the first one trains
    try:
      validate.validate(reference_args.resolve(resolve(config.stages[name], dirs)))
    except errors.ConfigError as e:
      msg = str(e)
      raise errors.ConfigError(f'config.stages.{name}.{msg[len("config."):]}' if msg.startswith('config.') else
                               f'config.stages.{name}: {msg}') from None
  t0 = time.time()
  retrain = []                # the stages trained (again) in this run
  for name in config.stage_order:
    cfg = resolve(config.stages[name], dirs)
    if not retrain and is_finished(dirs[name], cfg):
      logging.info('stage %s: finished in %s (its %s matches this config): skipped', name, dirs[name], STAGE_RECORD)
      continue
    run_cfg = cfg
    changed = referenced_keys(config.stages[name], retrain)
    if changed:
      # a later stage reads this one's outputs: train it again too, from its checkpoints on the new outputs (the
      # run-identity check would refuse their new fingerprints: allowed here, by the stage runner, with a warning)
      run_cfg = cfg.copy_and_resolve_references()
      run_cfg.resume_changes = ','.join(k for k in [run_cfg.resume_changes] + changed if k)
      if fileio.isdir(f'{dirs[name]}/checkpoints'):
        logging.warning('stage %s: %s trained again in this run, so %s may have changed: its checkpoints in %s '
                        'resume on the new files (move %s away to start it over)', name, ', '.join(retrain),
                        ', '.join(changed), dirs[name], dirs[name])
    retrain.append(name)
    logging.info('stage %s: %s in %s', name, cfg.task, dirs[name])
    _, last = loop.train(run_cfg, dirs[name])
    if not last.get('finished'):
      logging.warning('stage %s stopped early: rerun the command to resume it', name)
      return {}
    if jax.process_index() == 0:
      fileio.atomic_write_text(f'{dirs[name]}/{STAGE_RECORD}', json.dumps(
          {'stage': name, 'wall_time_s': last.get('wall_time_s'), 'config': json.loads(_record(cfg))}, indent=1))
  last_name = config.stage_order[-1]
  if jax.process_count() > 1:          # process 0 wrote the exports: every process reads them below
    from var_jax import distributed
    distributed.barrier('stages: exports written')
  score = final(config.final, resolve(config.stages[last_name], dirs), dirs[last_name], workdir)
  logging.info('all stages done in %s (%.0f s this run)', workdir, time.time() - t0)
  return score


def model_location(stage_dir: str) -> str:
  """Where a generator stage's export is: VAR's ``<dir>/model`` directory, ELM's / BiGR's run directory."""
  from var_jax import fileio
  return f'{stage_dir}/model' if fileio.isdir(f'{stage_dir}/model') else stage_dir


def final(final_cfg, stage_cfg, stage_dir: str, workdir: str) -> Dict[str, float]:
  """The last stage's exported model: ``final_cfg.per_class`` samples per class at its ``sample`` settings ->
  the digits quality score (printed, ``<workdir>/quality.json``) and a labelled grid (``<workdir>/samples.png``)."""
  import jax
  from var_jax import fileio
  from var_jax import images as images_lib
  from var_jax.eval import digits
  from var_jax.pipelines.pretrained import load_pipeline
  pipe = load_pipeline(checkpoint=model_location(stage_dir))
  labels = digits.balanced_labels(int(final_cfg.per_class))
  kw = stage_cfg.sample.to_dict()
  t = time.time()
  images, _ = pipe.sample(labels, rng=int(stage_cfg.seed), **kw)
  sampling_s = time.time() - t
  # the unconditional baseline: as many samples of the null class (label num_classes), scored against the same labels
  null, _ = pipe.sample(np.full_like(labels, pipe.num_classes), rng=int(stage_cfg.seed), **kw)
  if jax.process_index() != 0:
    return {}
  scorer = digits.scorer(stage_cfg.data.image_size, stage_cfg.data.mid_reso)
  score = scorer.score(images, labels)
  uncond = scorer.score(null, labels)
  score.update(sampling_s=sampling_s, unconditional_class_acc=uncond['class_acc'], unconditional_fd=uncond['fd'])
  per_class = int(final_cfg.per_class)
  rows = min(int(final_cfg.grid_per_class), per_class)
  pick = np.concatenate([np.arange(c * per_class, c * per_class + rows) for c in range(digits.NUM_CLASSES)])
  grid = images_lib.labelled_grid(images_lib.to_uint8(images[pick]), labels[pick].tolist(), cols=rows)
  grid_path = images_lib.write_png(f'{workdir}/samples.png', grid)
  fileio.atomic_write_text(f'{workdir}/quality.json', json.dumps(
      {'model': model_location(stage_dir), 'per_class': per_class, 'sample': kw, 'seed': int(stage_cfg.seed),
       **score}, indent=1))
  logging.info('wrote %s (a row per class, %d samples each) and %s/quality.json', grid_path, rows, workdir)
  logging.info('%s', digits.format_score(score))
  logging.info('unconditional baseline (the null class, same settings): class accuracy %.1f%%, Frechet distance %.2f',
               score['unconditional_class_acc'], score['unconditional_fd'])
  return score
