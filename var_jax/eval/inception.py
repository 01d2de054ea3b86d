r"""The Inception-v3 network of FID (pytorch-fid's "FID Inception") in Flax, NHWC, float32, inference only.

This is the network behind FID, Inception Score and precision/recall numbers: the TensorFlow graph
``inception-2015-12-05`` (the one TF-FID, the improved-GAN Inception Score code and OpenAI's guided-diffusion
evaluator use), as ported to PyTorch by pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``). It is torchvision's
Inception3 layout (``BasicConv2d`` = conv without bias, BatchNorm(eps=1e-3), ReLU) with the FID patches:

* ``Mixed_5b..5d`` (A), ``Mixed_6b..6e`` (C), ``Mixed_7b`` (E_1): the pooling branch is a 3x3/1 average pool with
  padding 1 that does *not* count the padded zeros (TF's ``SAME`` average pool; torch ``count_include_pad=False``);
* ``Mixed_7c`` (E_2): that branch is a 3x3/1 *max* pool with padding 1 instead (a quirk of the TF graph);
* ``fc`` has 1008 outputs (the TF graph's classes; 1000 ImageNet classes plus unused ones), no aux classifier.

Preprocessing (``preprocessing=``), two rules that differ in the resize and in the normalisation:

* ``'pytorch_fid'`` (default): pytorch-fid's ``InceptionV3(resize_input=True, normalize_input=True)``: images in
  [0, 1] (uint8 inputs are divided by 255 first, as ``ToTensor`` does), bilinearly resized to 299x299 exactly as
  ``F.interpolate(mode='bilinear', align_corners=False)`` (half-pixel centres: source ``(dst + 0.5) * in / out -
  0.5``; no antialiasing; torch's float32 rounding; ``var_jax.ops.resize.bilinear_resize``), then mapped to [-1, 1]
  by ``2x - 1`` (so 0 -> -1, 255 -> 1).
* ``'tf1_legacy'``: what the TF graph itself does, i.e. OpenAI's guided-diffusion evaluator (which feeds float32
  [0, 255] images to ``ExpandDims:0``) and TF-FID: TF1's ``tf.image.resize_bilinear`` (``align_corners=False``,
  ``half_pixel_centers=False``: source ``dst * in / out``, no half-pixel offset) of the [0, 255] values, then
  ``(x - 128) / 128`` (so 0 -> -1, 255 -> 0.9921875); ``var_jax.ops.resize.tf1_legacy_bilinear_resize``. uint8 inputs
  are used as is, float inputs (in [0, 1]) are multiplied by 255 first. Use it for parity with the evaluator's
  numbers; the pytorch-fid port's weights are the same, only this input path differs.

``pool3`` is the global average pool of ``Mixed_7c`` (2048 features), the pytorch-fid FID feature.

Logits and the Inception Score. pytorch-fid computes FID only: its ``InceptionV3`` stops at the average pool and never
applies ``fc`` (the 1008-way fc weights are in its file all the same). The network returns both forms of the fc:

* ``logits = pool3 @ W + b``: the full fc, the TF graph's ``softmax/logits``;
* ``logits_unbiased = pool3 @ W``: what the Inception Score is conventionally computed from: the improved-GAN
  ``inception_score.py``, OpenAI's guided-diffusion evaluator (whose numbers VAR reports) and torch-fidelity
  (``logits_unbiased``) all take only the MatMul weights of ``softmax/logits`` and softmax over the 1008 outputs.

``make_feature_fn`` / ``extract_features`` return ``logits_unbiased`` as their logits unless ``fc_bias=True``; feed
them to ``var_jax.eval.metrics.inception_score`` (softmax over all 1008 classes).

Params (the ``params`` collection; BatchNorm in inference form, stored unfolded so the import is a plain copy)::

  <conv>/conv/kernel (kh, kw, in, out)       <- <conv>.conv.weight (OIHW)
  <conv>/bn/{scale, bias, mean, var} (out,)  <- <conv>.bn.{weight, bias, running_mean, running_var}
  fc/kernel (2048, 1008), fc/bias (1008,)    <- fc.weight (transposed), fc.bias

with ``<conv>`` the torch module path, e.g. ``Conv2d_1a_3x3`` or ``Mixed_6b/branch7x7dbl_3``. The weights are not
downloaded at run time. Get the file once from
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
and either pass it to ``load_inception_params`` (needs torch) or convert it to a torch-free ``.safetensors``::

  python -m var_jax.eval.inception --pth=pt_inception-2015-12-05-6726825d.pth --out=fid_inception.safetensors
"""
from __future__ import annotations

