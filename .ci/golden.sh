#!/usr/bin/env bash
# Records the outputs a behaviour-neutral restructuring must keep, into OUT (default /tmp/golden):
# the synthetic demo's metrics at 50 steps, params and FLOPs, the thesis tables as CSV from those runs,
# eval.py --run-dir, the data-set report, the CPU smoke test of the GPU check and every --help.
# Run it before and after a move and `diff -r` the two folders. Run dirs and timings are normalised away.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/golden}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
W=$(mktemp -d)
norm() { sed -E -e "s#$W#WORK#g" -e 's#[0-9]{8}-[0-9]{6}(-[0-9]+)?#STAMP#g' -e 's#[0-9.]+ s( |$)#T s\1#g'; }
miou() { $PY -c "import json,sys; m=json.load(open(sys.argv[1])); print(json.dumps({k: m[k] for k in sorted(m) if k not in ('wall_time_s', 'time', 'environment')}, sort_keys=True, indent=1))" "$1"; }
for help in "train.py" "eval.py" "benchmark.py" "adapt.py pseudo-labels" "-m datasets" "-m datasets prepare" \
            "-m datasets.synthetic" "-m models.export"; do
  $PY $help --help > "$OUT/help_$(echo $help | tr ' .-' '___').txt" 2>&1 || true
done
for cfg in gta5_bisenet oracle_bisenet; do
  OMP_NUM_THREADS=1 $PY train.py --config configs/synthetic/$cfg.yaml --work-dir "$W/runs" train.iters=50 \
    > "$W/$cfg.log" 2>&1
  run=$(ls -d "$W"/runs/$cfg/*/ | tail -n 1)
  miou "$run/metrics.json" > "$OUT/demo_$cfg.metrics.json"
  $PY eval.py --run-dir "$run" --no-progress 2>&1 | norm > "$OUT/eval_run_dir_$cfg.txt"
  cp "$run/snapshot_miou.json" "$OUT/snapshot_miou_$cfg.json" 2>/dev/null || true
done
$PY benchmark.py --runs "$W/runs" --table all --format csv 2>&1 | norm > "$OUT/tables.csv"
$PY benchmark.py --config configs/cityscapes_bisenet.yaml --json --iters 1 --warmup 0 --device cpu \
  | $PY -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({k: d[k] for k in d if k in ('config', 'config_name', 'model_label', 'model', 'size', 'params', 'flops')}, sort_keys=True, indent=1))" \
  > "$OUT/benchmark_bisenet.json"
$PY -m datasets --config configs/synthetic/gta5_bisenet.yaml 2>&1 | norm > "$OUT/datasets_report.txt"
$PY benchmark.py --gpu-check --device cpu --tiny --out "$W/gpu_check.json" > "$W/gpu_check.log" 2>&1 || true
$PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(sorted(d))" "$W/gpu_check.json" > "$OUT/gpu_check_keys.txt" 2>&1 || true
echo "golden outputs in $OUT (work files in $W)"
