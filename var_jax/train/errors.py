"""Errors of a training run that the CLI reports as ``error: <message>`` (exit status 1) instead of a traceback."""


class TrainingError(Exception):
  """A run that cannot start or continue for a reason the message states."""


class NonFiniteError(TrainingError):
  """A non-finite loss / gradient norm (``config.nonfinite='stop'``) or train state."""


class DataMismatchError(TrainingError):
  """Data that does not fit the model (more classes than it has, an out-of-range label)."""


class WorkdirLockedError(TrainingError):
  """The workdir is held by another run."""


class ResumeError(TrainingError, ValueError):
  """A checkpoint that this config cannot resume (another model / task / data layout, or none intact)."""


class ConfigError(TrainingError, ValueError):
  """A config value the run refuses (the message names it and what is allowed)."""


class WorkdirError(TrainingError):
  """A workdir (or its checkpoints directory) that cannot be written, or a checkpoint save that failed."""