import collections
import functools
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models.layers import torch_default_bias_init, torch_default_kernel_init
from var_jax.ops.resize import bilinear_resize, tf1_legacy_bilinear_resize

Params = Dict[str, Any]

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL3_DIM = 2048
BN_EPS = 1e-3
MIN_SIZE = 75          # smallest input the network accepts when it is not resized to 299 (torchvision's min_size)
CONVERTED_FORMAT = 'var_jax.fid_inception'

# ----------------------------------------------------------------------------- architecture (data)
# A conv spec: (name, in, out, (kh, kw), stride, (pad_h, pad_w)); every conv is a BasicConv2d (conv, BN, ReLU).
ConvSpec = Tuple[str, int, int, Tuple[int, int], int, Tuple[int, int]]


def _c(name: str, cin: int, cout: int, k: Union[int, Tuple[int, int]] = 1, stride: int = 1,
       pad: Union[int, Tuple[int, int]] = 0) -> ConvSpec:
  k = (k, k) if isinstance(k, int) else tuple(k)
  pad = (pad, pad) if isinstance(pad, int) else tuple(pad)
  return (name, cin, cout, k, stride, pad)


STEM: Tuple[ConvSpec, ...] = (
    _c('Conv2d_1a_3x3', 3, 32, 3, stride=2),
    _c('Conv2d_2a_3x3', 32, 32, 3),
    _c('Conv2d_2b_3x3', 32, 64, 3, pad=1),
    # max pool 3x3/2
    _c('Conv2d_3b_1x1', 64, 80, 1),
    _c('Conv2d_4a_3x3', 80, 192, 3),
    # max pool 3x3/2
)

# (torch name, kind, in channels, kind argument): A takes pool_features, C channels_7x7, E its pooling branch.
BLOCKS: Tuple[Tuple[str, str, int, Any], ...] = (
    ('Mixed_5b', 'A', 192, 32), ('Mixed_5c', 'A', 256, 64), ('Mixed_5d', 'A', 288, 64),
    ('Mixed_6a', 'B', 288, None),
    ('Mixed_6b', 'C', 768, 128), ('Mixed_6c', 'C', 768, 160), ('Mixed_6d', 'C', 768, 160),
    ('Mixed_6e', 'C', 768, 192),
    ('Mixed_7a', 'D', 768, None),
    ('Mixed_7b', 'E', 1280, 'avg'), ('Mixed_7c', 'E', 2048, 'max'),
)


def block_convs(kind: str, cin: int, arg: Any = None) -> Tuple[ConvSpec, ...]:
  """The convs of one mixed block, in torchvision's registration (= state_dict) order."""
  if kind == 'A':
    return (_c('branch1x1', cin, 64), _c('branch5x5_1', cin, 48), _c('branch5x5_2', 48, 64, 5, pad=2),
            _c('branch3x3dbl_1', cin, 64), _c('branch3x3dbl_2', 64, 96, 3, pad=1),
            _c('branch3x3dbl_3', 96, 96, 3, pad=1), _c('branch_pool', cin, arg))
  if kind == 'B':
    return (_c('branch3x3', cin, 384, 3, stride=2), _c('branch3x3dbl_1', cin, 64),
            _c('branch3x3dbl_2', 64, 96, 3, pad=1), _c('branch3x3dbl_3', 96, 96, 3, stride=2))
  if kind == 'C':
    c7 = arg
    return (_c('branch1x1', cin, 192), _c('branch7x7_1', cin, c7), _c('branch7x7_2', c7, c7, (1, 7), pad=(0, 3)),
            _c('branch7x7_3', c7, 192, (7, 1), pad=(3, 0)), _c('branch7x7dbl_1', cin, c7),
            _c('branch7x7dbl_2', c7, c7, (7, 1), pad=(3, 0)), _c('branch7x7dbl_3', c7, c7, (1, 7), pad=(0, 3)),
            _c('branch7x7dbl_4', c7, c7, (7, 1), pad=(3, 0)), _c('branch7x7dbl_5', c7, 192, (1, 7), pad=(0, 3)),
            _c('branch_pool', cin, 192))
  if kind == 'D':
    return (_c('branch3x3_1', cin, 192), _c('branch3x3_2', 192, 320, 3, stride=2), _c('branch7x7x3_1', cin, 192),
            _c('branch7x7x3_2', 192, 192, (1, 7), pad=(0, 3)), _c('branch7x7x3_3', 192, 192, (7, 1), pad=(3, 0)),
            _c('branch7x7x3_4', 192, 192, 3, stride=2))
  if kind == 'E':
    return (_c('branch1x1', cin, 320), _c('branch3x3_1', cin, 384), _c('branch3x3_2a', 384, 384, (1, 3), pad=(0, 1)),
            _c('branch3x3_2b', 384, 384, (3, 1), pad=(1, 0)), _c('branch3x3dbl_1', cin, 448),
            _c('branch3x3dbl_2', 448, 384, 3, pad=1), _c('branch3x3dbl_3a', 384, 384, (1, 3), pad=(0, 1)),
            _c('branch3x3dbl_3b', 384, 384, (3, 1), pad=(1, 0)), _c('branch_pool', cin, 192))
  raise ValueError(f'unknown inception block kind {kind!r}')


