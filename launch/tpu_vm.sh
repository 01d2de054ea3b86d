#!/usr/bin/env bash
# Set up and launch var_jax training on every worker of a Cloud TPU VM slice (see launch/README.md).
#
# Queued resources: a slice made with
#   gcloud compute tpus queued-resources create QR --node-id=TPU_NAME --zone=ZONE \
#       --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 [--spot]
# is used the same way (pass its --node-id as TPU_NAME) once `gcloud compute tpus queued-resources describe QR`
# says ACTIVE. A spot/preempted slice comes back as a new, empty VM: run the whole script again (setup + run);
# training resumes from the checkpoints in --workdir.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh TPU_NAME ZONE [PROJECT] [--setup-only|--run-only|--stop] -- TRAIN_ARGS...

  (default)     copy (or clone) the repo to every worker, install it, then start training on all workers
  --setup-only  copy/clone + install only
  --run-only    start training only (setup already done)
  --stop        SIGTERM the training process on every worker (it checkpoints, then exits)

TRAIN_ARGS are passed, quoted as given, to `python -m var_jax.train --distributed` on every worker, e.g.
  launch/tpu_vm.sh my-tpu us-central2-b -- --config=configs/var_d16.py --workdir=gs://BUCKET/var_d16 \
      --config.data.path=/mnt/disks/imagenet --config.vae_ckpt=/mnt/disks/imagenet/vae_ch160v4096z32.pth

Environment (all optional):
  REPO_URL        git clone this URL on the workers instead of copying this checkout (REPO_REF: what to
                  check out, default the remote's HEAD)
  REMOTE_DIR      repo directory on the workers, relative to $HOME (default var_jax)
  VENV            virtualenv on the workers, relative to $HOME (default var_jax_venv)
  PYTHON_VERSION  Python of the venv, installed by uv if missing (default 3.12; jax >= 0.10 needs >= 3.11)
  WITH_TORCH      1 (default): also install CPU torch, needed to read .pth weights; 0 if you use .safetensors
Each worker logs to ~/var_jax_train.log (appended across runs) and keeps the pid in ~/var_jax_train.pid.
EOF
}

die() { echo "tpu_vm.sh: $*" >&2; echo >&2; usage >&2; exit 2; }

mode=all
pos=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --setup-only) mode=setup ;;
    --run-only) mode=run ;;
    --stop) mode=stop ;;
    --) shift; break ;;
    -*) die "unknown option $1 (train arguments go after --)" ;;
    *) pos+=("$1") ;;
  esac
  shift
done
train_args=(${1+"$@"})
((${#pos[@]} == 2 || ${#pos[@]} == 3)) || die "expected TPU_NAME ZONE [PROJECT]"
if [[ $mode == all || $mode == run ]] && ((${#train_args[@]} == 0)); then
  die "no training arguments after --"
fi
TPU_NAME=${pos[0]}
gcloud_flags=(--zone "${pos[1]}")
if ((${#pos[@]} == 3)); then gcloud_flags+=(--project "${pos[2]}"); fi

REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-HEAD}
REMOTE_DIR=${REMOTE_DIR:-var_jax}
VENV=${VENV:-var_jax_venv}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
WITH_TORCH=${WITH_TORCH:-1}

on_all_workers() {   # run a bash script (one string) on every worker at once; the workers' login shell is bash
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_flags[@]}" --worker=all --command="$1"
}

# Local values reach the remote scripts only through this header, each one quoted with printf %q.
qargs=""
for a in ${train_args[@]+"${train_args[@]}"}; do qargs+=" $(printf %q "$a")"; done
header="set -euo pipefail
D=\$HOME/$(printf %q "$REMOTE_DIR") V=\$HOME/$(printf %q "$VENV")
LOG=\$HOME/var_jax_train.log PIDF=\$HOME/var_jax_train.pid
REPO_URL=$(printf %q "$REPO_URL") REPO_REF=$(printf %q "$REPO_REF")
PYV=$(printf %q "$PYTHON_VERSION") WITH_TORCH=$(printf %q "$WITH_TORCH")
set --$qargs"

read -r -d '' SETUP <<'EOF' || true
cd "$HOME"
if [ -n "$REPO_URL" ]; then
  [ -d "$D/.git" ] || git clone -q "$REPO_URL" "$D"
  git -C "$D" fetch -q origin "$REPO_REF" && git -C "$D" checkout -q --detach FETCH_HEAD
else
  mkdir -p "$D" && tar -xzf var_jax_src.tgz -C "$D" && rm -f var_jax_src.tgz
fi
export PATH="$HOME/.local/bin:$PATH"
command -v uv >/dev/null || python3 -m pip install -q --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh
[ -x "$V/bin/python" ] || uv venv -q --seed --python "$PYV" "$V"
"$V/bin/pip" install -q -U "jax[tpu]"
if [ "$WITH_TORCH" = 1 ]; then "$V/bin/pip" install -q torch --index-url https://download.pytorch.org/whl/cpu; fi
# gcsfs: gs:// workdirs (etils/orbax); tensorboardX: TensorBoard event files. Neither is in setup.py.
cd "$D" && "$V/bin/pip" install -q -e . gcsfs tensorboardX
echo "$(hostname): var_jax installed in $D, jax $("$V/bin/python" -c 'import jax; print(jax.__version__)')"
EOF

read -r -d '' RUN <<'EOF' || true
cd "$D"
if [ -f "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null; then
  echo "$(hostname): training already running (pid $(cat "$PIDF")); stop it first with --stop" >&2; exit 1
fi
echo "=== $(date -u +%FT%TZ) $(hostname): python -m var_jax.train --distributed $*" >> "$LOG"
nohup "$V/bin/python" -m var_jax.train --distributed "$@" >> "$LOG" 2>&1 < /dev/null &
echo $! > "$PIDF"
echo "$(hostname): started pid $!, log $LOG"
EOF

read -r -d '' STOP <<'EOF' || true
if [ -f "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null; then
  kill -TERM "$(cat "$PIDF")" && echo "$(hostname): SIGTERM sent to pid $(cat "$PIDF")"
else
  echo "$(hostname): not running"
fi
EOF

if [[ $mode == all || $mode == setup ]]; then
  if [[ -z $REPO_URL ]]; then   # ship this checkout (untracked files included, .git and build outputs not)
    repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    tgz=$(mktemp -d)/var_jax_src.tgz
    trap 'rm -rf "$(dirname "$tgz")"' EXIT
    COPYFILE_DISABLE=1 tar -C "$repo_root" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ \
        --exclude=.pytest_cache --exclude='./workdir*' -czf "$tgz" .
    gcloud compute tpus tpu-vm scp "$tgz" "$TPU_NAME":var_jax_src.tgz "${gcloud_flags[@]}" --worker=all
  fi
  on_all_workers "$header
$SETUP"
fi
if [[ $mode == all || $mode == run ]]; then
  on_all_workers "$header
$RUN"
  echo "training started; follow it with:"
  echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME ${gcloud_flags[*]} --worker=0 --command='tail -f ~/var_jax_train.log'"
fi
if [[ $mode == stop ]]; then
  on_all_workers "$header
$STOP"
fi
