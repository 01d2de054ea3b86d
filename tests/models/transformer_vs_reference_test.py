"""The VAR transformer against the reference: teacher-forced logits and the trainer's loss."""
import numpy as np

from conftest import rel_err
from var_jax.losses.tokens import var_loss


def test_logits(reference_model):
  _, pipe, io, _ = reference_model
  lg = pipe.logits(io['labels'], io['tokens'])
  assert lg.dtype == np.float32 and lg.shape == io['logits'].shape
  assert rel_err(lg, io['logits']) < 1e-4


def test_logits_from_token_list(reference_model):
  _, pipe, io, cfg = reference_model
  toks = [io[f'idx_scale{k}'] for k in range(len(cfg['patch_nums']))]
  assert rel_err(pipe.logits(io['labels'], toks), io['logits']) < 1e-4


def test_label_smoothed_loss(reference_model):
  _, pipe, io, _ = reference_model
  loss = var_loss(pipe.logits(io['labels'], io['tokens']), io['tokens'], smoothing=0.1)
  np.testing.assert_allclose(float(loss), float(io['train_loss_ls01']), rtol=1e-5)
  # on the reference's own logits the loss must agree to float precision
  loss_ref = var_loss(io['logits'], io['tokens'], smoothing=0.1)
  np.testing.assert_allclose(float(loss_ref), float(io['train_loss_ls01']), rtol=1e-6)