def all_convs() -> List[Tuple[Tuple[str, ...], ConvSpec]]:
  """Every BasicConv2d of the network as (module path, spec), in state_dict order."""
  out = [((spec[0],), spec) for spec in STEM]
  for name, kind, cin, arg in BLOCKS:
    out += [((name, spec[0]), spec) for spec in block_convs(kind, cin, arg)]
  return out


# ----------------------------------------------------------------------------- layers
class BatchNormInference(nn.Module):
  """torch ``BatchNorm2d(eps=1e-3)`` in ``eval()``: ``(x - mean) / sqrt(var + eps) * scale + bias``."""
  epsilon: float = BN_EPS

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    mean = self.param('mean', nn.initializers.zeros, (c,), jnp.float32)
    var = self.param('var', nn.initializers.ones, (c,), jnp.float32)
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return x * mul + (bias - mean * mul)


class ConvNoBias(nn.Module):
  """NHWC conv, HWIO kernel, no bias, torch's symmetric zero padding ``(pad_h, pad_w)``."""
  features: int
  kernel_size: Tuple[int, int]
  stride: int = 1
  padding: Tuple[int, int] = (0, 0)
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param('kernel', torch_default_kernel_init, (kh, kw, x.shape[-1], self.features), jnp.float32)
    ph, pw = self.padding
    return jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), ((ph, ph), (pw, pw)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)


class BasicConv(nn.Module):
  """torchvision ``BasicConv2d``: conv (no bias), BatchNorm(eps=1e-3), ReLU. Built from a ``ConvSpec``."""
  spec: ConvSpec
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    _, cin, cout, k, stride, pad = self.spec
    if x.shape[-1] != cin:
      raise ValueError(f'{self.spec[0]}: expected {cin} input channels, got {x.shape[-1]}')
    x = ConvNoBias(cout, k, stride, pad, self.precision, name='conv')(x)
    return jax.nn.relu(BatchNormInference(name='bn')(x))


def max_pool_3x3(x, stride: int, pad: int = 0):
  """``F.max_pool2d(x, 3, stride, padding=pad)`` (floor mode; padding never wins: it is -inf)."""
  p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), p)


def avg_pool_3x3_exclude_pad(x):
  """``F.avg_pool2d(x, 3, 1, padding=1, count_include_pad=False)``: each window's mean over its in-image pixels
  (TF's ``SAME`` average pool)."""
  p = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), p)
  count = jax.lax.reduce_window(jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype), 0.0, jax.lax.add, (1, 3, 3, 1),
                                (1, 1, 1, 1), p)
  return total / count


