"""Input pipeline: random-access image sources, the reference VAR augmentation, grain train/eval datasets."""
from var_jax.data.pipeline import (default_data_config, epoch_steps, eval_steps, make_eval_dataset, make_source,
                                   make_train_dataset)
from var_jax.data.sources import DigitsSource, ImageFolderSource, TfdsSource
from var_jax.data.transforms import (CorruptImageError, EvalTransform, SkipMonitor, TooManyCorruptImagesError,
                                     TrainTransform, decode_image)

__all__ = ['default_data_config', 'epoch_steps', 'eval_steps', 'make_eval_dataset', 'make_source',
           'make_train_dataset', 'DigitsSource', 'ImageFolderSource', 'TfdsSource', 'CorruptImageError',
           'EvalTransform', 'SkipMonitor', 'TooManyCorruptImagesError', 'TrainTransform', 'decode_image']
