"""Whether a command's real work has begun: the training loop's first step (a sampler's first batch may mark it
too). ``var_jax.cli.run``'s error boundary reads it: before, every error is one ``error:`` line (a set-up problem the
message names); after, an unexpected exception keeps its traceback (a bug to report). Libraries call ``started()``;
only the CLI boundary reads and resets it."""

_started = False


def started():
  global _started
  _started = True


def has_started() -> bool:
  return _started


def reset():
  global _started
  _started = False