class InceptionBlock(nn.Module):
  """One FID mixed block: kind 'A', 'B', 'C', 'D' or 'E' (``arg``: E's pooling branch, 'avg' or 'max')."""
  kind: str
  in_channels: int
  arg: Any = None
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = {s[0]: BasicConv(s, self.precision, name=s[0])
            for s in block_convs(self.kind, self.in_channels, self.arg)}
    cat = lambda *xs: jnp.concatenate(xs, axis=-1)
    if self.kind == 'A':
      b5 = conv['branch5x5_2'](conv['branch5x5_1'](x))
      b3 = conv['branch3x3dbl_3'](conv['branch3x3dbl_2'](conv['branch3x3dbl_1'](x)))
      return cat(conv['branch1x1'](x), b5, b3, conv['branch_pool'](avg_pool_3x3_exclude_pad(x)))
    if self.kind == 'B':
      b3 = conv['branch3x3dbl_3'](conv['branch3x3dbl_2'](conv['branch3x3dbl_1'](x)))
      return cat(conv['branch3x3'](x), b3, max_pool_3x3(x, 2))
    if self.kind == 'C':
      b7 = conv['branch7x7_3'](conv['branch7x7_2'](conv['branch7x7_1'](x)))
      bd = x
      for i in range(1, 6):
        bd = conv[f'branch7x7dbl_{i}'](bd)
      return cat(conv['branch1x1'](x), b7, bd, conv['branch_pool'](avg_pool_3x3_exclude_pad(x)))
    if self.kind == 'D':
      b3 = conv['branch3x3_2'](conv['branch3x3_1'](x))
      b7 = x
      for i in range(1, 5):
        b7 = conv[f'branch7x7x3_{i}'](b7)
      return cat(b3, b7, max_pool_3x3(x, 2))
    if self.kind == 'E':
      b3 = conv['branch3x3_1'](x)
      b3 = cat(conv['branch3x3_2a'](b3), conv['branch3x3_2b'](b3))
      bd = conv['branch3x3dbl_2'](conv['branch3x3dbl_1'](x))
      bd = cat(conv['branch3x3dbl_3a'](bd), conv['branch3x3dbl_3b'](bd))
      if self.arg == 'avg':
        pooled = avg_pool_3x3_exclude_pad(x)
      elif self.arg == 'max':
        pooled = max_pool_3x3(x, 1, pad=1)
      else:
        raise ValueError(f'InceptionE pooling must be \'avg\' or \'max\', got {self.arg!r}')
      return cat(conv['branch1x1'](x), b3, bd, conv['branch_pool'](pooled))
    raise ValueError(f'unknown inception block kind {self.kind!r}')


PREPROCESSING = ('pytorch_fid', 'tf1_legacy')
_U8_OVER_255 = np.arange(256, dtype=np.float32) / np.float32(255)


def _check_preprocessing(preprocessing: str) -> str:
  if preprocessing not in PREPROCESSING:
    raise ValueError(f'preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}')
  return preprocessing


def preprocess(images, resize_input: bool = True, normalize_input: bool = True,
               preprocessing: str = 'pytorch_fid') -> jax.Array:
  """The network's input path on NHWC images (see the module docstring). Returns float32.

  ``'pytorch_fid'``: integer (uint8) images / 255, float images taken as [0, 1]; the torch-exact bilinear resize to
  299x299 (half-pixel centres) and ``2x - 1``. ``'tf1_legacy'`` (OpenAI's evaluator / the TF graph): integer images
  as [0, 255] values, float images (in [0, 1]) times 255; TF1's legacy bilinear resize (``src = dst * in / out``)
  and ``(x - 128) / 128``.
  """
  _check_preprocessing(preprocessing)
  x = jnp.asarray(images)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'expected NHWC RGB images (batch, height, width, 3), got shape {x.shape}')
  integer = jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_
  if preprocessing == 'tf1_legacy':
    x = x.astype(jnp.float32) if integer else x.astype(jnp.float32) * 255.0
    if resize_input:
      x = tf1_legacy_bilinear_resize(x, (INPUT_SIZE, INPUT_SIZE))
    if normalize_input:
      x = (x - 128.0) * (1.0 / 128.0)     # the graph's Sub(128), Mul(1/128); exact, 1/128 is a power of two
    return x
  if x.dtype == jnp.uint8 or x.dtype == jnp.bool_:
    # a table of the correctly rounded k / 255 (torch's ``x.float() / 255``): XLA's CPU float32 division is not
    # correctly rounded (126 of the 256 quotients are 1 ulp off)
    x = jnp.take(jnp.asarray(_U8_OVER_255), x.astype(jnp.int32))
  elif integer:
    x = x.astype(jnp.float32) / 255.0
  else:
    x = x.astype(jnp.float32)
  if resize_input:
    x = bilinear_resize(x, (INPUT_SIZE, INPUT_SIZE))
  if normalize_input:
    # ``2x - 1`` written as ``(x + x) - 1`` (x + x = 2x exactly): inside a jit XLA would contract ``2 * x - 1`` into
    # one FMA, one rounding fewer than torch's two ops, 1 ulp off in ~40% of the pixels.
    x = (x + x) - 1.0
  return x


