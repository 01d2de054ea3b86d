r"""Linear probe of BiGR features: ``python -m var_jax.probe`` (the library: ``var_jax.eval.probe``).

Examples::

  # quickstart: a tiny random-init BAE + BiGR on scikit-learn's digits (8x8, upsampled to 32px); no download
  python -m var_jax.probe --random_init_config=quickstart
  # released weights on an ImageNet folder (root/train/<class>/*.JPEG, root/val/<class>/*.JPEG)
  python -m var_jax.probe --bae_ckpt=binaryae_ema_1000000.th --bigr_ckpt=bigr_L_d24.pt \
      --model_args='{"n_head": 16, "p_flip": true, "focal": 0.0, "use_adaLN": true}' \
      --data=folder --data_path=/data/imagenet --layers=8,12,16 --max_train_examples=100000 --json_out=probe.json

``--random_init_config=quickstart``'s accuracies are the random-feature baseline; the protocol, the baseline and
how to run the paper's ImageNet probe at scale: ``var_jax.eval.probe``. Multi-host (``var_jax.distributed``): every
process computes the whole probe on its local devices (the same numbers); process 0 prints and writes --json_out.
"""
from __future__ import annotations

import json

from absl import flags

from var_jax import cli
from var_jax.eval import probe

def define_flags():
  """Which BiGR, which data, which layers, and the probe's optimiser."""
  flags.DEFINE_string('bae_ckpt', None, 'reference BAE weights (binaryae*.th, ae.-prefixed or plain)')
  flags.DEFINE_string('bigr_ckpt', None, 'reference BiGR weights (bigr*.pt: {"ema": state_dict})')
  flags.DEFINE_list('model_args', None, 'BiGR ModelArgs the weights cannot tell: a JSON object or key=value list, '
                    'e.g. n_head=16,p_flip=true,focal=0.0')
  flags.DEFINE_enum('random_init_config', None, ['quickstart'], 'build a tiny random-init BAE + BiGR instead of '
                    'loading weights (its accuracies are the random-feature baseline)')
  flags.DEFINE_integer('seed', 0, 'seed of the random init, the example subsets and the probe')
  flags.DEFINE_enum('data', 'digits', ['digits', 'folder', 'tfds'], 'dataset source (var_jax.data.make_source)')
  flags.DEFINE_string('data_path', '', 'folder: the root holding <train_split>/ and <eval_split>/')
  flags.DEFINE_string('tfds_name', '', 'tfds: dataset name, e.g. imagenet2012 (prepared as ArrayRecord)')
  flags.DEFINE_string('tfds_data_dir', None, 'tfds: data_dir')
  flags.DEFINE_string('train_split', 'train', 'split the probe is trained on')
  flags.DEFINE_string('eval_split', 'val', 'split the probe is evaluated on (tfds imagenet2012: validation)')
  flags.DEFINE_float('mid_reso', 1.125, 'resize the shorter side to mid_reso x resolution, then center-crop')
  flags.DEFINE_integer('num_workers', 0, 'grain worker processes for decoding')
  flags.DEFINE_integer('max_train_examples', 0, 'seeded random subset of the train split (0: all)')
  flags.DEFINE_integer('max_val_examples', 0, 'seeded random subset of the eval split (0: all)')
  flags.DEFINE_list('layers', None, 'layers to probe, 0-based (default: all)')
  flags.DEFINE_enum('condition', 'null', list(probe.CONDITIONS), 'class condition of the features: the null class, '
                    'or the true label (leaks the label; not a valid probe)')
  flags.DEFINE_integer('batch_size', 64, 'images per feature-extraction call (sharded over local devices)')
  flags.DEFINE_integer('probe_steps', 300, 'AdamW steps per layer')
  flags.DEFINE_float('probe_lr', 0.01, 'peak learning rate (cosine decay to 0)')
  flags.DEFINE_float('probe_weight_decay', 1e-3, 'decoupled weight decay on the probe weights')
  flags.DEFINE_integer('probe_batch_size', -1, f'-1: full batch up to {probe.FULL_BATCH_MAX} examples, else 4096; '
                       '0: full batch; > 0: mini-batch size')
  flags.DEFINE_string('json_out', None, 'write the results as JSON here')


def main():
  import jax
  from var_jax.data import default_data_config
  fl = cli.FLAGS
  main_process = jax.process_index() == 0
  log = (lambda msg: print(msg, flush=True)) if main_process else (lambda msg: None)
  data_cfg = default_data_config()
  data_cfg.name = fl.data
  data_cfg.path = fl.data_path
  data_cfg.tfds_name = fl.tfds_name
  data_cfg.tfds_data_dir = fl.tfds_data_dir
  data_cfg.mid_reso = fl.mid_reso
  if fl.num_workers < 0:
    raise ValueError(f'--num_workers={fl.num_workers}: must be >= 0')
  data_cfg.num_workers = fl.num_workers
  layers = probe.parse_layers(fl.layers)
  probe_batch_size = None if fl.probe_batch_size < 0 else fl.probe_batch_size
  if fl.probe_batch_size < -1:
    raise ValueError(f'--probe_batch_size={fl.probe_batch_size}: must be -1 (automatic), 0 (full batch) or > 0')
  # every flag and both data splits before the model is built or any network runs
  sources = probe.check_probe_request(
      data_cfg, train_split=fl.train_split, eval_split=fl.eval_split, layers=layers, condition=fl.condition,
      batch_size=fl.batch_size, max_train_examples=fl.max_train_examples, max_val_examples=fl.max_val_examples,
      probe_steps=fl.probe_steps, probe_lr=fl.probe_lr, probe_weight_decay=fl.probe_weight_decay,
      probe_batch_size=probe_batch_size)
  pipe = probe.build_pipeline(fl.bae_ckpt, fl.bigr_ckpt, fl.model_args, fl.random_init_config, fl.seed)
  log(f'BiGR: {pipe.num_layers} layers, dim {pipe.feature_dim}, K={pipe.binary_size}, grid {pipe.latent_size}, '
      f'{pipe.image_size}px | devices: {jax.local_device_count()} x {jax.devices()[0].device_kind}'
      + (f' | process 0 of {jax.process_count()}' if jax.process_count() > 1 else ''))
  res = probe.run_probe(
      pipe, data_cfg, layers=layers, condition=fl.condition, train_split=fl.train_split, eval_split=fl.eval_split,
      batch_size=fl.batch_size, max_train_examples=fl.max_train_examples, max_val_examples=fl.max_val_examples,
      seed=fl.seed, probe_steps=fl.probe_steps, probe_lr=fl.probe_lr, probe_weight_decay=fl.probe_weight_decay,
      probe_batch_size=probe_batch_size, random_init=bool(fl.random_init_config), log=log, sources=sources)
  if fl.json_out and main_process:
    from var_jax import fileio
    fileio.atomic_write_text(fl.json_out, json.dumps(res, indent=2))
    log(f'wrote {fl.json_out}')


if __name__ == '__main__':
  define_flags()
  # input errors (flags, paths, checkpoints: CheckpointMismatchError is a ValueError): one 'error: ...' line and exit 1, no flag help
  cli.run(main, errors=(ValueError, FileNotFoundError), multihost=True)
