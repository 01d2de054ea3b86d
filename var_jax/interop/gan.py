"""The GAN parts of a reference tokenizer file, to and from our variables: the taming ``NLayerDiscriminator``
(``main.{i}.*``, OIHW; ``disc.*`` in a BinaryGAN file, ``loss.discriminator.*`` in a taming VQGAN one) and the
reference BinaryGAN's LPIPS (``perceptual.*``)."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import jax
import numpy as np
from flax import traverse_util

from var_jax.interop import lpips as lpips_io
from var_jax.interop.state_dict import (CheckpointMismatchError, Entry, conv_entries, export_state_dict,
                                        import_state_dict, norm_entries)
from var_jax.models import lpips as lpips_lib
from var_jax.models.discriminator import DiscriminatorConfig

_COUNTER = 'num_batches_tracked'   # BatchNorm's step counter: accepted (optional) on import, not kept, not written


# ----------------------------------------------------------------------------- discriminator
def discriminator_table(cfg: DiscriminatorConfig) -> List[Entry]:
  """Every tensor of taming's ``NLayerDiscriminator.state_dict()``, in its order, onto ``conv_{l}`` / ``norm_{l}``
  (BatchNorm running stats in ``batch_stats``). The ``main.{i}`` indices follow taming's ``nn.Sequential`` (conv,
  [norm], LeakyReLU per layer); for ``norm='group'`` / ``'none'`` the same Sequential with ``nn.GroupNorm`` / no norm
  module in that slot."""
  e: List[Entry] = []
  i, cin = 0, cfg.in_channels
  for l, (cout, _, bias, has_norm) in enumerate(cfg.layers()):
    e += conv_entries(f'main.{i}', (f'conv_{l}',), cin, cout, 4, bias)
    i += 1
    if has_norm and cfg.norm != 'none':
      e += norm_entries(f'main.{i}', (f'norm_{l}',), cout)
      if cfg.norm == 'batch':
        e += [Entry(f'main.{i}.running_mean', (cout,), 'batch_stats', (f'norm_{l}', 'mean')),
              Entry(f'main.{i}.running_var', (cout,), 'batch_stats', (f'norm_{l}', 'var')),
              Entry(f'main.{i}.num_batches_tracked', (), _COUNTER, optional=True, dtype=np.int64)]
      i += 1
    if l != cfg.n_layers + 1:
      i += 1                                # LeakyReLU: no tensors
    cin = cout
  return e


def import_taming_discriminator(state_dict: Mapping[str, Any], cfg: DiscriminatorConfig,
                                strip_prefix: str = '') -> Dict[str, Any]:
  """taming ``NLayerDiscriminator`` state_dict (torch tensors or numpy) -> our variables ``{'params': ...,
  'batch_stats': ...}`` (numpy float32; ``batch_stats`` only for ``norm='batch'``).

  ``strip_prefix`` selects the discriminator inside a bigger state_dict, e.g. ``'loss.discriminator.'`` of a taming
  VQGAN checkpoint (keys without the prefix are then ignored). ``num_batches_tracked`` may be absent and is ignored
  (it only matters to torch with ``momentum=None``). A missing, unexpected or mis-shaped key raises
  ``CheckpointMismatchError`` listing every problem.
  """
  if strip_prefix:
    state_dict = {k[len(strip_prefix):]: v for k, v in state_dict.items() if k.startswith(strip_prefix)}
  return import_state_dict(state_dict, discriminator_table(cfg), f'taming discriminator ({cfg})', skip=(_COUNTER,))


def export_discriminator(cfg: DiscriminatorConfig, params, stats, prefix: str = '') -> Dict[str, np.ndarray]:
  """Our discriminator variables -> the taming ``NLayerDiscriminator.state_dict()`` layout (``main.{i}.*``, OIHW),
  the inverse of ``import_taming_discriminator`` (``num_batches_tracked`` is not written)."""
  sd = export_state_dict({'params': params, 'batch_stats': stats or {}}, discriminator_table(cfg),
                         f'discriminator ({cfg})', omit=(_COUNTER,))
  return {prefix + k: a for k, a in sd.items()}


def import_discriminator_partial(sd: Mapping[str, Any], cfg: DiscriminatorConfig, params, stats
                                 ) -> Tuple[Any, Any, List[str], List[str]]:
  """Copy the tensors of a taming-layout discriminator state_dict (``main.{i}.*``) whose key and shape fit
  ``cfg`` into ``params``/``stats`` (host pytrees). -> (params, stats, imported keys, skipped 'key (why)')."""
  flat = {'params': traverse_util.flatten_dict(jax.device_get(params)),
          'batch_stats': traverse_util.flatten_dict(jax.device_get(stats['batch_stats'])
                                                    if stats and 'batch_stats' in stats else {})}
  table = [e for e in discriminator_table(cfg) if e.collection != _COUNTER]
  imported, skipped = [], []
  for e in table:
    if e.key not in sd:
      skipped.append(f'{e.key} (missing from the file; model shape {e.shape})')
      continue
    have = tuple(np.shape(sd[e.key]))
    if have != e.shape:
      skipped.append(f'{e.key} (file {have}, model {e.shape})')
      continue
    flat[e.collection][e.path] = np.ascontiguousarray(e.from_torch(np.asarray(sd[e.key], np.float32)))
    imported.append(e.key)
  known = {e.key for e in discriminator_table(cfg)}
  skipped += [f'{k} (not in this discriminator: {cfg})' for k in sd if k not in known]
  new_stats = dict(stats or {})
  if flat['batch_stats']:
    new_stats['batch_stats'] = traverse_util.unflatten_dict(flat['batch_stats'])
  return traverse_util.unflatten_dict(flat['params']), new_stats, imported, skipped


# ----------------------------------------------------------------------------- LPIPS
def lpips_from_perceptual(sd: Mapping[str, Any], prefix: str = 'perceptual.'):
  """LPIPS params from the reference ``bae/lpips.py`` ``LPIPS`` state_dict inside a BinaryGAN file:
  ``net.slice{s}.{i}.weight/bias`` (i = torchvision's ``features`` index) and ``lin{k}.model.1.weight``; the
  ``scaling_layer`` buffers must hold the standard constants."""
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