class FC(nn.Module):
  """torch ``nn.Linear``: kernel (in, out), bias (out,). Returns ``(x @ kernel, bias)`` (both logit forms)."""
  features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', torch_default_kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', torch_default_bias_init(x.shape[-1]), (self.features,), jnp.float32)
    return jnp.dot(x, kernel, precision=self.precision), bias


class InceptionV3(nn.Module):
  """FID Inception-v3 (pytorch-fid ``InceptionV3([3], resize_input, normalize_input, use_fid_inception=True)`` plus
  its 1008-way ``fc``) on NHWC images of any size.

  ``__call__(images)`` -> ``{'pool3': (B, 2048), 'logits': (B, 1008), 'logits_unbiased': (B, 1008)}``, float32;
  ``logits = pool3 @ fc.W + fc.b``, ``logits_unbiased = pool3 @ fc.W`` (the Inception Score convention, see the module
  docstring). With ``resize_input=False`` the images are used at their own size (at least 75x75). ``preprocessing``:
  ``'pytorch_fid'`` (default) or ``'tf1_legacy'`` (OpenAI's evaluator), see :func:`preprocess`.
  """
  resize_input: bool = True
  normalize_input: bool = True
  precision: Any = jax.lax.Precision.HIGHEST
  preprocessing: str = 'pytorch_fid'

  @nn.compact
  def __call__(self, images) -> Dict[str, jax.Array]:
    x = preprocess(images, self.resize_input, self.normalize_input, self.preprocessing)
    if min(x.shape[1:3]) < MIN_SIZE:
      raise ValueError(f'the Inception network needs inputs of at least {MIN_SIZE}x{MIN_SIZE}, got '
                       f'{x.shape[1]}x{x.shape[2]} (use resize_input=True)')
    stem = {s[0]: BasicConv(s, self.precision, name=s[0]) for s in STEM}
    x = stem['Conv2d_2b_3x3'](stem['Conv2d_2a_3x3'](stem['Conv2d_1a_3x3'](x)))
    x = max_pool_3x3(x, 2)
    x = stem['Conv2d_4a_3x3'](stem['Conv2d_3b_1x1'](x))
    x = max_pool_3x3(x, 2)
    for name, kind, cin, arg in BLOCKS:
      x = InceptionBlock(kind, cin, arg, self.precision, name=name)(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    unbiased, bias = FC(NUM_CLASSES, self.precision, name='fc')(pool3)
    return {'pool3': pool3, 'logits': unbiased + bias, 'logits_unbiased': unbiased}


def init_params(rng: jax.Array) -> Params:
  """Randomly initialised params (torch-default conv/fc init, identity BatchNorm) in the public layout; for tests."""
  x = jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
  v = jax.jit(InceptionV3(resize_input=False).init)(rng, x)
  return jax.tree.map(np.asarray, v['params'])


def apply(params: Params, images, resize_input: bool = True, normalize_input: bool = True,
          precision: Any = jax.lax.Precision.HIGHEST, preprocessing: str = 'pytorch_fid') -> Dict[str, jax.Array]:
  """``InceptionV3(...).apply`` on the public params layout (returned by ``load_inception_params``)."""
  model = InceptionV3(resize_input=resize_input, normalize_input=normalize_input, precision=precision,
                      preprocessing=_check_preprocessing(preprocessing))
  return model.apply({'params': params}, images)


# ----------------------------------------------------------------------------- weights
def _hwio(shape: Sequence[int]) -> Tuple[int, ...]:
  return (shape[2], shape[3], shape[1], shape[0])


def param_table():
  """Every tensor of pytorch-fid's ``fid_inception_v3().state_dict()`` (less ``num_batches_tracked``), in its order,
  as ``var_jax.interop.reference.Entry`` rows (torch key and shape, our path, layout transforms)."""
  from var_jax.interop.state_dict import Entry
  t = []
  oihw_to_hwio, hwio_to_oihw = (lambda a: np.transpose(a, (2, 3, 1, 0))), (lambda a: np.transpose(a, (3, 2, 0, 1)))
  for path, (_, cin, cout, (kh, kw), _, _) in all_convs():
    key = '.'.join(path)
    t.append(Entry(f'{key}.conv.weight', (cout, cin, kh, kw), 'params', path + ('conv', 'kernel'),
                   to_torch=hwio_to_oihw, from_torch=oihw_to_hwio))
    for tname, ours in (('weight', 'scale'), ('bias', 'bias'), ('running_mean', 'mean'), ('running_var', 'var')):
      t.append(Entry(f'{key}.bn.{tname}', (cout,), 'params', path + ('bn', ours)))
  t.append(Entry('fc.weight', (NUM_CLASSES, POOL3_DIM), 'params', ('fc', 'kernel'), to_torch=np.transpose,
                 from_torch=np.transpose))
  t.append(Entry('fc.bias', (NUM_CLASSES,), 'params', ('fc', 'bias')))
  return t


def _our_shape(entry) -> Tuple[int, ...]:
  if len(entry.shape) == 4:
    return _hwio(entry.shape)
  if len(entry.shape) == 2:
    return tuple(reversed(entry.shape))
  return entry.shape


def params_from_state_dict(sd: Mapping[str, Any], what: str = 'state_dict') -> Params:
  """Our params (numpy float32) from a pytorch-fid Inception state_dict (torch key names; numpy or torch values).

  BatchNorm ``num_batches_tracked`` counters are ignored; any other missing or unexpected key, or a shape that does
  not match, raises ``CheckpointMismatchError`` naming ``what`` (the file) and the key."""
  from var_jax.interop.state_dict import CheckpointMismatchError, import_state_dict
  sd = {k: v for k, v in sd.items() if not k.endswith('.num_batches_tracked')}
  if 'AuxLogits.fc.weight' in sd or ('fc.weight' in sd and tuple(np.shape(sd['fc.weight']))[0] == 1000):
    raise CheckpointMismatchError(f'{what}: this looks like torchvision\'s ImageNet Inception-v3 (1000 classes / '
                                  f'AuxLogits), not the FID Inception; get {FID_WEIGHTS_URL}')
  try:
    return import_state_dict(sd, param_table(), f'{what} (pytorch-fid FID Inception)')['params']
  except CheckpointMismatchError as e:
    raise CheckpointMismatchError(f'{e}\n(expected the state_dict of pytorch-fid\'s fid_inception_v3(), i.e. '
                                  f'{os.path.basename(FID_WEIGHTS_URL)})') from None


def params_to_state_dict(params: Params) -> 'collections.OrderedDict[str, np.ndarray]':
  """Our params -> pytorch-fid state_dict (numpy, torch layout and order; no ``num_batches_tracked``)."""
  from var_jax.interop.state_dict import export_state_dict
  return export_state_dict({'params': params}, param_table(), 'FID Inception')


def _flatten(params: Params) -> Dict[str, Any]:
  from flax import traverse_util
  from flax.core import meta
  return traverse_util.flatten_dict(meta.unbox(params), sep='/')


def _check_params(flat: Mapping[str, Any], what: str):
  from var_jax.interop.state_dict import CheckpointMismatchError
  want = {'/'.join(e.path): _our_shape(e) for e in param_table()}
  missing = [k for k in want if k not in flat]
  extra = [k for k in flat if k not in want]
  problems = [f'missing key {k!r} (expected shape {want[k]})' for k in missing]
  problems += [f'unexpected key {k!r} (found shape {tuple(np.shape(flat[k]))})' for k in extra]
  problems += [f'key {k!r}: expected shape {s}, found {tuple(np.shape(flat[k]))}'
               for k, s in want.items() if k in flat and tuple(np.shape(flat[k])) != s]
  if problems:
    raise CheckpointMismatchError(f'{what}: not converted FID Inception params:\n  ' + '\n  '.join(problems[:20])
                                  + ('\n  ...' if len(problems) > 20 else ''))


def save_inception_params(params: Params, path: str):
  """Write our params to ``.safetensors`` or ``.npz`` (keys like 'Mixed_6b/branch1x1/conv/kernel'; float32)."""
  path = os.fspath(path)
  flat = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in _flatten(params).items()}
  _check_params(flat, 'save_inception_params')
  from var_jax import fileio        # atomic: never a half-written file under the final name; local or gs://
  fileio.makedirs(os.path.dirname(fileio.abspath(path)))
  if path.endswith('.safetensors'):
    from safetensors.numpy import save
    fileio.atomic_write_bytes(path, save(flat, metadata={'format': CONVERTED_FORMAT, 'layout': 'NHWC/HWIO',
                                                         'source': FID_WEIGHTS_URL}))
  elif path.endswith('.npz'):
    fileio.atomic_save(path, lambda f: np.savez(f, **flat))
  else:
    raise ValueError(f'{path}: the converted file must end in .safetensors or .npz')


