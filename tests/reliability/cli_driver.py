"""Runs many command lines of var_jax CLIs in one process (one JAX start for all): ``python cli_driver.py
cases.json`` with a JSON list of [module, arg, ...] lists; prints a JSON list, per case {"code": exit status,
"stderr": what went to stderr, the exit message included, "traceback": bool}. Each case re-runs the module as
``__main__`` (its flags are defined afresh)."""
import contextlib
import io
import json
import runpy
import sys
import traceback

from absl import app, flags  # noqa: F401 - app's own flags are defined once, before the cases


def run_case(module: str, args):
  before = set(flags.FLAGS)
  err = io.StringIO()
  code, tb = 0, False
  sys.argv = [module] + list(args)
  try:
    with contextlib.redirect_stderr(err):
      runpy.run_module(module, run_name='__main__', alter_sys=False)
  except SystemExit as e:
    if isinstance(e.code, str):
      err.write(e.code + '\n')
      code = 1
    else:
      code = int(e.code or 0)
  except BaseException:  # noqa: BLE001 - an uncaught exception is what the tests look for
    err.write(traceback.format_exc())
    code, tb = 2, True
  finally:
    for name in set(flags.FLAGS) - before:          # the CLI's flags (those of libraries it imported stay)
      # (and ml_collections' --config.<key> override flags, made while the command line is parsed)
      if flags.FLAGS.find_module_defining_flag(name) in ('__main__', module, sys.argv[0], 'var_jax.cli') or \
          name.startswith('config.'):
        delattr(flags.FLAGS, name)
  text = err.getvalue()
  return {'code': code, 'stderr': text, 'traceback': tb or 'Traceback (most recent call last)' in text}


def main():
  cases = json.load(open(sys.argv[1]))
  out = [run_case(case[0], case[1:]) for case in cases]
  sys.stdout.write('\n' + json.dumps(out) + '\n')


if __name__ == '__main__':
  main()
