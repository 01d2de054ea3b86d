"""What the command lines (``python -m var_jax.sample``, ``.evaluate``, ``.probe``, ``.scaling``) share: the flags
that name a model and a sampling protocol, and the entry point. Only CLIs import this; it defines no flag itself
until a CLI calls ``define_*`` under ``__main__``."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional, Sequence, Type

from absl import app, flags

FLAGS = flags.FLAGS


def define_model_flags():
  """The checkpoint flags of any family: a run directory of ours (VAR, ELM or BiGR), reference weights (VAR: VQVAE +
  VAR; ELM / BiGR: BAE + generator), or a released model by name (``var_jax.hub``)."""
  flags.DEFINE_string('pretrained', None, 'a released model by name, fetched into the Hugging Face hub cache (e.g. '
                      'var_d16, L-2-10, bigr_L_d24; name@revision pins one; HF_HUB_OFFLINE=1: cached files only); '
                      'instead of the file flags. `python -m var_jax.hub` lists the names')
  flags.DEFINE_string('vae_ckpt', None, 'reference-layout VQVAE weights (.pth or .safetensors)')
  flags.DEFINE_string('var_ckpt', None, 'reference-layout VAR weights (.pth or .safetensors)')
  flags.DEFINE_string('checkpoint', None, 'a run directory of ours, any family: an ELM/BiGR training workdir (its '
                      'model_args.json names the model, its ModelArgs and the BAE), or a VAR model checkpoint '
                      'directory / training workdir; instead of the reference-weight flags')
  flags.DEFINE_list('patch_nums', None, 'override the inferred patch_nums (comma list)')
  flags.DEFINE_enum('model', 'auto', ['auto', 'var', 'elm', 'bigr'],
                    'model family; auto: from --checkpoint\'s run directory (ELM/BiGR: its model_args.json, else '
                    'VAR), VAR for --vae_ckpt/--var_ckpt, ELM or BiGR from the keys of --model_ckpt')
  flags.DEFINE_string('bae_ckpt', None, 'ELM/BiGR: reference binary autoencoder weights (binaryae*.th)')
  flags.DEFINE_string('model_ckpt', None, 'ELM/BiGR: reference generator weights (ELM .pth, BiGR .pt)')
  flags.DEFINE_list('model_args', [], 'ELM/BiGR: reference ModelArgs fields as key=value (values parsed as JSON, e.g. '
                    'n_head=16,p_flip=true); unset: those of a model_args.json beside --model_ckpt naming it (a '
                    'training run\'s export); with --checkpoint=<run> they update its model_args.json\'s')
  flags.DEFINE_bool('allow_weight_cast', False, 'accept reference weights stored as integers (cast to float32); '
                    'without it they are an error naming the key. NaN/inf weights are always an error')


def define_sampling_flags(num_per_class: int, batch_size: int):
  """Which images (labels, seed) and the common sampling settings (unset: each family's release setting)."""
  flags.DEFINE_list('classes', None, 'class labels to sample, e.g. 207,360 (default: all classes); integers in '
                    '[0, num_classes], num_classes itself being the unconditional class (as in the Python API)')
  flags.DEFINE_integer('num_per_class', num_per_class, 'images per class')
  flags.DEFINE_float('cfg', None, 'classifier-free guidance ratio (default: the model family\'s release setting)')
  flags.DEFINE_integer('top_k', None, 'top-k filtering (0: off; VAR default 900, ELM 1000)')
  flags.DEFINE_float('top_p', None, 'VAR top-p filtering (0: off; default 0.96)')
  flags.DEFINE_integer('seed', 0, 'PRNG seed (image i uses fold_in(seed, i))')
  flags.DEFINE_integer('batch_size', batch_size, 'images per compiled call (split over local devices)')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'compute dtype')
  flags.DEFINE_bool('overwrite', False, 'start the samples folder over: delete the sample PNGs, samples.npz and '
                    'sample_plan.json an earlier run left there (nothing else), instead of refusing a folder '
                    'sampled with another plan (model, settings, seed, classes, dtype)')
  # VAR's training-free accelerations (var_jax.sampling.var; README "Faster sampling")
  flags.DEFINE_integer('cfg_until', None, 'VAR: classifier-free guidance at scales 0..cfg_until only, then the '
                       'conditional half alone (default: every scale)')
  flags.DEFINE_string('prune', None, 'VAR: token pruning {scale: keep fraction}, e.g. 8:0.5,9:0.25 (FastVAR-style: '
                      'only the most-changed ceil(keep * pn^2) tokens of those scales run the transformer)')
  flags.DEFINE_string('drafter_checkpoint', None, 'VAR: a model directory (same tokenizer) that samples the first '
                      '--draft_scales scales; this model refines the rest')
  flags.DEFINE_integer('draft_scales', None, 'VAR: scales drafted by --drafter_checkpoint')