def _missing_weights_error(path: Optional[str]) -> FileNotFoundError:
  where = 'no FID Inception weights path was given' if path is None else f'FID Inception weights not found: {path}'
  return FileNotFoundError(
      f'{where}. The weights are never downloaded at run time: get pytorch-fid\'s file once from\n  {FID_WEIGHTS_URL}\n'
      'and pass its path (reading it needs torch), or convert it to a torch-free file with\n'
      '  python -m var_jax.eval.inception --pth=pt_inception-2015-12-05-6726825d.pth --out=fid_inception.safetensors')


def load_inception_params(path: Optional[str] = None) -> Params:
  """Read the FID Inception params from pytorch-fid's ``.pth`` (torch, ``weights_only=True``) or from a converted
  ``.safetensors`` / ``.npz`` (our layout, written by ``convert_inception``/``save_inception_params``; a
  ``.safetensors`` holding the torch state_dict keys is accepted too). Returns numpy float32 params."""
  if path is None:
    raise _missing_weights_error(None)
  from var_jax import fileio
  path = os.fspath(path)
  if not fileio.exists(path):
    raise _missing_weights_error(path)
  if path.endswith('.npz'):
    with fileio.path(path).open('rb') as fh, np.load(fh) as data:
      flat = {k: data[k] for k in data.files}
  elif path.endswith('.safetensors'):
    from safetensors.numpy import load
    flat = dict(load(fileio.path(path).read_bytes()))     # local or remote (gs://)
  else:
    from var_jax.interop.state_dict import load_state_dict
    return params_from_state_dict(load_state_dict(path), path)
  if flat and all('/' not in k for k in flat):      # a torch-key file (e.g. the .pth re-saved as safetensors)
    return params_from_state_dict(flat, path)
  _check_params(flat, path)
  from flax import traverse_util
  return traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()}, sep='/')


