r"""Linear probe of BiGR features (the library of ``python -m var_jax.probe``).

Images are encoded by the BAE (threshold bits), BiGR runs on the unmasked bits, and the token mean after each layer
(the reference ``forward_full_image(..).mean(1)``) is the feature. A softmax regression is trained per layer on the
frozen, standardised features (AdamW with decoupled weight decay on the weights, cosine learning-rate decay, a fixed
seed; full-batch or mini-batch), and the train / validation top-1 accuracy of every layer and the best layer are
reported.

``--random_init_config=quickstart`` builds untrained networks: their accuracies are the *random-feature baseline*
(random convolutions and attention still carry information about the pixels, so they beat chance), not a measure
of what BiGR learns. A trained model's probe should be compared against that baseline.

Running the paper's ImageNet protocol at scale
----------------------------------------------
The BiGR paper reports ImageNet-1K linear-probe top-1 of roughly 67.5% (BiGR-L) to 69.8% (BiGR-XXL) from average
pooling of intermediate-layer features. The reference repository ships no probing script and fixes neither the
layer nor the condition, so: (1) use ``--condition=null`` (the default: the null class; conditioning on the true
label leaks the class into every token through attention, which inflates the accuracy and is not a valid probe);
(2) sweep the layers (the paper pools "intermediate layers" without naming one; for masked-modelling backbones
the best layer is usually in the middle rather than the last), first on a subset (``--max_train_examples``), then
on the full set with the best few: at ImageNet scale store a few layers only (``--layers``), since all 24 x 1024
float32 features of 1.28M images are 126 GB (one layer is 5.2 GB).
Data: ``--data=folder --data_path=ROOT`` (torchvision ``ImageFolder`` layout, classes from ``ROOT/train``) or
``--data=tfds --tfds_name=imagenet2012 [--tfds_data_dir=...]`` (prepared as ArrayRecord, ``--eval_split=validation``).
Images are resized (shorter side to ``mid_reso x`` the BAE resolution, LANCZOS) and center-cropped to 256px, no
augmentation. The probe here is a plain AdamW softmax regression on standardised features
(``--probe_batch_size=16384 --probe_steps=20000`` or so for 1.28M examples); an MAE-style protocol (BatchNorm without
affine + LARS, 90 epochs), if that is what the paper used, can give somewhat different numbers. Feature extraction
is sharded over all local devices.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from var_jax import fileio
from var_jax.pipelines.bigr import BiGRPipeline
from var_jax.pipelines.pretrained import parse_model_args
from var_jax.models.bae import BAEConfig
from var_jax.models.bigr import BiGRConfig

CONDITIONS = ('null', 'label')
FULL_BATCH_MAX = 65536   # train full-batch up to this many examples by default, mini-batch beyond


# ----------------------------------------------------------------------------- models
def random_init_configs(name: str = 'quickstart') -> Tuple[BAEConfig, BiGRConfig]:
  """(BAE, BiGR) configs for a random-init pipeline. 'quickstart': 32px images, a 4-level BAE (4x4 grid of 16
  bits), BiGR dim 64 with 4 layers, 10 classes (the release recipe: adaLN, p_flip, weighted BCE)."""
  if name != 'quickstart':
    raise ValueError(f"unknown random_init_config {name!r}; expected 'quickstart'")
  bae = BAEConfig(nf=32, ch_mult=(1, 1, 1, 1), res_blocks=1, attn_resolutions=(4,), resolution=32, codebook_size=16,
                  emb_dim=32)
  bigr = BiGRConfig(dim=64, n_layer=4, n_head=4, multiple_of=64, num_classes=10, binary_size=16, seq_len=16,
                    block_size=16, denoise_hidden_dim=64, num_block_mlp=2, use_adaLN=True, p_flip=True, focal=0.0,
                    token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, infer_steps=10)
  return bae, bigr


def build_pipeline(bae_ckpt: Optional[str] = None, bigr_ckpt: Optional[str] = None, model_args=None,
                   random_init_config: Optional[str] = None, seed: int = 0) -> BiGRPipeline:
  """Reference checkpoints (``bae_ckpt`` + ``bigr_ckpt`` + ``model_args``) or a random-init config."""
  if random_init_config:
    if bae_ckpt or bigr_ckpt:
      raise ValueError('give either --bae_ckpt/--bigr_ckpt or --random_init_config, not both')
    return BiGRPipeline.init_random(*random_init_configs(random_init_config), jax.random.key(seed))
  if not (bae_ckpt and bigr_ckpt):
    raise ValueError('need --bae_ckpt and --bigr_ckpt (reference checkpoints), or --random_init_config=quickstart')
  for flag, path in (('--bae_ckpt', bae_ckpt), ('--bigr_ckpt', bigr_ckpt)):
    if not fileio.exists(path):          # local or gs://
      raise FileNotFoundError(f'{flag}: {path} does not exist')
  return BiGRPipeline.from_torch(bae_ckpt, bigr_ckpt, **parse_model_args(model_args))


# ----------------------------------------------------------------------------- features
def _layer_ids(pipe: BiGRPipeline, layer) -> Optional[Tuple[int, ...]]:
  if layer is None:
    return None
  ids = (int(layer),) if np.ndim(layer) == 0 else tuple(int(x) for x in layer)
  bad = [i for i in ids if not 0 <= i < pipe.num_layers]
  if bad or not ids:
    raise ValueError(f'layers must lie in 0..{pipe.num_layers - 1}, got {list(ids)}')
  return ids


def _condition_labels(pipe: BiGRPipeline, labels, condition: str, n: int):
  if condition not in CONDITIONS:
    raise ValueError(f'condition must be one of {CONDITIONS}, got {condition!r}')
  if condition == 'null':
    return None
  if labels is None:
    raise ValueError("condition='label' needs the labels")
  lab = np.asarray(labels).reshape(-1)
  if lab.shape[0] != n:
    raise ValueError(f'{lab.shape[0]} labels for {n} images')
  return lab


def _batch_features(pipe: BiGRPipeline, x, cond, layer, ids):
  """One batch -> (b, D) for an int layer, else (b, L or len(ids), D)."""
  if np.ndim(layer) == 0 and layer is not None:
    return pipe.features(x, layer=int(layer), label=cond)
  f = pipe.features(x, label=cond)
  return f if ids is None else f[:, list(ids)]


def extract_features(pipe: BiGRPipeline, images, labels=None, layer=None, condition: str = 'null',
                     batch_size: int = 64) -> np.ndarray:
  """Pooled features of in-memory images (N, H, W, C) in [0, 1] (or bits, see ``BiGRPipeline.features``).

  layer: None -> (N, n_layer, D); an int -> (N, D); a sequence of ints -> (N, len, D).
  condition: 'null' (the null class) or 'label' (the given ``labels``; leaks the label, see the module doc).
  Batches have a fixed size (the last one padded), so one compilation serves all.
  """
  x_all = np.asarray(images)
  n = x_all.shape[0]
  if n == 0:
    raise ValueError('no images')
  ids = _layer_ids(pipe, layer)
  lab = _condition_labels(pipe, labels, condition, n)
  bs = max(1, min(int(batch_size), n))
  out = []
  for start in range(0, n, bs):
    stop = min(start + bs, n)
    idx = np.minimum(np.arange(start, start + bs), n - 1)        # pad with the last example
    cond = None if lab is None else lab[idx]
    f = _batch_features(pipe, x_all[idx], cond, layer, ids)
    out.append(np.asarray(f)[: stop - start])
  return np.concatenate(out).astype(np.float32)


class _Subset:
  """A random-access source restricted to ``indices`` (a seeded random subset)."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices)
    self.num_classes = getattr(source, 'num_classes', None)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[int(i)])]