def check_sampling_flags():
  """The sampling flags defined (``define_sampling_flags`` and a CLI's own: --cfg, --top_k, --top_p, --seed,
  --batch_size, --num_per_class, --temperature, ...) and --classes, checked before any model is loaded
  (``var_jax.sampling.common``: the pipelines' validator, here with the flag names). The range of --classes needs
  the model: ``eval.protocol.sample_plan`` checks it."""
  from var_jax.sampling.common import SAMPLING_ARGS, check_sampling_args, parse_class_labels
  check_sampling_args('--', **{k: getattr(FLAGS, k) for k in SAMPLING_ARGS if k in FLAGS})
  if 'classes' in FLAGS and FLAGS.classes is not None:
    parse_class_labels(FLAGS.classes, None, '--classes')
  if 'prune' in FLAGS:
    from var_jax.sampling.common import parse_prune
    parse_prune(FLAGS.prune, '--prune')
    if (FLAGS.drafter_checkpoint is None) != (FLAGS.draft_scales is None):
      raise ValueError('--drafter_checkpoint and --draft_scales go together: give both or neither')


def with_fast_sampling_from_flags(pipe):
  """``pipe`` with the VAR acceleration flags (--cfg_until, --prune, --drafter_checkpoint + --draft_scales) as its
  sampling defaults (``VARPipeline.with_sampling``, checked against the model before any sampling); ``pipe`` itself
  when none is set. Another family with one of them set is an error naming the flags."""
  given = [f'--{k}' for k in ('cfg_until', 'prune', 'drafter_checkpoint', 'draft_scales')
           if k in FLAGS and getattr(FLAGS, k) not in (None, '')]
  if not given or pipe is None:
    return pipe
  if pipe.family != 'var':
    raise ValueError(f'{", ".join(given)} apply to VAR models only, not {pipe.family.upper()}')
  from var_jax.sampling.common import parse_prune
  drafter = None
  if FLAGS.drafter_checkpoint:
    from var_jax.pipelines.pretrained import load_pipeline
    drafter = load_pipeline(checkpoint=FLAGS.drafter_checkpoint)
    if drafter.family != 'var':
      raise ValueError(f'--drafter_checkpoint={FLAGS.drafter_checkpoint} is a {drafter.family.upper()} model, not a VAR')
  try:
    return pipe.with_sampling(cfg_until=FLAGS.cfg_until, prune=parse_prune(FLAGS.prune, '--prune') or None,
                              drafter=drafter, draft_scales=FLAGS.draft_scales)
  except ValueError as e:
    msg = str(e)
    if msg.startswith('drafter:'):
      msg = f'--drafter_checkpoint={FLAGS.drafter_checkpoint}:{msg[len("drafter:"):]}'
    raise ValueError(msg if msg.startswith('--') or msg.startswith('drafter and') else f'--{msg}') from None


def load_pipeline_from_flags():
  """The pipeline the ``define_model_flags`` flags name."""
  from var_jax.pipelines.pretrained import load_pipeline
  return load_pipeline(FLAGS.vae_ckpt, FLAGS.var_ckpt, FLAGS.checkpoint, FLAGS.patch_nums, model=FLAGS.model,
                       bae_ckpt=FLAGS.bae_ckpt, model_ckpt=FLAGS.model_ckpt, model_args=FLAGS.model_args,
                       allow_cast=FLAGS.allow_weight_cast, pretrained=FLAGS.pretrained)


class _PlatformProbeFilter(logging.Filter):
  """Drops JAX's INFO records about platforms it probed and did not find (``Unable to initialize backend 'tpu':
  ... libtpu.so``, printed at every start on CPU/GPU hosts); warnings and errors pass, e.g. a GPU jaxlib falling
  back to the CPU, or a platform named in ``JAX_PLATFORMS`` that fails (an exception)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno <= logging.INFO and record.getMessage().startswith('Unable to initialize backend'))


def quiet_platform_probes():
  """Install ``_PlatformProbeFilter`` on JAX's backend logger (idempotent); the CLIs call it in ``run``."""
  logger = logging.getLogger('jax._src.xla_bridge')
  if not any(isinstance(f, _PlatformProbeFilter) for f in logger.filters):
    logger.addFilter(_PlatformProbeFilter())


