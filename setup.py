"""var_jax: VAR (next-scale prediction) in JAX/Flax — install with ``pip install -e ".[torch,test]"``."""
from setuptools import find_packages, setup

setup(
    name='var_jax',
    version='0.1.0',
    description='Visual AutoRegressive modeling (VAR, next-scale prediction) in JAX/Flax: parity with the '
                'reference PyTorch release, sharded training, sampling, tokenizer training and evaluation.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['var_jax', 'var_jax.*']),
    python_requires='>=3.10',
    # Lower bounds are the versions this project is tested with.
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'grain>=0.2.18',
        'tensorflow-datasets>=4.9.10',
        'ml-collections>=1.1.0',
        'chex>=0.1.92',
        'absl-py>=2.5.1',
        'numpy>=2.0',
        'pillow>=11.0',
        'safetensors>=0.8.0',
        'tensorboardX>=2.6',
        'scikit-learn>=1.5',   # ships the digits data set of the quickstart (no download)
        'huggingface_hub>=0.24',   # released weights by name (var_jax.hub)
        'tqdm>=4.66',   # progress bars (var_jax.progress)
    ],
    extras_require={
        # Reading/writing reference .pth checkpoints. Install the CPU wheel first (pip install torch==2.13.0)
        # if you do not want pip to pull a CUDA build.
        'torch': ['torch>=2.4'],
        'gcs': ['gcsfs>=2026.9'],   # gs:// paths everywhere (epath's gs:// backend without TensorFlow)
        # TPU runs, and AOT compilation for TPU slices on any host (python -m var_jax.aot): libtpu from PyPI. On a
        # CPU/GPU machine install it into a separate environment: it slows every JAX start there.
        'tpu': ['jax[tpu]>=0.10.2'],
        'eval': ['matplotlib>=3.8'],   # scaling-law plots (python -m var_jax.scaling)
        # gcsfs + a local GCS emulator: tests/remote_fs_test.py runs training/sampling/evaluation on gs://
        'test': ['pytest>=8.0', 'nbclient>=0.10', 'nbformat>=5.10', 'ipykernel>=6.29', 'matplotlib>=3.8',
                 'gcsfs>=2026.9', 'gcp-storage-emulator>=2026.7'],
    },
)
