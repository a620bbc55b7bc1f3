#!/usr/bin/env bash
# Train a ViT-S/16-like model from scratch on the 224 px chest X-rays on one GPU, in bf16, with the
# project's own train_vit.py, and print training images/s, peak GPU memory and the test metrics.
#
#   scripts/gpu_run.sh DATA_DIR [RESULTS_DIR]          # e.g. .gpu_data/chest_xray_224 "$OUT"
#   scripts/gpu_run.sh --smoke DATA_DIR [RESULTS_DIR]  # the same steps on CPU with a tiny model (seconds)
#
# DATA_DIR: the Kaggle layout ({train,val,test}/{NORMAL,PNEUMONIA}), e.g. the 224 px copy carried
# inside the repo folder. RESULTS_DIR (default: $GPU_RUN_WORKDIR/results) receives the small
# outputs: metrics, plots, run_stats.json, the model card and the logs (not the weights).
# Budget: everything in about 7.5 min (install, data prep, training, evaluation); training stops
# itself when the remaining time runs short and keeps the best epoch so far.
#
# Environment (all optional):
#   PYTHON                 interpreter with (or to receive) the requirements   [python3 or python with torch]
#                          and this repo's package (pip install --no-deps -e .)
#   GPU_RUN_WORKDIR        prepared data, the run folder, the HF cache          [runs/gpu_run]
#   GPU_RUN_CONFIG         training config                                      [configs/vit_small_gpu.yaml]
#   GPU_RUN_SIZE           side of the prepared images                          [224]
#   GPU_RUN_WORKERS        dataloader workers                                   [min(12, CPUs - 2)]
#   GPU_RUN_BUDGET_S       wall-time budget of the whole script, seconds        [450]
#   GPU_RUN_SKIP_INSTALL=1 never run pip: stop, saying what to install, when an import fails
#   GPU_RUN_EXTRA_ARGS     more train_vit.py flags (word-split)
set -euo pipefail