def check_probe_request(data_cfg, *, train_split: str, eval_split: str, layers=None, condition: str = 'null',
                        batch_size: int = 64, max_train_examples: int = 0, max_val_examples: int = 0,
                        probe_steps: int = 300, probe_lr: float = 0.01, probe_weight_decay: float = 1e-3,
                        probe_batch_size: Optional[int] = None) -> Dict[str, Any]:
  """Every probe setting and both data splits, before any model is built or network run: each failure one error
  naming the flag and value. Returns the two splits' sources ({split: source}), opened once here (a large folder is
  listed once) for ``run_probe``."""
  import math
  from var_jax.data import make_source

  def integer(flag, v, low):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
      raise ValueError(f'{flag}={v!r}: must be an integer >= {low}')
  integer('--batch_size', batch_size, 1)
  integer('--probe_steps', probe_steps, 1)
  integer('--max_train_examples', max_train_examples, 0)
  integer('--max_val_examples', max_val_examples, 0)
  if probe_batch_size is not None:
    integer('--probe_batch_size', probe_batch_size, 0)
  for flag, v, positive in (('--probe_lr', probe_lr, True), ('--probe_weight_decay', probe_weight_decay, False)):
    if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
      raise ValueError(f'{flag}={v!r}: must be a finite number {"> 0" if positive else ">= 0"}')
  if condition not in CONDITIONS:
    raise ValueError(f'--condition={condition!r}: expected one of {", ".join(CONDITIONS)}')
  for v in layers or ():
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f'--layers: {v!r} is not a layer index (0-based integers)')
  mid = float(getattr(data_cfg, 'mid_reso', 1.0) if not isinstance(data_cfg, dict) else data_cfg.get('mid_reso', 1))
  if not math.isfinite(mid) or mid < 1.0:
    raise ValueError(f'--mid_reso={mid!r}: must be >= 1 (the resize before the center crop)')
  sources = {}
  for flag, split in (('--train_split', train_split), ('--eval_split', eval_split)):
    try:
      sources[split] = make_source(data_cfg, split)
    except (FileNotFoundError, ValueError, KeyError) as e:
      raise type(e)(f'{flag}={split}: {e}') from None
    if len(sources[split]) == 0:
      raise ValueError(f'{flag}={split}: the split has no examples')
  return sources


