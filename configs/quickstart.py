r"""Quickstart: a tiny VAR on scikit-learn's bundled digits (no download), trains on a laptop CPU in minutes.

  python -m var_jax.train --config=configs/quickstart.py --workdir=/tmp/var_quickstart

Images are upsampled 8x8 -> 32x32; tokenizer: a small random-init VQVAE (train one with the tokenizer trainer for
better samples); transformer: depth 4, width 128. Writes metrics, checkpoints and sample grids to the workdir.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'var_jax_configs_common', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py'))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)   # configs are loaded by path (--config=configs/x.py), not as a package


def get_config():
  c = common.base()
  pn = (1, 2, 3, 4)
  c.data.update(name='digits', image_size=32, num_workers=0, eval_split='val', mid_reso=1.125)
  # the tokenizer of configs/vqvae_quickstart.py (cosine code lookup: its collapse mitigation)
  c.vae.update(vocab_size=256, z_channels=16, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, patch_nums=pn,
               using_znorm=True)
  c.vae_ckpt = ''
  c.model.update(vocab_size=256, z_channels=16, num_classes=10, depth=4, embed_dim=128, num_heads=2,
                 drop_path_rate=0.0, patch_nums=pn)
  c.dtype = 'float32'
  c.global_batch_size = 64
  c.epochs = 8.0
  c.optim.update(base_lr=1e-3, end_ratio=0.1, warmup_epochs=0.5)
  c.log_every = 10
  c.ckpt_every = 100
  c.eval_every = 100
  c.eval_batches = 4
  c.sample_every = 200
  c.sample_classes = tuple(range(10))
  c.sample.update(cfg=1.5, top_k=50, top_p=0.0)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c
