"""Helpers shared by tests (plain module: tests/ is on sys.path through conftest's rootdir)."""
import importlib.util
import pathlib

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