def convert_inception(pth_path: str, out_path: str) -> Params:
  """Convert pytorch-fid's ``.pth`` once to a torch-free ``.safetensors``/``.npz`` in our layout; returns the params."""
  params = load_inception_params(pth_path)
  save_inception_params(params, out_path)
  return params


# ----------------------------------------------------------------------------- feature extraction
@functools.partial(jax.jit, static_argnames='preprocessing')
def _preprocess(images, preprocessing='pytorch_fid'):
  return preprocess(images, preprocessing=preprocessing)


@jax.jit
def _network(params, x):
  return apply(params, x, resize_input=False, normalize_input=False)


def make_feature_fn(params: Params, fc_bias: bool = False,
                    preprocessing: str = 'pytorch_fid') -> Callable[[Any], Tuple[jax.Array, jax.Array]]:
  """A function ``images (B, H, W, 3) uint8/float in [0, 1] -> (pool3 (B, 2048), logits (B, 1008))``, float32.

  ``logits`` are ``pool3 @ fc.W`` (the Inception Score convention of OpenAI's evaluator, improved-GAN and
  torch-fidelity) or, with ``fc_bias=True``, the full fc output. Two jitted stages: the resize/normalisation
  (compiled per input shape) and the network on 299x299 (compiled once per batch size), with the params passed as
  an argument (never baked into the program). Inputs sharded over devices along the batch give sharded outputs;
  the params are put on the default device uncommitted (``jax.device_put`` them replicated yourself to pin them).
  ``preprocessing``: ``'pytorch_fid'`` (default) or ``'tf1_legacy'`` (OpenAI's evaluator), see :func:`preprocess`.
  """
  _check_preprocessing(preprocessing)
  params = jax.tree.map(jnp.asarray, params)
  key = 'logits' if fc_bias else 'logits_unbiased'

  def features(images):
    out = _network(params, _preprocess(images, preprocessing=preprocessing))
    return out['pool3'], out[key]
  return features


