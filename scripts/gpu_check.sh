#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md ("GPU"), in two phases, each small enough for one call of the device tool
# (64 MiB carried per call: the extra packages + a data subset, then the ImageNet weights). First, on this machine:
#   bash scripts/gpu_check.sh prepare  # .gsite/site.tar.xz, .gpudata, .wts0 (lite0), .wts12 (lite1, lite2); prints
#                                      # the two device calls (carry lists and commands)
# then on the device machine, one call right after the other (the second finds the first's unpacked files):
#   bash scripts/gpu_check.sh speed    # python scripts/benchmark.py speed --device cuda (bf16 + channels-last)
#   bash scripts/gpu_check.sh recipe   # experiment=kermany_gpu trained on CUDA in bf16-mixed, then
#                                      # scripts/agreement.py on its run (logged vs evaluate, predict, served)
# Environment: DATA (a Kermany folder, default .gpudata), WEIGHTS (folder of efficientnet_lite*_imagenet.pth, default
# .wts), OUT (logs and the MLflow database land there, default ./gpu_out), RUNS (the runs' artifacts and checkpoints,
# default ./mlruns as for any training here), SITE (a tarball of the packages the GPU
# image lacks, unpacked once into .dsite), DRY=1 (a rehearsal on the CPU: tiny epochs and sizes, no CUDA).
set -uo pipefail
phase=${1:?usage: gpu_check.sh prepare|speed|recipe}
cd "$(dirname "$0")/.."
DATA=${DATA:-.gpudata}
WEIGHTS=${WEIGHTS:-.wts}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
RUNS=${RUNS:-$PWD/mlruns}
if [ -n "${SITE:-}" ] && [ ! -d .dsite/gsite ]; then mkdir -p .dsite && tar -C .dsite -xJf "$SITE" || exit 3; fi
[ -d .dsite/gsite ] && export PYTHONPATH="$PWD/.dsite/gsite:${PYTHONPATH:-}"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db"
PY=${PY:-python3}
if [ "$phase" = prepare ]; then
  # the GPU image's Python is 3.12: wheels for it, the project's own needs that ../shared/gpu/prepare.sh does not
  # gather (kornia, optuna), installed into one folder, the MLflow UI's JavaScript left out, packed with xz
  bash ../shared/gpu/prepare.sh || exit 1
  plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  python3 -m pip download -q --no-deps $plat -d .whl "kornia>=0.9,<0.10" kornia_rs "optuna>=4,<5" colorlog || exit 1
  rm -rf /tmp/gsite && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gsite $plat .whl/*.whl \
    || exit 1
  rm -rf /tmp/gsite/mlflow/server/js /tmp/gsite/bin
  mkdir -p .gsite .wts0 .wts12 && tar -C /tmp -cJf .gsite/site.tar.xz gsite || exit 1
  w=${WEIGHTS_SRC:-../shared/weights}
  cp "$w"/efficientnet_lite0_imagenet.pth .wts0/ && cp "$w"/efficientnet_lite{1,2}_imagenet.pth .wts12/ || exit 1
  for d in /.gsite/ /.wts0/ /.wts12/ /.wts/ /.dsite/ /gpu_out/; do
    grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude
  done
  du -sh .gsite .gpudata .wts0 .wts12
  echo 'device call 1: carry [".gsite", ".gpudata", ".wts0"], timeout_s 240:'
  echo '  SITE=.gsite/site.tar.xz OUT=$OUT bash scripts/gpu_check.sh speed'
  echo 'device call 2, within the 30 s the machine stays warm: carry [".wts12"], timeout_s 480:'
  echo '  mkdir -p .wts && cp .wts0/*.pth .wts12/*.pth .wts/ && OUT=$OUT bash scripts/gpu_check.sh recipe'
  exit 0
fi
if [ "${DRY:-0}" = 1 ]; then
  dev=cpu
  speed_args=(--device cpu --epochs 1 --rounds 1 --image-size 32 --max-train 40 --max-test 20)
  recipe_args=(trainer=cpu trainer.precision=32-true trainer.max_epochs=1 data.num_workers=0 data.image_size=48
    "model.branch_sizes={efficientnet_lite0:32,efficientnet_lite1:40}" fusion.cv=2 data.cache_dir=null)
else
  dev=cuda
  speed_args=(--device cuda)
  recipe_args=()
fi
$PY -c "import hydra, kornia, mlflow" 2>/dev/null || {
  echo "gpu_check: hydra, kornia or mlflow is missing: pass SITE=.gsite/site.tar.xz (made by the prepare phase), or run" \
    "the speed phase first on this machine (it unpacks them into .dsite)"; exit 2; }
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

case $phase in
speed)
  start=$(date +%s)
  $PY scripts/benchmark.py speed --data-root "$DATA" "${speed_args[@]}" 2>&1 | tee "$OUT/speed.txt" || exit 1
  echo "speed phase: $(( $(date +%s) - start )) s"
  ;;
recipe)
  start=$(date +%s)
  $PY -m xrayfusion.train experiment=kermany_gpu data.root="$DATA" model.weights_dir="$WEIGHTS" \
    hydra.run.dir="$OUT/train" paths.mlruns_dir="$RUNS" "${recipe_args[@]}" 2>&1 | tee "$OUT/train.txt" || exit 1
  echo "train: $(( $(date +%s) - start )) s"
  run_id=$(grep -o "MLflow run [0-9a-f]\{32\}" "$OUT/train.txt" | tail -1 | cut -d' ' -f3)
  [ -n "$run_id" ] || { echo "no run id in the training log"; exit 1; }
  # the run's logged test pass against evaluate's and predict's probabilities on this device, and the served pyfunc
  # model's (MLflow loads it on the CPU); a table for a person to read, no tolerance: CPU and GPU kernels differ
  $PY scripts/agreement.py "$run_id" --data-root "$DATA" --device $dev 2>&1 | tee "$OUT/agreement.txt" || exit 1
  echo "recipe phase: $(( $(date +%s) - start )) s"
  ;;
*) echo "unknown phase $phase: prepare, speed or recipe"; exit 2 ;;
esac