def parse_layers(values) -> Optional[list]:
  """``--layers`` (a comma list) -> ints, an error naming the flag for anything else."""
  if not values:
    return None
  out = []
  for v in values:
    try:
      out.append(int(str(v).strip(), 10))
    except ValueError:
      raise ValueError(f'--layers: {v!r} is not a layer index (0-based integers)') from None
  return out


def dataset_features(pipe: BiGRPipeline, data_cfg, split: str, *, layer=None, condition: str = 'null',
                     batch_size: int = 64, max_examples: int = 0, seed: int = 0,
                     log: Optional[Callable[[str], None]] = None, source=None) -> Tuple[np.ndarray, np.ndarray]:
  """Stream ``make_source(data_cfg, split)`` (or ``source``, already opened) through the eval transform (resize +
  center crop to the BAE resolution, no augmentation) and return (features as in ``extract_features``, labels (N,)
  int32).

  ``max_examples`` > 0 keeps a seeded random subset of that size (sorted, so class-sorted sources stay balanced).
  """
  from var_jax.data import make_eval_dataset, make_source
  src = make_source(data_cfg, split) if source is None else source
  if 0 < max_examples < len(src):
    rs = np.random.default_rng([int(seed), 0xB16])
    src = _Subset(src, np.sort(rs.choice(len(src), int(max_examples), replace=False)))
  if hasattr(data_cfg, 'copy_and_resolve_references'):     # an ml_collections ConfigDict
    cfg = data_cfg.copy_and_resolve_references()
    cfg.image_size = pipe.image_size
  else:
    cfg = dict(data_cfg, image_size=pipe.image_size)
  ids = _layer_ids(pipe, layer)
  feats, labs = [], []
  from var_jax import progress
  with progress.Progress(len(src), f'{split} features', unit='images', log=log) as bar:
    for batch in make_eval_dataset(cfg, int(batch_size), source=src):
      keep = np.asarray(batch['mask'], bool)
      x = (np.asarray(batch['image'], np.float32) + 1.0) * 0.5                # [-1, 1] -> [0, 1]
      y = np.asarray(batch['label'], np.int32)
      cond = None if condition == 'null' else _condition_labels(pipe, y, condition, y.shape[0])
      f = np.asarray(_batch_features(pipe, x, cond, layer, ids))
      feats.append(f[keep])
      labs.append(y[keep])
      bar.update(int(keep.sum()))
  if not feats:
    raise ValueError(f'no examples in split {split!r}')
  return np.concatenate(feats).astype(np.float32), np.concatenate(labs)