def _batches(images: Union[np.ndarray, jax.Array, Iterable[Any]], batch_size: int) -> Iterator[Any]:
  """Fixed-size chunks of an (N, H, W, 3) array or of an iterable of such batches (the last chunk may be short)."""
  if hasattr(images, 'shape') and hasattr(images, 'ndim'):
    if images.ndim != 4:
      raise ValueError(f'expected an (N, H, W, 3) array of images, got shape {images.shape}')
    for start in range(0, images.shape[0], batch_size):
      yield images[start:start + batch_size]
    return
  buf, n = [], 0
  for batch in images:
    batch = np.asarray(batch)
    if batch.ndim == 3:
      batch = batch[None]
    if buf and batch.shape[1:] != buf[0].shape[1:]:     # a new image size: flush what we have
      yield np.concatenate(buf)
      buf, n = [], 0
    buf.append(batch)
    n += batch.shape[0]
    while n >= batch_size:
      cat = np.concatenate(buf)
      yield cat[:batch_size]
      buf, n = ([cat[batch_size:]], n - batch_size) if n > batch_size else ([], 0)
  if n:
    yield np.concatenate(buf)


def extract_features(params: Params, images: Union[np.ndarray, jax.Array, Iterable[Any]], batch_size: int = 50,
                     fc_bias: bool = False, preprocessing: str = 'pytorch_fid') -> Tuple[np.ndarray, np.ndarray]:
  """``(pool3 (N, 2048), logits (N, 1008))`` numpy float32 for all images, ``batch_size`` at a time.

  ``images``: an (N, H, W, 3) array, or an iterable of (b, H, W, 3) batches (any b; single (H, W, 3) images work
  too), uint8 or float in [0, 1], any size (resized to 299x299 as pytorch-fid does). Short batches are padded to
  ``batch_size`` so the network compiles once. ``logits`` and ``preprocessing`` as in ``make_feature_fn``."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  fn = make_feature_fn(params, fc_bias=fc_bias, preprocessing=preprocessing)
  pools, logits = [], []
  for batch in _batches(images, batch_size):
    valid = batch.shape[0]
    if valid < batch_size:
      pad = [(0, batch_size - valid)] + [(0, 0)] * (batch.ndim - 1)
      batch = jnp.pad(jnp.asarray(batch), pad) if isinstance(batch, jax.Array) else np.pad(batch, pad)
    p, l = fn(batch)
    pools.append(np.asarray(p)[:valid])
    logits.append(np.asarray(l)[:valid])
  if not pools:
    return np.zeros((0, POOL3_DIM), np.float32), np.zeros((0, NUM_CLASSES), np.float32)
  return np.concatenate(pools), np.concatenate(logits)


# ----------------------------------------------------------------------------- command line
def main(argv):
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f.pth or not f.out:
    raise app.UsageError(f'--pth and --out are required (the .pth is pytorch-fid\'s {FID_WEIGHTS_URL})')
  params = convert_inception(f.pth, f.out)
  n = sum(int(np.size(a)) for a in jax.tree.leaves(params))
  print(f'wrote {f.out} ({n} values)')


if __name__ == '__main__':
  from absl import app, flags
  # flags are defined here, not at import: the library import must not claim global flag names
  flags.DEFINE_string('pth', None, 'pytorch-fid\'s pt_inception-2015-12-05-6726825d.pth')
  flags.DEFINE_string('out', None, 'output .safetensors or .npz (our layout; no torch needed to read it)')
  app.run(main)
