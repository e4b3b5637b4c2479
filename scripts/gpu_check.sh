#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md ("GPU"), in two phases, each small enough for one call of the device tool
# (64 MiB carried per call: the extra packages + a data subset, then the ImageNet weights):
#   bash scripts/gpu_check.sh speed    # python scripts/benchmark.py speed --device cuda (bf16 + channels-last)
#   bash scripts/gpu_check.sh recipe   # experiment=kermany_gpu trained on CUDA in bf16-mixed, then the run's logged
#                                      # test probabilities compared with evaluate's and predict's on the GPU
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
  $PY -m xrayfusion.evaluate run_id="$run_id" data=kermany data.root="$DATA" device=$dev name=gpu_check \
    metrics.bootstrap=0 2>&1 | tee "$OUT/evaluate.txt"
  $PY -m xrayfusion.predict run_id="$run_id" inputs="$DATA/test" output="$OUT/predict.csv" device=$dev 2>&1 | tail -3
  # the run's own test pass against evaluate's and predict's probabilities for the same images
  $PY - "$run_id" "$OUT/predict.csv" <<'EOF' 2>&1 | tee "$OUT/agree.txt"
import sys, tempfile
from pathlib import Path
import mlflow, pandas as pd
run_id, predict_csv = sys.argv[1], sys.argv[2]
with tempfile.TemporaryDirectory() as tmp:
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="test_predictions.csv", dst_path=tmp))
    evaluated = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval/gpu_check/predictions.csv", dst_path=tmp))
predicted = pd.read_csv(predict_csv).rename(columns=lambda c: c.replace("_prob_", "/"))
predicted["name"] = predicted["path"]
cols = [c for c in logged.columns if "/" in c]
def keyed(frame):  # class folder + file name: the same image whatever the root
    return frame.set_index(frame["name"].map(lambda p: "/".join(Path(str(p)).parts[-2:])))
for what, other in (("evaluate", evaluated), ("predict", predicted)):
    a, b = keyed(logged), keyed(other)
    common, shared = a.index.intersection(b.index), [c for c in cols if c in b.columns]
    assert len(common) == len(logged) and len(shared) == len(cols), (len(common), shared)
    diff = (a.loc[common, shared] - b.loc[common, shared]).abs().to_numpy().max()
    print(f"logged test pass vs {what}: {len(common)} images, {len(shared)} columns, max |difference| {diff:.3g}")
EOF
  echo "recipe phase: $(( $(date +%s) - start )) s"
  ;;
*) echo "unknown phase $phase: speed or recipe"; exit 2 ;;
esac
