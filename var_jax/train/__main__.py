r"""Train any task: ``python -m var_jax.train --config=configs/digits.py --workdir=/tmp/digits`` (README's main job).

``config.task`` picks it (``var_jax.train.tasks``): 'var', 'tokenizer' (VQVAE or BAE), 'elm_ar', 'elm_mlm', 'bigr'.
A multi-stage config (``configs/digits.py``: a tokenizer, then a generator) trains its stages in order, each in
``<workdir>/<stage>`` (``var_jax.train.stages``).
Every config value can be overridden: ``--config.optim.base_lr=8e-5 --config.mesh.fsdp=-1``. Run the same command
on every host of a TPU VM slice (or every GPU node): JAX's distributed runtime is initialised from the environment
when there is more than one process (or with ``--distributed``). Re-running a command resumes from the workdir.
"""
import logging as std_logging
import sys

from absl import flags, logging
from ml_collections import config_flags

from var_jax.distributed import initialize_from_env


def setup_logging(verbose: bool):
  """Our progress lines to stdout; library INFO chatter (orbax, grain) off unless --verbosity asks for it."""
  if not verbose:
    logging.set_verbosity(logging.WARNING)
  lg = std_logging.getLogger('var_jax')
  lg.setLevel(std_logging.INFO)
  h = std_logging.StreamHandler(sys.stdout)
  h.setFormatter(std_logging.Formatter('%(asctime)s %(levelname).1s %(message)s', '%H:%M:%S'))
  lg.addHandler(h)
  lg.propagate = False


def main():
  FLAGS = flags.FLAGS
  from var_jax import cli
  config = cli.config_from_flag('config')      # a config file that could not be loaded: one error line
  setup_logging(FLAGS['verbosity'].present)
  import jax
  initialize_from_env(FLAGS.distributed)
  std_logging.getLogger('var_jax').info('process %d/%d, %d local / %d global devices', jax.process_index(),
                                        jax.process_count(), jax.local_device_count(), jax.device_count())
  from var_jax.train import stages
  if stages.is_multistage(config):      # e.g. configs/digits.py: a tokenizer, then a generator
    stages.run(config, FLAGS.workdir)
    return
  from var_jax.train import loop
  loop.train(config, FLAGS.workdir)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'path to a configs/*.py file', lock_config=True)
  flags.DEFINE_string('workdir', None, 'checkpoints, metrics, TensorBoard and samples go here (local or gs://)')
  flags.DEFINE_bool('distributed', None, 'call jax.distributed.initialize() (default: auto-detect multi-host)')
  flags.mark_flags_as_required(['config', 'workdir'])
  from var_jax import cli
  from var_jax.sharding import MeshDivisibilityError
  from var_jax.train.errors import TrainingError
  # every error before the first step is one line (cli.run); after it, these too (others keep their traceback)
  cli.run(main, errors=(TrainingError, MeshDivisibilityError))
