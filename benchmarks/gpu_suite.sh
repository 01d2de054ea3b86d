#!/usr/bin/env bash
# One-shot GPU benchmark of var_jax beside the reference PyTorch VAR (same random weights), <= 8 minutes in all.
#
# Prints: sampling images/s for VAR d16 and d30 at batch 64 with CFG (bfloat16), the latency of one d16 image, the
# d16 training step images/s and MFU, and peak memory (JAX: memory_stats peak_bytes_in_use; torch:
# max_memory_allocated), for var_jax and the reference; then one summary table. It runs the existing
# benchmarks/sample_speed.py and train_speed.py with flags, one stage per process, each under `timeout`, and a
# total-time guard (a stage that fails or times out prints a message and the suite goes on).
#
# Network: none. If $WHEELS (default benchmarks/wheels) holds *.whl, they are installed with
# `pip install --no-index --find-links`; otherwise jax[cuda12] and torch must already be installed.
# The reference: $REFERENCE_PATH, a checkout of FoundationVision/VAR (default: shared/VAR if present); without one
# only var_jax is timed.
#
# Usage:
#   bash benchmarks/gpu_suite.sh                    # on the GPU machine
#   REFERENCE_PATH=~/src/VAR bash benchmarks/gpu_suite.sh
#   bash benchmarks/gpu_suite.sh --dry_run          # the same stages, tiny model (d2, 64px, batch 2) on CPU, < 2 min
#   TOTAL_S=480 OUT=/tmp/gpu_suite bash benchmarks/gpu_suite.sh
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
TOTAL_S=${TOTAL_S:-480}
OUT=${OUT:-$(mktemp -d /tmp/gpu_suite.XXXXXX)}
mkdir -p "$OUT"
PY=${PYTHON:-python}
DRY=0
[ "${1:-}" = "--dry_run" ] && DRY=1

WHEELS=${WHEELS:-benchmarks/wheels}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "== installing the carried wheels from $WHEELS (no index)"
  timeout 120 $PY -m pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl || echo "!! wheel install failed; going on with what is installed"
else
  echo "== no wheels in $WHEELS: assuming jax[cuda12] and torch are installed"
fi

REF=${REFERENCE_PATH:-}
[ -z "$REF" ] && [ -f shared/VAR/models/var.py ] && REF=shared/VAR
REF_FLAG=()
if [ -n "$REF" ]; then REF_FLAG=(--reference_path "$REF"); else echo "== no REFERENCE_PATH: timing var_jax only"; fi

if [ $DRY = 1 ]; then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  MODEL=(--small); B=2; NB=1; NSTEPS=2; D30=(--small --depth 3)
else
  MODEL=(); B=64; NB=3; NSTEPS=10; D30=(--depth 30)
fi
$PY -c "import jax; print('== jax', jax.__version__, jax.devices())" 2>&1 | tail -1
$PY -c "import torch; print('== torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tail -1

# stage NAME LIMIT_S SCRIPT ARGS...: run under min(LIMIT_S, time left), JSON to $OUT/NAME.json
stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( TOTAL_S - ($(date +%s) - START) ))
  if [ $left -lt 20 ]; then echo "!! $name: skipped (total-time guard: ${left}s left of ${TOTAL_S}s)"; return; fi
  [ $limit -gt $left ] && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout -k 5 "$limit" $PY "$@" --json_out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -E "^(ours|reference|ratio|sampling|training|config|mesh)" "$OUT/$name.log" | sed 's/^/   /'
  if [ $rc = 124 ] || [ $rc = 137 ]; then echo "!! $name: timed out after ${limit}s (log: $OUT/$name.log)";
  elif [ $rc != 0 ]; then echo "!! $name: failed (exit $rc), last lines:"; tail -3 "$OUT/$name.log" | sed 's/^/   /'; fi
  echo "   ($(( $(date +%s) - t0 ))s)"
}

stage sample_d16 110 benchmarks/sample_speed.py "${MODEL[@]}" --dtype bfloat16 --batch_size $B --num_batches $NB "${REF_FLAG[@]}"
stage sample_d30 150 benchmarks/sample_speed.py "${D30[@]}" --dtype bfloat16 --batch_size $B --num_batches $NB "${REF_FLAG[@]}"
stage latency_d16 60 benchmarks/sample_speed.py "${MODEL[@]}" --dtype bfloat16 --batch_size 1 --num_batches 5 "${REF_FLAG[@]}"
stage train_d16 130 benchmarks/train_speed.py "${MODEL[@]}" --dtype bfloat16 --batch_size $B --num_steps $NSTEPS "${REF_FLAG[@]}"

echo "== summary (JSON and logs in $OUT; total $(( $(date +%s) - START ))s)"
$PY - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
rows = [('sample_d16', 'sampling d16, batch 64, CFG, bf16', 'images_per_s', 'images/s'),
        ('sample_d30', 'sampling d30, batch 64, CFG, bf16', 'images_per_s', 'images/s'),
        ('latency_d16', 'latency of one d16 image', 'latency_mean_s', 's'),
        ('train_d16', 'training d16, bf16', 'images_per_s', 'images/s'),
        ('train_d16', 'training d16 MFU', 'mfu', '%')]
def get(d, key):
  if not d or d.get(key) is None:
    return 'n/a'
  v = d[key]
  return f'{100 * v:.1f}' if key == 'mfu' else f'{v:.4g}'
print(f'{"measure":38s} {"var_jax":>10s} {"reference":>10s} {"unit":8s} {"peak GiB (ours/ref)":>20s}')
for name, what, key, unit in rows:
  p = os.path.join(out, name + '.json')
  r = json.load(open(p)) if os.path.exists(p) else {}
  o, ref = r.get('ours'), r.get('reference')
  if key == 'latency_mean_s':
    key = next((k for k in (o or {}) if k.startswith('latency') and 'mean' in k), key)
  mem = '/'.join('n/a' if not d or d.get('peak_memory_gib') is None else f'{d["peak_memory_gib"]:.2f}'
                 for d in (o, ref))
  print(f'{what:38s} {get(o, key):>10s} {get(ref, key):>10s} {unit:8s} {mem:>20s}' + ('' if r else '   (stage failed)'))
EOF