# ----------------------------------------------------------------------------- the probe
def standardize(train_x, *others):
  """(mean, std) of the train features (constant dimensions get std 1) and the standardised arrays."""
  x = np.asarray(train_x, np.float64)
  mean = x.mean(0)
  std = x.std(0)
  std = np.where(std > 1e-12 * max(float(std.max()), 1e-30), std, 1.0)
  mean, std = mean.astype(np.float32), std.astype(np.float32)
  return (mean, std) + tuple((np.asarray(o, np.float32) - mean) / std for o in (train_x,) + others)


@jax.jit
def _accuracy(params, x, y):
  return jnp.mean((jnp.argmax(x @ params['w'] + params['b'], -1) == y).astype(jnp.float32))


def _eval_accuracy(params, x, y, chunk: int = 65536) -> float:
  n = x.shape[0]
  correct = 0.0
  for s in range(0, n, chunk):
    xb, yb = x[s:s + chunk], y[s:s + chunk]
    correct += float(_accuracy(params, xb, yb)) * xb.shape[0]
  return correct / max(n, 1)


@jax.jit
def _loss(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(x @ params['w'] + params['b'], y).mean()


def _make_fit(steps: int, batch_size: int):
  def fit(x, y, num_classes_arr, lr, wd, key):
    n, d = x.shape
    c = num_classes_arr.shape[0]
    params = {'w': jnp.zeros((d, c), jnp.float32), 'b': jnp.zeros((c,), jnp.float32)}
    opt = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=wd, mask={'w': True, 'b': False})
    state = opt.init(params)

    def step(i, carry):
      p, s = carry
      if batch_size:
        idx = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0, n)
        xb, yb = x[idx], y[idx]
      else:
        xb, yb = x, y
      g = jax.grad(_loss)(p, xb, yb)
      upd, s = opt.update(g, s, p)
      return optax.apply_updates(p, upd), s

    params, _ = jax.lax.fori_loop(0, steps, step, (params, state))
    return params
  return jax.jit(fit)


_FIT_CACHE: Dict[Tuple[int, int], Any] = {}