smoke=0
if [[ "${1:-}" == "--smoke" ]]; then smoke=1; shift; fi
if [[ $# -lt 1 || $# -gt 2 || "$1" == -* ]]; then
  sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
data=$(cd "$1" 2>/dev/null && pwd) || { echo "gpu_run: no such folder: $1" >&2; exit 2; }
work=${GPU_RUN_WORKDIR:-$repo/runs/gpu_run}
mkdir -p "$work"
work=$(cd "$work" && pwd)
results=${2:-$work/results}
mkdir -p "$results"
results=$(cd "$results" && pwd)

# The interpreter: $PYTHON, else the first of python3 / python that has torch (the machine's CUDA build).
# A relative path is taken from the caller's folder: the script runs from the repo and checks from "/".
py=${PYTHON:-}
if [[ -z "$py" ]]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then py=$candidate; break; fi
  done
  py=${py:-python3}
fi
if [[ $py == */* ]]; then py=$(cd "$(dirname "$py")" 2>/dev/null && pwd)/$(basename "$py"); fi
command -v "$py" >/dev/null || { echo "gpu_run: no such interpreter: ${PYTHON:-$py}" >&2; exit 2; }
cd "$repo"
budget=${GPU_RUN_BUDGET_S:-450}
if [[ $smoke == 1 ]]; then
  config=${GPU_RUN_CONFIG:-configs/vit_smoke_cpu.yaml}
  size=${GPU_RUN_SIZE:-64}
else
  config=${GPU_RUN_CONFIG:-configs/vit_small_gpu.yaml}
  size=${GPU_RUN_SIZE:-224}
fi
cpus=$(nproc 2>/dev/null || echo 4)
workers=${GPU_RUN_WORKERS:-$(( cpus - 2 < 1 ? 1 : (cpus - 2 > 12 ? 12 : cpus - 2) ))}
(( workers >= 1 )) || workers=1  # the configs ask for persistent workers, which need at least one

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export HF_HOME="$work/hf_home" GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
log="$results/gpu_run.log"
: > "$log"
say() { echo "[gpu_run $(printf '%3d' "$SECONDS")s] $*" | tee -a "$log"; }

say "repo $repo, data $data, work $work, results $results, config $config, size $size, workers $workers"
[[ -d "$data/train" && -d "$data/test" ]] || { say "error: $data has no train/ and test/ folders"; exit 2; }

# 0. A GPU run needs a GPU: say so at once when the installed torch sees none.
if [[ $smoke == 0 ]] && "$py" -c "import torch" 2>/dev/null \
    && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  say "error: no CUDA GPU visible to torch $("$py" -c 'import torch; print(torch.__version__)') (use --smoke for the CPU stand-in)"
  exit 4
fi

# 1. Python packages: whatever torch is installed stays; the rest comes from requirements.txt, and the
#    project's own package from the repo. The check runs from "/" so that only an installed
#    pneumonia_vit answers: data_prep/prepare.py runs with data_prep/, not the repo, on its sys.path.
started=$SECONDS
check_imports() { (cd / && "$py" - "$repo") <<'EOF' >>"$log" 2>&1
import sys
import torch, transformers, datasets, accelerate  # noqa: E401
assert int(transformers.__version__.split(".")[0]) >= 5, f"transformers {transformers.__version__} < 5"
assert int(datasets.__version__.split(".")[0]) >= 5, f"datasets {datasets.__version__} < 5"
import pneumonia_vit
print(f"pneumonia_vit installed at {pneumonia_vit.__path__[0]}")
sys.path.insert(0, sys.argv[1])
import train_vit, data_prep.prepare  # noqa: E401,F401  (everything training imports)
EOF
}
if check_imports; then
  say "packages: already installed"
elif [[ "${GPU_RUN_SKIP_INSTALL:-0}" == 1 ]]; then
  say "error: training imports fail and GPU_RUN_SKIP_INSTALL=1: $(grep -E '^[A-Za-z]*(Error|Exception)' "$log" | tail -n 1)"
  say "install them with: $py -m pip install -r $repo/requirements.txt && $py -m pip install --no-deps -e $repo"
  say "(or run again without GPU_RUN_SKIP_INSTALL, which does both; the full error is in $log)"
  exit 3
else
  # Keep the machine's torch (a CUDA build); gradio is the demo app's, not needed to train.
  requirements="$work/requirements-train.txt"
  if "$py" -c "import torch" 2>/dev/null; then
    grep -viE '^(torch|gradio)([^a-z_-]|$)' requirements.txt > "$requirements"
  else
    grep -viE '^gradio([^a-z_-]|$)' requirements.txt > "$requirements"
  fi
  "$py" -m pip --version >/dev/null 2>&1 || "$py" -m ensurepip --default-pip >>"$log" 2>&1 \
    || { say "error: $py has no pip and ensurepip failed; see $log"; exit 3; }
  say "packages: pip install -r requirements.txt (without gradio$("$py" -c 'import torch' 2>/dev/null && echo ', keeping the installed torch'))"
  if ! "$py" -m pip install -q --disable-pip-version-check -r "$requirements" 2>&1 | tee -a "$log"; then
    say "error: pip install failed (no package index reachable?); see $log"; exit 3
  fi
  # The installed setuptools builds the package where there is one, so that no index is needed.
  isolation=$("$py" -c "import setuptools; print('--no-build-isolation' if int(setuptools.__version__.split('.')[0]) >= 68 else '')" 2>/dev/null || true)
  say "packages: pip install --no-deps $isolation -e $repo (the project's package)"
  # shellcheck disable=SC2086
  if ! "$py" -m pip install -q --disable-pip-version-check --no-deps $isolation -e "$repo" 2>&1 | tee -a "$log"; then
    say "error: installing the project's package failed; see $log"; exit 3
  fi
  check_imports || { say "error: training imports still fail; see $log"; exit 3; }
fi
say "packages ready in $(( SECONDS - started )) s"

"$py" - <<'EOF' 2>&1 | tee -a "$log"
import torch, transformers
line = f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    line += f"; GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}"
else:
    line += "; no GPU visible"
print(line)
EOF
if [[ $smoke == 0 ]] && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "error: no CUDA GPU visible to torch (use --smoke for the CPU stand-in)"; exit 4
fi

# 2. Data: the Kaggle layout -> train / validation / test PGM images at $size px.
prepared="$work/prepared_$size"
started=$SECONDS
"$py" data_prep/prepare.py --source "$data" --output "$prepared" --size "$size" --overwrite \
  --num_workers "$cpus" 2>&1 | { grep -v "decode + resize" || true; } | tee -a "$log"
say "data prepared in $(( SECONDS - started )) s: $prepared"

# 3. Train + evaluate, within what is left of the budget (training stops itself, keeping the best
#    epoch; the timeout is only a backstop that leaves time for the summary).
left=$(( budget - SECONDS ))
(( left > 120 )) || { say "error: only $left s of the $budget s budget left for training"; exit 5; }
minutes=$("$py" -c "print(round(min(4.5, ($left - 100) / 60), 2))")
run="$work/run"
say "training: python train_vit.py $config (max_train_minutes $minutes, timeout $(( left - 20 )) s)"
started=$SECONDS
set +e
# shellcheck disable=SC2086
timeout --kill-after=20 $(( left - 20 )) "$py" train_vit.py "$config" --data_dir "$prepared" --output_dir "$run" \
  --overwrite_output_dir --max_train_minutes "$minutes" --dataloader_num_workers "$workers" \
  ${GPU_RUN_EXTRA_ARGS:-} > "$results/train.log" 2>&1
status=$?
set -e
grep -E "effective batch size|throughput|time budget|loading the best|Error|error" "$results/train.log" | tee -a "$log" || true
say "training + evaluation ended with status $status in $(( SECONDS - started )) s"

# 4. The figures, and the small outputs copied to the results folder.
for name in run_stats.json validation_metrics.json test_metrics.json validation_roc.png test_roc.png \
            validation_confusion_matrix.png test_confusion_matrix.png README.md config.json; do
  [[ -f "$run/$name" ]] && cp "$run/$name" "$results/"
done
[[ -f "$prepared/prepare_report.json" ]] && cp "$prepared/prepare_report.json" "$results/"
set +e
"$py" - "$run" "$SECONDS" <<'EOF' 2>&1 | tee -a "$log" "$results/summary.txt"
import json, sys
from pathlib import Path
run, seconds = Path(sys.argv[1]), int(sys.argv[2])
def load(name):
    path = run / name
    return json.loads(path.read_text()) if path.exists() else None
stats = load("run_stats.json")
print("== gpu_run results ==")
if stats:
    memory = "n/a (no GPU)" if stats["peak_gpu_memory_gib"] is None else f"{stats['peak_gpu_memory_gib']:.2f} GiB"
    print(f"images/s: {stats['images_per_second']} training images/s ({stats['train_images']} images in "
          f"{stats['train_seconds']} s, evaluation excluded{'; stopped by the time budget' if stats['stopped_by_time_budget'] else ''})")
    print(f"peak GPU memory: {memory}")
else:
    print("images/s: unknown (training did not finish)")
for split in ("validation", "test"):
    m = load(f"{split}_metrics.json")
    if m:
        c = m["confusion_matrix"]
        print(f"{split} metrics (n={m['n']}, threshold {m['threshold']:.3f}): ROC-AUC {m['roc_auc']:.4f}, "
              f"accuracy {m['accuracy']:.4f}, sensitivity {m['sensitivity']:.4f}, specificity {m['specificity']:.4f}, "
              f"F1 {m['f1']:.4f}; TN/FP/FN/TP {c['tn']}/{c['fp']}/{c['fn']}/{c['tp']}")
    else:
        print(f"{split} metrics: missing")
print(f"wall time: {seconds} s")
sys.exit(0 if stats and load("test_metrics.json") else 1)
EOF
summary=${PIPESTATUS[0]}
set -e
if [[ $status != 0 || $summary != 0 ]]; then
  say "failed (training status $status); the end of $results/train.log:"
  tail -n 30 "$results/train.log"
  exit 1
fi
say "done in $SECONDS s"
