"""The GAN parts of a reference tokenizer file: the taming ``NLayerDiscriminator`` (``disc.*`` / ``main.{i}.*``,
OIHW) and the reference BinaryGAN's LPIPS (``perceptual.*``), to and from our variables."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import jax
import numpy as np
from flax import traverse_util

from var_jax.models.discriminator import DiscriminatorConfig, taming_layout


def export_discriminator(cfg: DiscriminatorConfig, params, stats, prefix: str = '') -> Dict[str, np.ndarray]:
  """Our discriminator variables -> the taming ``NLayerDiscriminator.state_dict()`` layout (``main.{i}.*``, OIHW),
  the inverse of ``import_taming_discriminator`` (``num_batches_tracked`` is not written)."""
  flat = {'params': traverse_util.flatten_dict(params), 'batch_stats': traverse_util.flatten_dict(stats or {})}
  out = {}
  for key, _, col, path in taming_layout(cfg):
    if col is None:
      continue
    a = np.asarray(jax.device_get(flat[col][path]), np.float32)
    if path[-1] == 'kernel':
      a = np.transpose(a, (3, 2, 0, 1))
    out[prefix + key] = np.ascontiguousarray(a)
  return out




def lpips_from_perceptual(sd: Mapping[str, Any], prefix: str = 'perceptual.'):
  """LPIPS params from the reference ``bae/lpips.py`` ``LPIPS`` state_dict inside a BinaryGAN file:
  ``net.slice{s}.{i}.weight/bias`` (i = torchvision's ``features`` index) and ``lin{k}.model.1.weight``; the
  ``scaling_layer`` buffers must hold the standard constants."""
  from var_jax.interop.state_dict import CheckpointMismatchError
  from var_jax.interop import lpips as lpips_io
  from var_jax.models import lpips as lpips_lib
  vgg, lin = {}, {}
  for k, v in sd.items():
    if not k.startswith(prefix):
      continue
    rest = k[len(prefix):]
    parts = rest.split('.')
    if parts[0] == 'net' and len(parts) == 4 and parts[1].startswith('slice'):
      vgg[f'features.{parts[2]}.{parts[3]}'] = v
    elif parts[0].startswith('lin'):
      lin[rest] = v
    elif parts[0] == 'scaling_layer':
      want = lpips_lib.SHIFT if parts[1] == 'shift' else lpips_lib.SCALE
      if not np.allclose(np.asarray(v, np.float64).reshape(-1), want, atol=1e-6):
        raise CheckpointMismatchError(f'{k}: {np.asarray(v).reshape(-1)} differs from the LPIPS constants {want}')
    else:
      raise CheckpointMismatchError(f'{k}: not part of the reference LPIPS (expected {prefix}net.slice*/lin*)')
  return lpips_io.params_from_state_dicts(vgg, lin, f'{prefix}net.*', f'{prefix}lin*')




def import_discriminator_partial(sd: Mapping[str, Any], cfg: DiscriminatorConfig, params, stats
                                 ) -> Tuple[Any, Any, List[str], List[str]]:
  """Copy the tensors of a taming-layout discriminator state_dict (``main.{i}.*``) whose key and shape fit
  ``cfg`` into ``params``/``stats`` (host pytrees). -> (params, stats, imported keys, skipped 'key (why)')."""
  flat = {'params': traverse_util.flatten_dict(jax.device_get(params)),
          'batch_stats': traverse_util.flatten_dict(jax.device_get(stats.get('batch_stats', {})) if stats else {})}
  layout = taming_layout(cfg)
  known = {key for key, _, _, _ in layout}
  imported, skipped = [], []
  for key, shape, col, path in layout:
    if col is None:
      continue
    if key not in sd:
      skipped.append(f'{key} (missing from the file; model shape {shape})')
      continue
    have = tuple(np.shape(sd[key]))
    if have != shape:
      skipped.append(f'{key} (file {have}, model {shape})')
      continue
    a = np.asarray(sd[key], np.float32)
    if path[-1] == 'kernel':
      a = np.transpose(a, (2, 3, 1, 0))
    flat[col][path] = np.ascontiguousarray(a)
    imported.append(key)
  skipped += [f'{k} (not in this discriminator: {cfg})' for k in sd if k not in known]
  new_stats = dict(stats or {})
  if flat['batch_stats']:
    new_stats['batch_stats'] = traverse_util.unflatten_dict(flat['batch_stats'])
  return traverse_util.unflatten_dict(flat['params']), new_stats, imported, skipped


