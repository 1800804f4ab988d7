#!/usr/bin/env bash
# The one command for a lent GPU: `make gpu-check` (or `bash profiling/gpu_check.sh`).
#
# Runs, each part under `timeout` and inside one overall time budget (GPU_CHECK_BUDGET seconds,
# default 540, so the whole stays under 10 minutes):
#   pytest_gpu       every GPU-marked test of the repository (`pytest -m gpu` over the files that use the mark)
#   step_vith14      ijepa-bench, ViT-H/14 at 224 px, batch 128, bf16: authors preset, each switch alone,
#                    all on (the default), phase split, a 1-step Chrome trace, GPU-hours vs the paper
#   masked_gather    kernel benchmark at ViT-H/14 batch-128 token shapes
#   ema              kernel benchmark over the ViT-H/14 encoder's parameters
#   attention        attention backends at ViT-B/16, ViT-H/14, ViT-H/16-448 token counts, batch 128
#   data             data loader benchmark with DALI (only when nvidia-dali imports)
#   step_vith16_448  ijepa-bench, ViT-H/16 at 448 px, the default configuration only
#   scaling          the ZeRO scaling model from step_vith14's measured step (an estimate)
# and prints a summary table LAST. Without CUDA it runs the CPU-safe parts at tiny sizes (seconds
# each) and marks the GPU-only parts as skipped.
#
# Python: $PYTHON if set, else `python3` from PATH when it imports torch (the GPU machines: no venv),
# else .venv/bin/python (the CPU dev machines). Wheels in .whl/ (packages the GPU machine lacks) are
# installed into /tmp/site first. Outputs go to $OUT/gpu_check (or profiling/out/gpu_check); with
# $OUT set they are packed at the end into $OUT/gpu_check.tar.gz next to the summary, the Markdown to
# append to profiling/RESULTS.md, the step plots and the trace (the device tool returns 8 files).
#
# Environment: GPU_CHECK_BUDGET (seconds), GPU_CHECK_SKIP ("part part ..."), IJEPA_COMMIT (the commit
# to record where the copy has no .git), GPU_CHECK_DEVICE_LABEL (names the device in the reports).
set -u
cd "$(dirname "$0")/.."

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-540}
RESERVE=15  # seconds kept for packing and the summary
OUTROOT=${OUT:-profiling/out}
W="$OUTROOT/gpu_check"
rm -rf "$W"
mkdir -p "$W"
STATUS="$W/status.tsv"
: > "$STATUS"
APPEND="$W/RESULTS_append.md"
export PYTHONUNBUFFERED=1

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif python3 -c "import torch" >/dev/null 2>&1; then
  PY=python3
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  echo "gpu-check: no Python with torch (python3 lacks it and there is no .venv; run 'make venv' or set PYTHON)"
  exit 1
fi

status() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$STATUS"; }

