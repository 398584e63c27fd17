#!/usr/bin/env bash
# One prepared GPU check (issue 12), under 8 minutes on one CUDA device in bf16:
#   1. the bench in --quick mode on the GPU            -> bench-gpu.json, bench-gpu.details.json
#   2. a short `gradual fit` of SmolLM2 with the demo's recipe (configs/demo.yaml: LoRA + KD on the task documents),
#      2 layers, 8 steps each, 8 consolidation steps  -> fit-results.json, fit-report.md
#   3. the vLLM SGR path (an `sgr` source answered by vLLM) when `import vllm` works; skipped with a logged line
#      otherwise                                       -> fit-vllm-results.json
# plus gpu-check.log (everything printed) and summary.txt, in the folder given as argument (default: $OUT, else
# ./gpu-check). Without CUDA it stops at once with exit 2; `--dry-run` prints and parse-checks every command on any
# machine and runs none of them.
#
# Usage: scripts/gpu_check.sh [--dry-run] [OUT_DIR]
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY=1
    shift
fi
DIR="${1:-${OUT:-./gpu-check}}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
if [[ -x .venv/bin/python ]]; then PY="${PYTHON:-.venv/bin/python}"; else PY="${PYTHON:-python3}"; fi
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
LOG="$DIR/gpu-check.log"
RUNS="$(mktemp -d "${TMPDIR:-/tmp}/gradual-gpu-check.XXXXXX")"  # stage checkpoints stay out of DIR (large)
trap 'rm -rf "$RUNS"' EXIT
: > "$LOG"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

say() { echo "gpu_check: $*" | tee -a "$LOG"; }

# the default recipe is the demo's; only device, precision, size and the run folder change
FIT_GPU=(--trainer.accelerator gpu --trainer.devices 1 --trainer.precision bf16-mixed --model.dtype bfloat16
         --model.overwrite true)
FIT=("$PY" -m gradual fit --config configs/demo.yaml "${FIT_GPU[@]}"
     --model.schedule.max_layers 2 --model.schedule.steps_per_stage 8 --model.schedule.final_steps 8
     --model.run_dir "$RUNS/fit")
FIT_VLLM=("$PY" -m gradual fit --config configs/demo.yaml "${FIT_GPU[@]}"
          --model.schedule.max_layers 1 --model.schedule.steps_per_stage 4 --model.schedule.final_steps 0
          --data.sources '[{"kind": "sgr"}]' --data.sgr.backend vllm --data.sgr.n_per_task 8
          --data.sgr.decoding.max_new_tokens 64 --data.sgr.cache_dir "$RUNS/sgr-cache"
          --data.sgr.vllm_args '{"gpu_memory_utilization": 0.3, "enforce_eager": true}'
          --model.run_dir "$RUNS/fit-vllm")
BENCH=("$PY" scripts/bench.py --quick --device cuda --dtype bfloat16 --threads auto
       --out "$DIR/bench-gpu.json" --details "$DIR/bench-gpu.details.json")

declare -A STATUS=()

# step NAME SECONDS CMD...: run one step under a time limit, logging its output and exit status
step() {
    local name="$1" limit="$2"
    shift 2
    say "[$name] $(printf '%q ' "$@")"
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    STATUS[$name]="exit $rc after $((SECONDS - start)) s"
    say "[$name] ${STATUS[$name]}$([[ $rc == 124 ]] && echo " (time limit $limit s)")"
    return "$rc"
}

if (( DRY )); then
    say "dry run: nothing runs on a GPU; checking that every command parses"
    for cmd in BENCH FIT FIT_VLLM; do
        declare -n args="$cmd"
        say "[$cmd] $(printf '%q ' "${args[@]}")"
    done
    "$PY" scripts/bench.py --help > /dev/null || { say "scripts/bench.py --help failed"; exit 1; }
    "${FIT[@]}" --print_config > "$DIR/fit-config.yaml" || { say "fit arguments do not parse"; exit 1; }
    "${FIT_VLLM[@]}" --print_config > "$DIR/fit-vllm-config.yaml" || { say "vLLM fit arguments do not parse"; exit 1; }
    say "dry run ok: commands parse; resolved fit configs in $DIR/fit-config.yaml and $DIR/fit-vllm-config.yaml"
    exit 0
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$LOG"; then
    say "no CUDA device: torch.cuda.is_available() is False (python: $PY). This check needs a GPU; use --dry-run" \
        "to check the commands on this machine."
    exit 2
fi
"$PY" -c "import torch; print('gpu_check: device', torch.cuda.get_device_name(0), '| torch', torch.__version__,
      '| cuda', torch.version.cuda)" 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

failed=0
step bench 210 "${BENCH[@]}" || failed=1
step fit 120 "${FIT[@]}" || failed=1
cp "$RUNS/fit/results.json" "$DIR/fit-results.json" 2>/dev/null
cp "$RUNS/fit/report.md" "$DIR/fit-report.md" 2>/dev/null
if "$PY" -c "import vllm" 2>>"$LOG"; then
    step fit-vllm 120 "${FIT_VLLM[@]}" || failed=1
    cp "$RUNS/fit-vllm/results.json" "$DIR/fit-vllm-results.json" 2>/dev/null
else
    STATUS[fit-vllm]="skipped: import vllm failed (vLLM not installed here)"
    say "[fit-vllm] ${STATUS[fit-vllm]}"
fi

{
    for name in bench fit fit-vllm; do echo "$name: ${STATUS[$name]:-not run}"; done
} | tee "$DIR/summary.txt" | tee -a "$LOG"
say "results in $DIR$( (( failed )) && echo "; a step failed, see gpu-check.log")"
exit "$failed"