def train_linear_probe(train_x, train_y, val_x=None, val_y=None, *, num_classes: Optional[int] = None,
                       steps: int = 300, learning_rate: float = 0.01, weight_decay: float = 1e-3,
                       batch_size: Optional[int] = None, seed: int = 0, standardise: bool = True) -> Dict[str, Any]:
  """Softmax regression on frozen features; returns accuracies and the fitted probe.

  Args:
    train_x, train_y: (N, D) features and (N,) int labels. val_x, val_y: optional held-out set.
    num_classes: default ``max(label) + 1`` over both sets.
    steps: AdamW steps (cosine-decayed learning rate from ``learning_rate`` to 0).
    weight_decay: decoupled weight decay on the weights (not the bias).
    batch_size: None -> full batch up to ``FULL_BATCH_MAX`` examples, else 4096; 0 -> full batch; > 0 ->
      mini-batches drawn uniformly with replacement from ``fold_in(PRNGKey(seed), step)``.
    standardise: centre and scale every feature by the train mean / std (applied to both sets).

  Returns:
    {'train_acc', 'val_acc' (None without a val set), 'train_loss', 'params' {'w' (D, C), 'b' (C,)}, 'mean',
    'std', 'num_classes', 'steps', 'batch_size'} (accuracies as fractions).
  """
  train_x = np.asarray(train_x, np.float32)
  train_y = np.asarray(train_y, np.int32).reshape(-1)
  if train_x.ndim != 2 or train_x.shape[0] != train_y.shape[0]:
    raise ValueError(f'train_x must be (N, D) with N = len(train_y); got {train_x.shape} and {train_y.shape}')
  has_val = val_x is not None
  if has_val:
    val_x = np.asarray(val_x, np.float32)
    val_y = np.asarray(val_y, np.int32).reshape(-1)
    if val_x.ndim != 2 or val_x.shape[1] != train_x.shape[1] or val_x.shape[0] != val_y.shape[0]:
      raise ValueError(f'val_x must be (M, {train_x.shape[1]}) with M = len(val_y); got {val_x.shape}, '
                       f'{val_y.shape}')
  if num_classes is None:
    num_classes = int(max(train_y.max(), val_y.max() if has_val else 0)) + 1
  if train_y.min() < 0 or train_y.max() >= num_classes:
    raise ValueError(f'train labels must lie in [0, {num_classes})')
  n = train_x.shape[0]
  if batch_size is None:
    batch_size = 0 if n <= FULL_BATCH_MAX else 4096
  if standardise:
    if has_val:
      mean, std, tx, vx = standardize(train_x, val_x)
    else:
      mean, std, tx = standardize(train_x)
      vx = None
  else:
    mean, std = np.zeros(train_x.shape[1], np.float32), np.ones(train_x.shape[1], np.float32)
    tx, vx = train_x, val_x
  key = (int(steps), int(batch_size))
  if key not in _FIT_CACHE:
    _FIT_CACHE[key] = _make_fit(*key)
  tx_d, ty_d = jnp.asarray(tx), jnp.asarray(train_y)
  params = _FIT_CACHE[key](tx_d, ty_d, jnp.zeros((num_classes,)), jnp.float32(learning_rate),
                           jnp.float32(weight_decay), jax.random.key(seed))
  params = jax.device_get(params)
  out = {'train_acc': _eval_accuracy(params, tx_d, ty_d),
         'val_acc': _eval_accuracy(params, jnp.asarray(vx), jnp.asarray(val_y)) if has_val else None,
         'train_loss': float(_loss(params, tx_d[:FULL_BATCH_MAX], ty_d[:FULL_BATCH_MAX])),
         'params': params, 'mean': mean, 'std': std, 'num_classes': num_classes, 'steps': int(steps),
         'batch_size': int(batch_size)}
  return out


def probe_layers(train_feats, train_y, val_feats, val_y, layer_ids: Sequence[int], **probe_kw) -> Dict[str, Any]:
  """``train_linear_probe`` on every layer of (N, L, D) features; ``layer_ids`` names the L slices.

  Returns {'layers': [{'layer', 'train_acc', 'val_acc', 'train_loss'}...], 'best_layer', 'best_val_acc'}."""
  rows = []
  for j, lid in enumerate(layer_ids):
    r = train_linear_probe(train_feats[:, j], train_y, val_feats[:, j], val_y, **probe_kw)
    rows.append({'layer': int(lid), 'train_acc': r['train_acc'], 'val_acc': r['val_acc'],
                 'train_loss': r['train_loss']})
  best = max(rows, key=lambda r: r['val_acc'])
  return {'layers': rows, 'best_layer': best['layer'], 'best_val_acc': best['val_acc']}