def one_line(e: BaseException, ours: Sequence[Type[BaseException]] = ()) -> str:
  """``e`` as one line: its message with whitespace collapsed (at most 600 characters), prefixed by its type unless
  it is a ``ValueError`` or one of ``ours`` / var_jax's own errors (whose messages name what they concern)."""
  msg = ' '.join(str(e).split())
  if isinstance(e, KeyError) and len(e.args) == 1:
    msg = f'missing key {e.args[0]!r}'
  own = isinstance(e, tuple(ours)) or type(e) is ValueError or type(e).__module__.startswith('var_jax')
  if not own or not msg:
    msg = f'{type(e).__name__}: {msg}' if msg else type(e).__name__
  return msg if len(msg) <= 600 else msg[:597] + '...'


def _parse_flags(argv):
  """absl's flag parsing (with ml_collections' config files: a missing file, a syntax error in it, no get_config, an
  unknown ``--config.`` key), each error as one ``error:`` line naming the flag (exit status 1)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {one_line(e, (flags.Error,))}')
  except Exception as e:  # noqa: BLE001 - a config file's own exception (FileNotFoundError, SyntaxError, ...)
    if os.environ.get('VAR_JAX_TRACEBACK'):
      raise
    where = _flag_of(argv, e)
    sys.exit(f'error: {where[:-2]}' if where.endswith('; ') else f'error: {where}{one_line(e)}')


def _flag_of(argv, e) -> str:
  """The flag an exception raised while parsing came from (only ml_collections' run code then): an unknown
  ``--config.<key>`` override ('<flag>: no such key in the config: '), else the config file flag
  ('--config=<file>: ')."""
  args = [a for a in argv[1:] if a.startswith('--') and '=' in a]
  if isinstance(e, (AttributeError, KeyError)):
    for a in args:
      key = a[2:].split('=', 1)[0]
      if '.' in key and key.rsplit('.', 1)[1] in str(e):
        return f'{a}: the config has no key {key.split(".", 1)[1]!r} (a typo, or a key of another config file); '
  for a in args:
    name, value = a.split('=', 1)
    if value.split(':')[0].endswith('.py'):
      return f'{name}={value}: '
  return ''


class ConfigFileError(ValueError):
  """A config file that could not be loaded (the message names the flag and the file)."""


def config_from_flag(name: str = 'config'):
  """The value of ml_collections' config-file flag ``--<name>``; a file that could not be loaded (missing, not
  readable) is a ``ConfigFileError`` naming it (ml_collections defers that error to the first use of the config)."""
  cfg = FLAGS[name].value
  if type(cfg).__name__ != '_ErrorConfig':
    return cfg
  try:
    cfg.keys()
  except Exception as e:  # noqa: BLE001 - ml_collections' deferred load error
    from ml_collections import config_flags
    cause = e.__cause__ or e
    lines = [l.strip() for l in str(cause).strip().splitlines() if l.strip()]
    raise ConfigFileError(f'--{name}={config_flags.get_config_filename(FLAGS[name])}: cannot be loaded: '
                          f'{lines[-1] if lines else type(cause).__name__}') from None
  return cfg


def run(main: Callable[[], Optional[int]], errors: Sequence[Type[BaseException]] = (), multihost: bool = False):
  """``app.run`` of ``main()`` (no positional arguments allowed) behind one error boundary: a bad flag or config file
  (``_parse_flags``), any exception before the work began (``var_jax.work.started()``: the training loop's first
  step) and, after it, an exception of ``errors``, exit with
  status 1 and one ``error: <message>`` line on stderr instead of a traceback (``VAR_JAX_TRACEBACK=1``: the
  traceback). Ctrl-C outside training (which saves a checkpoint, as on SIGTERM) is one line and status 130.
  ``multihost``: initialise JAX's distributed runtime from the environment first
  (``var_jax.distributed.initialize_from_env``) and end on a barrier of every process (so none exits while another
  still writes)."""
  quiet_platform_probes()

  def entry(argv):
    from var_jax import work
    work.reset()
    if len(argv) > 1:
      sys.exit(f'error: unexpected arguments {argv[1:]} (flags are --name=value)')
    try:
      if multihost:
        from var_jax import distributed
        distributed.initialize_from_env()
      out = main()
    except KeyboardInterrupt:
      sys.stderr.write('error: interrupted (Ctrl-C)\n')
      sys.exit(130)
    except tuple(errors) as e:
      sys.exit(f'error: {one_line(e, errors)}')
    except Exception as e:  # noqa: BLE001 - the boundary: every set-up error is one line
      if work.has_started() or os.environ.get('VAR_JAX_TRACEBACK'):
        raise
      sys.exit(f'error: {one_line(e, errors)}')
    if multihost:
      from var_jax import distributed
      distributed.barrier(f'{main.__module__}: done')
    return out
  app.run(entry, flags_parser=_parse_flags)
