#!/usr/bin/env bash
#SBATCH --job-name=var_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=TERM@300
#SBATCH --output=var_jax_%j.log
# Multi-node GPU training of var_jax: one process per node, driving all of that node's GPUs (see launch/README.md).
# --signal=TERM@300: SIGTERM 5 min before the time limit, so the trainer checkpoints; resubmitting resumes.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage, from the repo root (installed on every node: pip install -U "jax[cuda12]" && pip install -e .):

  Slurm:   sbatch [--nodes=N] [--time=...] launch/gpu_multinode.sh TRAIN_ARGS...
  Manual:  on every node i = 0..N-1 at the same time:
           JAX_COORDINATOR_ADDRESS=node0:12345 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i \
               launch/gpu_multinode.sh TRAIN_ARGS...

TRAIN_ARGS go to `python -m var_jax.train`, e.g.
  --config=configs/var_d16.py --workdir=/shared/runs/var_d16 \
  --config.data.path=/shared/imagenet --config.vae_ckpt=/shared/ckpt/vae_ch160v4096z32.pth
The workdir must be one directory that every node sees (shared filesystem or gs://).

Environment (optional): PYTHON (default python), JAX_PORT (Slurm coordinator port, default derived from the
job id), JAX_LOCAL_DEVICE_IDS (GPUs each process drives, default all of the node's: 0,1,...,7).

What jax 0.10's jax.distributed.initialize() reads by itself: JAX_COORDINATOR_ADDRESS, JAX_LOCAL_DEVICE_IDS,
JAX_COORDINATOR_BIND_ADDRESS, and (for auto-detected clusters only) JAX_COORDINATOR_PORT. It takes the process
count and id only from a detected cluster (Slurm task variables inside srun, Cloud TPU metadata, Open MPI 4,
Kubernetes) -- NOT from JAX_NUM_PROCESSES / JAX_PROCESS_ID, which this script passes in itself in manual mode.
EOF
}

die() { echo "gpu_multinode.sh: $*" >&2; echo >&2; usage >&2; exit 2; }

if (($# == 0)); then die "no training arguments"; fi
if [[ $1 == -h || $1 == --help ]]; then usage; exit 0; fi
[[ -f configs/common.py && -d var_jax ]] || die "run (or sbatch) this from the var_jax repo root, not $(pwd)"
PYTHON=${PYTHON:-python}

if [[ -n ${JAX_NUM_PROCESSES:-}${JAX_PROCESS_ID:-} ]]; then
  # Manual mode. jax ignores JAX_NUM_PROCESSES / JAX_PROCESS_ID, so initialise here with them, then run the
  # trainer's main with --nodistributed (last, so it wins) so that it does not initialise a second time.
  : "${JAX_COORDINATOR_ADDRESS:?manual mode needs JAX_COORDINATOR_ADDRESS=host:port of process 0}"
  : "${JAX_NUM_PROCESSES:?manual mode needs JAX_NUM_PROCESSES}" "${JAX_PROCESS_ID:?manual mode needs JAX_PROCESS_ID}"
  exec "$PYTHON" -c '
import os, jax
jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                           int(os.environ["JAX_PROCESS_ID"]))
from absl import app
from var_jax.train.__main__ import main
app.run(main)' "$@" --nodistributed
fi

[[ -n ${SLURM_JOB_NODELIST:-} ]] || die "not in a Slurm job and JAX_NUM_PROCESSES / JAX_PROCESS_ID are not set"
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export JAX_COORDINATOR_ADDRESS="$head_node:${JAX_PORT:-$((61440 + SLURM_JOB_ID % 4096))}"
# Slurm auto-detection would give each process only GPU SLURM_LOCALID (one process per GPU); we run one per node.
if [[ -z ${JAX_LOCAL_DEVICE_IDS:-} ]]; then
  n_gpus=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
  JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((n_gpus - 1)))
  export JAX_LOCAL_DEVICE_IDS
fi
echo "var_jax: ${SLURM_JOB_NUM_NODES:-?} nodes, coordinator $JAX_COORDINATOR_ADDRESS, GPUs $JAX_LOCAL_DEVICE_IDS per node"
# srun exports this environment (JAX_*) to one task per node; SLURM_NTASKS/SLURM_PROCID give count and rank.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$PYTHON" -m var_jax.train --distributed "$@"
