#!/usr/bin/env bash
# Scaling-law demo on a CPU: train VAR depths 2..6 (configs/scaling_sweep.py) one after another on the built-in
# digits over a trained tokenizer, then fit and plot test loss / error rate against parameters and compute
# (python -m var_jax.scaling).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage, from the repo root:  launch/scaling_sweep.sh [EXTRA_TRAIN_ARGS...]

  OUT=/tmp/var_scaling   where runs go: $OUT/d2 ... $OUT/d6, then $OUT/scaling.png and $OUT/fits.json
  DEPTHS="2 3 4 5 6"     depths to train
  VAE_CKPT=...           the tokenizer (default: the main job's, /tmp/digits/tokenizer/vqvae.safetensors, when it
                         exists; else one is trained first into $OUT/tokenizer with configs/vqvae_quickstart.py);
                         VAE_CKPT=random: the random-init tokenizer (the machinery only: no quotable exponents)
  PYTHON=python          the interpreter

EXTRA_TRAIN_ARGS go to every `python -m var_jax.train` of the sweep, e.g. --config.epochs=4. A finished run is not
retrained (the trainer resumes from its workdir and stops at once); delete $OUT to start over.
USAGE
}
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

OUT="${OUT:-/tmp/var_scaling}"
DEPTHS="${DEPTHS:-2 3 4 5 6}"
PYTHON="${PYTHON:-python}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"

start=$(date +%s)
if [ -z "${VAE_CKPT:-}" ]; then
  if [ -f /tmp/digits/tokenizer/vqvae.safetensors ]; then
    VAE_CKPT=/tmp/digits/tokenizer/vqvae.safetensors
  else
    echo "=== tokenizer -> $OUT/tokenizer"
    "$PYTHON" -m var_jax.train --config=configs/vqvae_quickstart.py --workdir="$OUT/tokenizer"
    VAE_CKPT="$OUT/tokenizer/vqvae.safetensors"
  fi
fi
[ "$VAE_CKPT" = random ] && VAE_CKPT=""
echo "=== tokenizer: ${VAE_CKPT:-random init}"
for d in $DEPTHS; do
  t0=$(date +%s)
  echo "=== depth $d -> $OUT/d$d"
  "$PYTHON" -m var_jax.train --config="configs/scaling_sweep.py:$d" --workdir="$OUT/d$d" \
      --config.vae_ckpt="$VAE_CKPT" "$@"
  echo "=== depth $d: $(( $(date +%s) - t0 )) s"
done
echo "=== sweep: $(( $(date +%s) - start )) s"

"$PYTHON" -m var_jax.scaling --runs="$OUT/d*" --out="$OUT/scaling.png" --json="$OUT/fits.json"
