r"""Read the LPIPS-VGG weights (``var_jax.models.lpips``) from the released torch files and store them converted.

Convert once (needs torch), after which training needs only ``safetensors``::

  python -m var_jax.interop.lpips --vgg=vgg16-397923af.pth --lin=vgg.pth --out=lpips_vgg.safetensors

(``vgg16-397923af.pth``: torchvision's ImageNet VGG16; ``vgg.pth``: the lpips package's ``weights/v0.1/vgg.pth``.)
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
from flax import traverse_util
from flax.core import meta

from var_jax import fileio
from var_jax.interop.state_dict import CheckpointMismatchError, load_state_dict
from var_jax.models.lpips import TAP_CHANNELS, vgg16_convs

Params = Dict[str, Any]


def param_table() -> List[Tuple[str, Tuple[int, ...], Tuple[str, ...]]]:
  """Every tensor of the model: (torch key, torch shape, our params path). VGG keys first, then the lin layers."""
  t = []
  for i, cin, cout in vgg16_convs():
    t.append((f'features.{i}.weight', (cout, cin, 3, 3), ('net', f'conv_{i}', 'kernel')))
    t.append((f'features.{i}.bias', (cout,), ('net', f'conv_{i}', 'bias')))
  for k, c in enumerate(TAP_CHANNELS):
    t.append((f'lin{k}.model.1.weight', (1, c, 1, 1), (f'lin{k}', 'kernel')))
  return t


def _set(tree: Dict[str, Any], path: Tuple[str, ...], value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def params_from_state_dicts(vgg_sd: Mapping[str, Any], lin_sd: Mapping[str, Any], vgg_name: str = 'vgg',
                            lin_name: str = 'lin') -> Params:
  """Our params from torchvision's vgg16 state_dict and lpips's lin state_dict. Keys outside ``features.*`` /
  ``lin*`` are ignored (torchvision's ``classifier.*``; lpips itself loads its file with ``strict=False``)."""
  table = param_table()
  params: Params = {}
  layouts = ((vgg_sd, vgg_name, 'features.', 'torchvision vgg16 features.{i}.weight/bias'),
             (lin_sd, lin_name, 'lin', 'lpips v0.1 lin{k}.model.1.weight'))
  for sd, name, prefix, layout in layouts:
    want = {k for k, _, _ in table if k.startswith(prefix)}
    missing = sorted(want - set(sd), key=_natural)
    if missing:
      raise CheckpointMismatchError(f'{name}: missing keys {missing[:8]}{" ..." if len(missing) > 8 else ""} (expected the '
                      f'{layout} layout; found {sorted(sd, key=_natural)[:8]})')
    extra = sorted((k for k in sd if k.startswith(prefix) and k not in want), key=_natural)   # others: ignored
    if extra:
      raise CheckpointMismatchError(f'{name}: unexpected keys {extra[:8]} (not torchvision vgg16 / lpips v0.1 vgg layout; '
                      f'vgg16_bn or another net?)')
  for key, shape, path in table:
    a = np.asarray(vgg_sd[key] if key.startswith('features.') else lin_sd[key], np.float32)
    if tuple(a.shape) != shape:
      raise CheckpointMismatchError(f'{vgg_name if key.startswith("features.") else lin_name}: {key!r} has shape '
                      f'{tuple(a.shape)}, expected {shape}')
    _set(params, path, np.ascontiguousarray(np.transpose(a, (2, 3, 1, 0))) if a.ndim == 4 else a)   # OIHW -> HWIO
  return params


def _hwio(torch_shape: Tuple[int, ...]) -> Tuple[int, ...]:
  return (torch_shape[2], torch_shape[3], torch_shape[1], torch_shape[0]) if len(torch_shape) == 4 else torch_shape


def abstract_params() -> Params:
  """The LPIPS-VGG params tree as ``jax.ShapeDtypeStruct`` leaves (float32, our layout), no weights read: what a
  compile-only run (``var_jax.aot``) lowers against."""
  import jax
  tree: Dict[str, Any] = {}
  for _, shape, path in param_table():
    _set(tree, path, jax.ShapeDtypeStruct(_hwio(shape), np.float32))
  return tree


def _natural(k: str):
  return [int(p) if p.isdigit() else p for p in k.replace('.', ' . ').split()]


def load_lpips_params(vgg_path: str, lin_path: str) -> Params:
  """Read torchvision's ``vgg16-397923af.pth`` and lpips's ``weights/v0.1/vgg.pth`` (``torch.load(weights_only=True)``;
  ``.safetensors`` of the same state_dicts also work) into our params (numpy float32)."""
  return params_from_state_dicts(load_state_dict(vgg_path), load_state_dict(lin_path), os.fspath(vgg_path),
                                 os.fspath(lin_path))


def _check_params(flat: Mapping[str, Any], what: str):
  want = {'/'.join(path): _hwio(shape) for _, shape, path in param_table()}
  missing = sorted(set(want) - set(flat), key=_natural)
  extra = sorted(set(flat) - set(want), key=_natural)
  if missing or extra:
    raise CheckpointMismatchError(f'{what}: not LPIPS-VGG params; missing {missing[:8]}, unexpected {extra[:8]}')
  for k, shape in want.items():
    if tuple(np.shape(flat[k])) != shape:
      raise CheckpointMismatchError(f'{what}: {k!r} has shape {tuple(np.shape(flat[k]))}, expected {shape}')


def save_lpips_params(params: Params, path: str):
  """Write our params to one ``.safetensors`` (keys 'net/conv_0/kernel', ..., 'lin4/kernel'; float32)."""
  from safetensors.numpy import save
  from var_jax import fileio
  path = os.fspath(path)
  flat = traverse_util.flatten_dict(meta.unbox(params), sep='/')
  _check_params(flat, 'save_lpips_params')
  fileio.makedirs(os.path.dirname(fileio.abspath(path)))
  fileio.atomic_write_bytes(path, save({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()},
                                       metadata={'format': 'var_jax.lpips_vgg', 'layout': 'NHWC/HWIO'}))


def load_converted(path: str) -> Params:
  """Read a ``save_lpips_params`` file (no torch needed; local or gs://)."""
  from safetensors.numpy import load
  path = os.fspath(path)
  if not fileio.exists(path):
    raise FileNotFoundError(f'LPIPS weights not found: {path}')
  flat = dict(load(fileio.path(path).read_bytes()))
  _check_params(flat, path)
  return traverse_util.unflatten_dict(flat, sep='/')


def convert(vgg_path: str, lin_path: str, out_path: str) -> Params:
  params = load_lpips_params(vgg_path, lin_path)
  save_lpips_params(params, out_path)
  return params


def main(argv):
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  for name in ('vgg', 'lin', 'out'):
    if not getattr(f, name):
      raise app.UsageError(f'--{name} is required')
  convert(f.vgg, f.lin, f.out)
  print(f'wrote {f.out}')


if __name__ == '__main__':
  from absl import app, flags
  # flags are defined here, not at import: the library import must not claim global flag names
  flags.DEFINE_string('vgg', None, "torchvision's vgg16-397923af.pth")
  flags.DEFINE_string('lin', None, "the lpips package's weights/v0.1/vgg.pth")
  flags.DEFINE_string('out', None, 'output .safetensors')
  app.run(main)
