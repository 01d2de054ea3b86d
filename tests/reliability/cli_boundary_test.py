"""One error boundary per CLI (issue 24, ``var_jax.cli.run``): every error before the work starts — a config file
that is missing, broken or has no get_config, an unknown or ill-typed ``--config.`` key, a missing or empty data
folder, an unknown data set / task / dtype / schedule, a batch that does not split, a tokenizer of another size,
any value the config validator refuses — is one ``error:`` line on stderr naming the file / key, exit status 1, no
traceback, and nothing in the workdir. All cases run in one subprocess (``cli_driver.py``)."""
import os

import pytest

from cli_cases import error_line, run_cli_cases
from conftest import VAR_FIXTURES

QUICK = ['--config=configs/quickstart.py']


def _cases(tmp_path):
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config(:\n')
  no_get = tmp_path / 'no_get.py'
  no_get.write_text('x = 1\n')
  raises = tmp_path / 'raises.py'
  raises.write_text('def get_config():\n  raise RuntimeError("boom in the config file")\n')
  empty = tmp_path / 'empty_data'
  (empty / 'train').mkdir(parents=True)
  wd = str(tmp_path / 'wd')
  # (args after --workdir, what the error line must contain)
  return [
      (['--config=configs/no_such_config.py'], 'configs/no_such_config.py'),
      ([f'--config={broken}'], str(broken)),
      ([f'--config={no_get}'], 'get_config'),
      ([f'--config={raises}'], 'boom in the config file'),
      (QUICK + ['--config.no_such_key=1'], 'no_such_key'),
      (QUICK + ['--config.model.depth=abc'], 'config.model.depth'),
      (QUICK + ['--config.data.name=folder', f'--config.data.path={tmp_path}/missing'], f'{tmp_path}/missing'),
      (QUICK + ['--config.data.name=folder', f'--config.data.path={empty}'], str(empty)),
      (QUICK + ['--config.data.name=imagenet'], 'config.data.name'),
      (QUICK + ['--config.task=nope'], 'config.task'),
      (QUICK + ['--config.dtype=float8'], 'config.dtype'),
      (QUICK + ['--config.optim.schedule=zigzag'], 'config.optim.schedule'),
      (QUICK + ['--config.grad_accum=3'], 'config.global_batch_size'),
      (QUICK + ['--config.model.depth=0'], 'config.model.depth=0'),
      (QUICK + ['--config.optim.base_lr=-1'], 'config.optim.base_lr=-1'),
      (QUICK + ['--config.optim.base_lr=nan'], 'config.optim.base_lr=nan'),
      (QUICK + ['--config.log_every=0'], 'config.log_every=0'),
      (QUICK + ['--config.sample_classes=(0,20)'], 'config.sample_classes'),
      (QUICK + [f'--config.vae_ckpt={VAR_FIXTURES}/tiny/vae.pth'], 'tiny/vae.pth'),      # another size
      (QUICK + [f'--config.vae_ckpt={tmp_path}/no_such.pth'], 'no_such.pth'),
      (QUICK + ['positional'], 'unexpected arguments'),
  ], wd


def test_train_cli_set_up_errors_are_one_line(tmp_path):
  cases, wd = _cases(tmp_path)
  results = run_cli_cases([['var_jax.train', f'--workdir={wd}'] + args for args, _ in cases], tmp_path)
  for (args, want), r in zip(cases, results):
    line = error_line(r)
    assert want in line, (args, line)
    assert not os.path.exists(wd) or not os.listdir(wd), (args, os.listdir(wd))      # nothing written
