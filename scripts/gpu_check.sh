#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md ("GPU"), in two phases, each small enough for one call of the device tool
# (64 MiB carried per call: the extra packages + a data subset, then the ImageNet weights):
#   bash scripts/gpu_check.sh speed    # python scripts/benchmark.py speed --device cuda (bf16 + channels-last)
#   bash scripts/gpu_check.sh recipe   # experiment=kermany_gpu trained on CUDA in bf16-mixed, then
#                                      # scripts/agreement.py on its run (logged vs evaluate, predict, served)
# Environment: DATA (a Kermany folder, default .gpudata), WEIGHTS (folder of efficientnet_lite*_imagenet.pth, default
# .wts), OUT (logs and the MLflow database land there, default ./gpu_out), SITE (a tarball of the packages the GPU
# image lacks, unpacked once into .dsite), DRY=1 (a rehearsal on the CPU: tiny epochs and sizes, no CUDA).
set -uo pipefail
phase=${1:?usage: gpu_check.sh speed|recipe}
cd "$(dirname "$0")/.."
DATA=${DATA:-.gpudata}
WEIGHTS=${WEIGHTS:-.wts}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
if [ -n "${SITE:-}" ] && [ ! -d .dsite/gsite ]; then mkdir -p .dsite && tar -C .dsite -xJf "$SITE" || exit 3; fi
[ -d .dsite/gsite ] && export PYTHONPATH="$PWD/.dsite/gsite:${PYTHONPATH:-}"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db"
PY=${PY:-python3}
if [ "${DRY:-0}" = 1 ]; then
  dev=cpu
  speed_args=(--device cpu --epochs 1 --rounds 1 --image-size 32 --max-train 40 --max-test 20)
  recipe_args=(trainer=cpu trainer.precision=32-true trainer.max_epochs=1 data.num_workers=0 data.image_size=48
    "model.branch_sizes={efficientnet_lite0:32,efficientnet_lite1:40}" fusion.auto_cv.folds=2 fusion.auto_cv.saturated_at=0.51)
else
  dev=cuda
  speed_args=(--device cuda)
  recipe_args=()
fi
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

case $phase in
speed)
  start=$(date +%s)
  $PY scripts/benchmark.py speed --data-root "$DATA" "${speed_args[@]}" 2>&1 | tee "$OUT/speed.txt"
  echo "speed phase: $(( $(date +%s) - start )) s"
  ;;
recipe)
  start=$(date +%s)
  $PY -m xrayfusion.train experiment=kermany_gpu data.root="$DATA" model.weights_dir="$WEIGHTS" \
    hydra.run.dir="$OUT/train" "${recipe_args[@]}" 2>&1 | tee "$OUT/train.txt"
  echo "train: $(( $(date +%s) - start )) s"
  run_id=$(grep -o "MLflow run [0-9a-f]\{32\}" "$OUT/train.txt" | tail -1 | cut -d' ' -f3)
  [ -n "$run_id" ] || { echo "no run id in the training log"; exit 1; }
  # the run's logged test pass against evaluate's, predict's and the served model's probabilities on this device
  $PY scripts/agreement.py "$run_id" --data-root "$DATA" --device $dev 2>&1 | tee "$OUT/agreement.txt"
  echo "recipe phase: $(( $(date +%s) - start )) s"
  ;;
*) echo "unknown phase $phase: speed or recipe"; exit 2 ;;
esac