WHEELS=""
if ls .whl/*.whl >/dev/null 2>&1; then
  t0=$(date +%s)
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      > "$W/wheels.log" 2>&1; then
    export PYTHONPATH="/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}"
    status wheels ok $(( $(date +%s) - t0 ))
  else
    export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
    status wheels "failed (see wheels.log)" $(( $(date +%s) - t0 ))
  fi
  WHEELS=$(cd .whl && ls *.whl | tr '\n' ' ')
else
  export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
fi

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  CUDA=1
  DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")
else
  CUDA=0
  DEVICE="CPU (no CUDA)"
fi
LABEL=()
[ -n "${GPU_CHECK_DEVICE_LABEL:-}" ] && LABEL=(--device-label "$GPU_CHECK_DEVICE_LABEL")
echo "gpu-check: $DEVICE; python $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)');" \
     "budget ${BUDGET}s; outputs in $W${WHEELS:+; wheels: $WHEELS}"

# run_part NAME LIMIT_SECONDS CMD...: time-boxed, logged to $W/NAME.log, its tail shown
run_part() {
  local name=$1 limit=$2
  shift 2
  case " ${GPU_CHECK_SKIP:-} " in *" $name "*) status "$name" "skipped (GPU_CHECK_SKIP)" 0; return;; esac
  local left=$(( BUDGET - ($(date +%s) - START) - RESERVE ))
  if [ "$left" -lt 20 ]; then
    status "$name" "skipped (time budget spent)" 0
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo
  echo "=== $name (limit ${limit}s): $*"
  local t0 rc st
  t0=$(date +%s)
  timeout -k 15 "$limit" "$@" > "$W/$name.log" 2>&1
  rc=$?
  tail -n 25 "$W/$name.log" | grep -v '^USDT:'
  case $rc in
    0) st=ok ;;
    124|137) st="timeout (${limit}s)" ;;
    *) st="failed (rc $rc)" ;;
  esac
  status "$name" "$st" $(( $(date +%s) - t0 ))
}

if [ "$CUDA" = 1 ]; then
  GPU_TESTS=$(grep -rl --include='*.py' 'mark\.gpu' tests | sort | tr '\n' ' ')
  if "$PY" -c "import pytest" >/dev/null 2>&1 && [ -n "$GPU_TESTS" ]; then
    # shellcheck disable=SC2086  # the file list is meant to split
    run_part pytest_gpu 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu $GPU_TESTS
  else
    status pytest_gpu "skipped (no pytest or no GPU-marked tests)" 0
  fi
  run_part step_vith14 240 "$PY" -m profiling.bench_step --model vit_huge --patch 14 --img 224 --batch 128 \
    --ablation --warmup 3 --steps 10 --phase-steps 3 --out "$W" --tag step_vith14 --record "$APPEND" \
    --trace "$W/trace_vith14.json.gz" --trace-steps 1 "${LABEL[@]}"
  run_part masked_gather 45 "$PY" -m profiling.bench_masked_gather --size vith14 --json "$W/masked_gather.json"
  run_part ema 45 "$PY" -m profiling.bench_ema --size vith14 --json "$W/ema.json"
  run_part attention 75 "$PY" -m profiling.bench_attention --json "$W/attention.json" --record "$APPEND"
  if "$PY" -c "import nvidia.dali" >/dev/null 2>&1; then
    run_part data 60 "$PY" -m profiling.bench_data --loaders pytorch dali-gpu --workers 2 4 --num-images 512 \
      --batch-size 128 --steps 8 --repeats 1 --json "$W/data.json"
  else
    status data "skipped (nvidia-dali not installed; its ~190 MiB wheel does not travel)" 0
  fi
  run_part step_vith16_448 150 "$PY" -m profiling.bench_step --model vit_huge --patch 16 --img 448 --batch 64 \
    --warmup 3 --steps 6 --phase-steps 2 --out "$W" --tag step_vith16_448 --record "$APPEND" "${LABEL[@]}"
else
  status pytest_gpu "skipped (no CUDA)" 0
  run_part step_vith14 120 "$PY" -m profiling.bench_step --model vit_tiny --patch 8 --img 32 --batch 2 \
    --pred-depth 1 --pred-dim 48 --set mask.min_keep=4 --device cpu --ablation --warmup 1 --steps 2 \
    --phase-steps 1 --batches 2 --out "$W" --tag step_vith14 --record "$APPEND" \
    --trace "$W/trace_vith14.json.gz" --trace-steps 1 "${LABEL[@]}"
  run_part masked_gather 60 "$PY" -m profiling.bench_masked_gather --device cpu --size tiny --reps 3 \
    --json "$W/masked_gather.json"
  run_part ema 60 "$PY" -m profiling.bench_ema --device cpu --size tiny --reps 3 --json "$W/ema.json"
  run_part attention 60 "$PY" -m profiling.bench_attention --device cpu --models vitb16 --reps 2 \
    --json "$W/attention.json"
  LOADERS=(pytorch)
  "$PY" -c "import nvidia.dali" >/dev/null 2>&1 && LOADERS+=(dali-cpu)
  run_part data 90 "$PY" -m profiling.bench_data --quick --loaders "${LOADERS[@]}" --json "$W/data.json"
  status step_vith16_448 "skipped (no CUDA)" 0
fi
if [ -f "$W/step_vith14.json" ]; then
  run_part scaling 30 "$PY" -m profiling.scaling --from-json "$W/step_vith14.json" --gpus 1 8 16 32 64 --stages 0 2 3
else
  status scaling "skipped (no step_vith14.json)" 0
fi

# Pack for the device tool (at most 8 files come back): the tarball, the summary, the Markdown for
# RESULTS.md, the step plots and the trace stay at the top of $OUT.
SUMMARY="$W/summary.md"
{
  echo "gpu-check on $DEVICE, $(date -u '+%Y-%m-%d %H:%M UTC'), commit ${IJEPA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}, $(( $(date +%s) - START ))s"
  echo
  "$PY" -c "import sys; from ijepa_fast.bench import check_summary; print(check_summary(sys.argv[1], sys.argv[2]))" \
    "$STATUS" "$W" 2>/dev/null || column -t -s $'\t' "$STATUS"
} > "$SUMMARY"
FAILED=$(cut -f2 "$STATUS" | grep -c -E '^(failed|timeout)')
if [ -n "${OUT:-}" ]; then
  cp "$SUMMARY" "$OUT/summary.md"
  SUMMARY="$OUT/summary.md"
  [ -f "$APPEND" ] && cp "$APPEND" "$OUT/RESULTS_append.md"
  for f in "$W"/step_vith14_throughput.png "$W"/step_vith14_phases.png "$W"/trace_vith14.json.gz; do
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -lt 16000000 ] && mv "$f" "$OUT/"
  done
  tar czf "$OUT/gpu_check.tar.gz" -C "$OUTROOT" gpu_check && rm -rf "$W"
  WHERE="$OUT (gpu_check.tar.gz holds every log and JSON)"
else
  WHERE="$W"
fi

echo
echo "==================== gpu-check summary ===================="
cat "$SUMMARY"
[ "$CUDA" = 0 ] && echo "GPU parts skipped (no CUDA): pytest_gpu, step_vith16_448; the others ran at tiny CPU sizes."
echo "outputs: $WHERE; append RESULTS_append.md to profiling/RESULTS.md only for measurements worth keeping."
[ "$FAILED" -eq 0 ]
