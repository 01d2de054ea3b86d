"""Helpers shared by tests (plain module: tests/ is on sys.path through conftest's rootdir)."""
import importlib.util
import os
import pathlib
import socket

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(f'cfg_{name}', REPO / 'configs' / f'{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def quickstart_config(**overrides):
  """The quickstart config shrunk for tests: depth 2, width 64, batch 16."""
  c = load_config('quickstart')
  c.model.update(depth=2, embed_dim=64, num_heads=1)
  c.global_batch_size = 16
  for k, v in overrides.items():
    c[k] = v
  return c


def free_port() -> int:
  """A free TCP port on the loopback interface (for a local jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(devices: int, **extra):
  """The environment of one CPU process with ``devices`` fake devices, without inherited multi-host variables,
  plus ``extra`` (e.g. JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(k, None)
  env.update(extra)
  return env


def fixture_pipelines():
  """One pipeline per family from the reference fixtures' random weights: VAR's tiny model, ELM AR 1x8, BiGR k8
  (both on the k8 binary autoencoder)."""
  import json
  from conftest import SHARED, fixture_dir
  from var_jax import VARPipeline
  from var_jax.pipelines.pretrained import load_pipeline
  bits = SHARED / 'fixtures' / 'elm_bigr_reference'
  d = fixture_dir('tiny')
  out = {'var': VARPipeline.from_torch(d / 'vae.pth', d / 'var.pth')}
  for family, name, ckpt in (('elm', 'elm_ar_1x8', 'model.pth'), ('bigr', 'bigr_k8', 'bigr.pt')):
    margs = json.loads((bits / name / 'config.json').read_text())['model_args']
    out[family] = load_pipeline(bae_ckpt=str(bits / 'bae_k8' / 'binaryae.th'), model_ckpt=str(bits / name / ckpt),
                                model_args=margs)
  return out