def run_probe(pipe: BiGRPipeline, data_cfg, *, layers: Optional[Sequence[int]] = None, condition: str = 'null',
              train_split: str = 'train', eval_split: str = 'val', batch_size: int = 64,
              max_train_examples: int = 0, max_val_examples: int = 0, seed: int = 0, probe_steps: int = 300,
              probe_lr: float = 0.01, probe_weight_decay: float = 1e-3, probe_batch_size: Optional[int] = None,
              random_init: bool = False, log: Callable[[str], None] = print,
              sources: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """Extract features of both splits, probe every requested layer, print a table; return the results.
  ``sources``: the splits opened by ``check_probe_request`` (else checked and opened here, before any feature)."""
  if sources is None:
    sources = check_probe_request(data_cfg, train_split=train_split, eval_split=eval_split, layers=layers,
                                  condition=condition, batch_size=batch_size, max_train_examples=max_train_examples,
                                  max_val_examples=max_val_examples, probe_steps=probe_steps, probe_lr=probe_lr,
                                  probe_weight_decay=probe_weight_decay, probe_batch_size=probe_batch_size)
  if condition == 'label':
    log('WARNING: condition=label feeds the true class to BiGR; the features then contain the label itself '
        '(through attention to the class token) and the probe accuracy is not a representation measure.')
  ids = tuple(range(pipe.num_layers)) if not layers else _layer_ids(pipe, layers)
  t0 = time.perf_counter()
  kw = dict(layer=list(ids), condition=condition, batch_size=batch_size, seed=seed, log=log)
  tr_x, tr_y = dataset_features(pipe, data_cfg, train_split, max_examples=max_train_examples,
                                source=sources.get(train_split), **kw)
  va_x, va_y = dataset_features(pipe, data_cfg, eval_split, max_examples=max_val_examples,
                                source=sources.get(eval_split), **kw)
  t_feat = time.perf_counter() - t0
  num_classes = int(max(tr_y.max(), va_y.max())) + 1
  log(f'features: {tr_x.shape[0]} train / {va_x.shape[0]} {eval_split} images, {len(ids)} layers x D='
      f'{tr_x.shape[-1]} ({pipe.image_size}px, condition={condition}) in {t_feat:.1f} s')
  t0 = time.perf_counter()
  res = probe_layers(tr_x, tr_y, va_x, va_y, ids, num_classes=num_classes, steps=probe_steps,
                     learning_rate=probe_lr, weight_decay=probe_weight_decay, batch_size=probe_batch_size,
                     seed=seed)
  t_probe = time.perf_counter() - t0
  counts = np.bincount(va_y, minlength=num_classes)
  res.update(num_train=int(tr_x.shape[0]), num_val=int(va_x.shape[0]), num_classes=num_classes,
             condition=condition, chance_acc=1.0 / num_classes, majority_acc=float(counts.max() / counts.sum()),
             feature_s=t_feat, probe_s=t_probe, random_init=bool(random_init))
  bs = probe_batch_size if probe_batch_size is not None else (0 if tr_x.shape[0] <= FULL_BATCH_MAX else 4096)
  log(f'linear probe ({probe_steps} AdamW steps, lr {probe_lr}, wd {probe_weight_decay}, '
      f'{"full batch" if not bs else f"mini-batches of {bs}"}, seed {seed}):')
  for r in res['layers']:
    log(f'  layer {r["layer"]:3d}: train acc {100 * r["train_acc"]:6.2f}%  val acc {100 * r["val_acc"]:6.2f}%')
  log(f'best layer: {res["best_layer"]} (val acc {100 * res["best_val_acc"]:.2f}%) | chance '
      f'{100 * res["chance_acc"]:.2f}%, majority class {100 * res["majority_acc"]:.2f}%')
  if random_init:
    log('(random-init weights: these accuracies are the random-feature baseline, not a trained representation)')
  return res
