#!/usr/bin/env bash
# The one command for a lent GPU: `make gpu-check` (or `bash profiling/gpu_check.sh`).
#
# Needs only a Python with torch (and, for the Triton parts, triton, a C compiler and Python.h);
# no network. Runs, in order, each part under `timeout` and inside one overall time budget
# (GPU_CHECK_BUDGET seconds, default 540, so that with the machine's start, the packing and a
# killed part's grace the whole fits one 10-minute device call):
#   environment      a Python that imports the whole package (profiling/gpu_env.py): the given one,
#                    or a throwaway virtualenv over it with the wheels of .whl/ (`make gpu-wheels`:
#                    pytest, ...) and the package installed offline
#   preflight        device, capability, bf16, memory, compiler, Python.h, one Triton launch,
#                    optional packages (profiling/preflight.py); its findings decide what runs below
#   pytest_gpu       every GPU-marked test of the repository (`pytest -m gpu` over the files that use the mark)
#   step_vith14      ijepa-bench on the default config (ViT-H/14, 224 px, batch 128, bf16): the authors'
#                    preset, each switch alone, all on (the default), phase split, a 1-step Chrome trace,
#                    GPU-hours beside the paper
#   masked_gather    kernel benchmark at ViT-H/14 batch-128 token shapes, against the copy roofline
#   ema              kernel benchmark over the ViT-H/14 encoder's parameters, against the copy roofline
#   attention        attention backends at ViT-B/16, ViT-H/14, ViT-H/16-448 token counts, batch 128
#   data             the PyTorch loader (and DALI's when nvidia-dali imports) on generated JPEGs
#   deepspeed_zero2, deepspeed_zero3
#                    step_vith14's default step under the DeepSpeed engine in a world of one, bf16
#                    (only when deepspeed imports): images/s and peak memory beside the plain engine's
#   scaling          the ZeRO scaling model from step_vith14's measured step (an estimate)
# Each part runs or is recorded as skipped with its reason, and the summary table
# (profiling/gpu_summary.py: images/s, MFU and GPU-hours beside the paper, the kernels against their
# roofline) prints LAST, also when a part fails or times out or the script is interrupted. Without
# CUDA the CPU-safe parts run at tiny sizes (seconds each) and the GPU-only parts are skipped.
#
# Output: a device call returns the last ~12,000 characters. Each part shows its name, its command
# and the tail of its log (a few lines when it passed, 12 when it failed, each cut at 240
# characters), all parts together about GPU_CHECK_ECHO_CHARS (default 5000): past that a part
# shows its name and what still fits of its last lines. The summary (under 5,000 characters on a
# GPU) follows. Every log is kept whole in the outputs.
#
# Python: $PYTHON if set, else `python3` from PATH when it imports torch (the GPU machines: no venv),
# else .venv/bin/python (the CPU dev machines). Outputs go to $OUT/gpu_check (or profiling/out/gpu_check);
# with $OUT set they are packed at the end into $OUT/gpu_check.tar.gz next to the summary, the
# Markdown to append to profiling/RESULTS.md, the step plots and the trace (the device tool returns 8 files).
#
# Environment: GPU_CHECK_BUDGET (seconds), GPU_CHECK_SKIP ("part part ..."), GPU_CHECK_ECHO_CHARS,
# GPU_CHECK_ENV (the throwaway virtualenv, default /tmp/ijepa-gpu-check-env), GPU_CHECK_WHEELS
# (default .whl), IJEPA_COMMIT (the commit to record where the copy has no .git),
# GPU_CHECK_DEVICE_LABEL (names the device in the reports).
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
ECHO_CHARS=${GPU_CHECK_ECHO_CHARS:-5000}
SHOWN=0  # characters the parts have shown so far
APPEND="$W/RESULTS_append.md"
export PYTHONUNBUFFERED=1
PY=""
CHILD=""
# The preflight's findings (profiling/preflight.py --facts) replace these.
CUDA=0
DEVICE="unknown (the preflight did not finish)"
TRITON="skipped: the preflight did not finish"
DALI=0

status() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$STATUS"; }
skip() { status "$1" "skipped ($2)" 0; }

# The table, then the packing for the device tool; runs on every exit, so it always prints last.
summary() {
  local rc=$?
  trap - EXIT INT TERM
  local summary_md="$W/summary.md"
  {
    echo "gpu-check on $DEVICE, $(date -u '+%Y-%m-%d %H:%M UTC'), commit ${IJEPA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}, $(( $(date +%s) - START ))s"
    echo
    if [ -z "$PY" ] || ! "$PY" -m profiling.gpu_summary "$STATUS" "$W" 2>/dev/null; then
      awk -F'\t' 'BEGIN { print "| part | status | seconds |"; print "|---|---|---|" } { printf "| %s | %s | %s |\n", $1, $2, $3 }' "$STATUS"
    fi
  } > "$summary_md"
  local failed
  failed=$(cut -f2 "$STATUS" | grep -c -E '^(failed|timeout)')
  local where="$W"
  if [ -n "${OUT:-}" ]; then
    cp "$summary_md" "$OUT/summary.md"
    [ -f "$APPEND" ] && cp "$APPEND" "$OUT/RESULTS_append.md"
    for f in "$W"/step_vith14_throughput.png "$W"/step_vith14_phases.png "$W"/trace_vith14.json.gz; do
      [ -f "$f" ] && [ "$(stat -c %s "$f")" -lt 16000000 ] && mv "$f" "$OUT/"
    done
    tar czf "$OUT/gpu_check.tar.gz" -C "$OUTROOT" gpu_check && rm -rf "$W"
    where="$OUT (gpu_check.tar.gz holds every log and JSON)"
  fi
  echo
  echo "==================== gpu-check summary ===================="
  cat "${OUT:-$W}/summary.md"
  [ "$rc" -ne 0 ] && echo "gpu-check stopped early (exit status $rc): the parts not listed did not run."
  [ "$CUDA" = 0 ] && echo "No CUDA: the GPU-only parts were skipped; the others ran at tiny CPU sizes."
  echo "outputs: $where; append RESULTS_append.md to profiling/RESULTS.md only for measurements worth keeping."
  [ "$rc" -eq 0 ] && [ "$failed" -gt 0 ] && rc=1
  exit "$rc"
}
# A signal stops the running part too, then the summary prints.
interrupted() {
  [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null
  exit "$1"
}
trap summary EXIT
trap 'interrupted 130' INT
trap 'interrupted 143' TERM

# say TEXT: print TEXT, counted against ECHO_CHARS; fits TEXT: whether TEXT fits in what is left
say() {
  SHOWN=$(( SHOWN + ${#1} + 1 ))
  printf '%s\n' "$1"
}
fits() { [ $(( SHOWN + ${#1} )) -le "$ECHO_CHARS" ]; }

# show_tail NAME LINES: the last LINES lines of NAME's log (each cut at 240 characters), fewer when
# they do not fit in what is left of ECHO_CHARS (the last lines of a failure say most)
show_tail() {
  local text
  text=$(grep -v '^USDT:' "$W/$1.log" | tail -n "$2" | cut -c1-240)
  while [ -n "$text" ] && ! fits "$text"; do
    text=$(tail -n +2 <<< "$text")
  done
  if [ -n "$text" ]; then
    say "$text"
  elif [ -s "$W/$1.log" ]; then
    say "($1: output left out to keep the whole within one device call's reply; $1.log in the outputs)"
  fi
}

# run_part NAME LIMIT_SECONDS LINES CMD...: time-boxed, logged to $W/NAME.log; shows the command and
# the last LINES lines of the log (12 when the part failed)
run_part() {
  local name=$1 limit=$2 lines=$3
  shift 3
  case " ${GPU_CHECK_SKIP:-} " in *" $name "*) skip "$name" "GPU_CHECK_SKIP"; return;; esac
  local left=$(( BUDGET - ($(date +%s) - START) - RESERVE ))
  if [ "$left" -lt 20 ]; then
    skip "$name" "time budget spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local header="=== $name (limit ${limit}s)" command="$*"
  say ""
  if fits "$header: ${command:0:200}"; then say "$header: ${command:0:200}"; else say "$header"; fi
  local t0 rc st
  t0=$(date +%s)
  # In the background, so that a signal reaches the trap at once instead of after the part.
  timeout -k 15 "$limit" "$@" > "$W/$name.log" 2>&1 &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=""
  [ "$rc" -ne 0 ] && lines=12
  show_tail "$name" "$lines"
  case $rc in
    0) st=ok ;;
    124|137) st="timeout (${limit}s)" ;;
    *) st="failed (rc $rc)" ;;
  esac
  status "$name" "$st" $(( $(date +%s) - t0 ))
}

if [ -n "${PYTHON:-}" ]; then
  BASE_PY=$PYTHON
elif python3 -c "import torch" >/dev/null 2>&1; then
  BASE_PY=python3
elif [ -x .venv/bin/python ]; then
  BASE_PY=.venv/bin/python
else
  status environment "failed (no Python with torch)" 0
  echo "gpu-check: no Python with torch (python3 lacks it and there is no .venv): run 'make venv' or set PYTHON"
  exit 1
fi

# environment: the last line gpu_env prints is the Python to use
t0=$(date +%s)
if ENV_OUT=$("$BASE_PY" -m profiling.gpu_env --env "${GPU_CHECK_ENV:-/tmp/ijepa-gpu-check-env}" \
    --wheels "${GPU_CHECK_WHEELS:-.whl}" 2> "$W/environment.log"); then
  PY=$(tail -n 1 <<< "$ENV_OUT")
  status environment ok $(( $(date +%s) - t0 ))
  head -n -1 <<< "$ENV_OUT"
else
  PY=$BASE_PY
  status environment "failed (see environment.log)" $(( $(date +%s) - t0 ))
  echo "gpu-check: $(tail -n 1 "$W/environment.log"); going on with $PY, whose package parts may fail"
fi
echo "gpu-check: python $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)');" \
     "budget ${BUDGET}s; outputs in $W"

run_part preflight 60 12 "$PY" -m profiling.preflight --facts "$W/preflight.env"
# shellcheck disable=SC1091  # written just now by the preflight, as shell-quoted assignments
[ -f "$W/preflight.env" ] && . "$W/preflight.env"
LABEL=()
[ -n "${GPU_CHECK_DEVICE_LABEL:-}" ] && LABEL=(--device-label "$GPU_CHECK_DEVICE_LABEL")
LOADERS=(pytorch)

# Expected seconds on one H100 or H200 (estimates; the summary's seconds column has the measured
# ones); the limits are caps, cut to what is left of the budget:
#   environment ~15, preflight ~20 (torch import, one Triton compile and launch);
#   pytest_gpu ~80: a Triton compile for each kernel specialisation the GPU tests launch, tiny shapes;
#   step_vith14 ~200: a ViT-H/14 step at batch 128 is 84 TFLOP (ijepa_fast.models.flops: 0.65 TFLOP an
#     image), 0.085 s at the datasheet's 989 TFLOP/s, so 0.2-0.4 s at 20-40% MFU; 9 rows of 4 warm-up
#     + 10 timed + 3 phase-split steps take ~7 s each plus ~3 s to build ViT-H twice and the
#     predictor; the two compiled rows add Inductor's compiles of the blocks for two mask shapes
#     (assumed ~1 minute each);
#   masked_gather, ema ~20 each: do_bench (~0.2 s a row) over 24 and 9 rows, a Triton compile per kernel;
#   attention ~45: 9 cases x up to 8 backends, do_bench each;
#   data ~30: 512 JPEGs written, then 4 and 8 workers, each 2w+1 warm-up and 4w timed batches of 128;
#   scaling ~5: arithmetic on the step's JSON.
if [ "$CUDA" = 1 ]; then
  GPU_TESTS=$(grep -rl --include='*.py' 'mark\.gpu' tests | sort | tr '\n' ' ')
  TRITON_OK=0
  [ "${TRITON%% *}" = ok ] && TRITON_OK=1
  [ "$DALI" = 1 ] && LOADERS+=(dali-gpu)
  if ! "$PY" -c "import pytest" >/dev/null 2>&1; then
    skip pytest_gpu "no pytest: run 'make gpu-wheels' here to carry it in .whl/"
  elif [ -z "$GPU_TESTS" ]; then
    skip pytest_gpu "no GPU-marked tests"
  else
    # shellcheck disable=SC2086  # the file list is meant to split
    run_part pytest_gpu 120 4 "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu $GPU_TESTS
  fi
  run_part step_vith14 270 4 "$PY" -m profiling.bench_step --ablation --warmup 3 --steps 10 --phase-steps 3 \
    --out "$W" --tag step_vith14 --record "$APPEND" --trace "$W/trace_vith14.json.gz" --trace-steps 1 "${LABEL[@]}"
  if [ "$TRITON_OK" = 1 ]; then
    run_part masked_gather 45 3 "$PY" -m profiling.bench_masked_gather --size vith14 --json "$W/masked_gather.json"
    run_part ema 45 3 "$PY" -m profiling.bench_ema --size vith14 --json "$W/ema.json"
  else
    skip masked_gather "Triton launch $TRITON"
    skip ema "Triton launch $TRITON"
  fi
  run_part attention 75 3 "$PY" -m profiling.bench_attention --json "$W/attention.json" --record "$APPEND"
  run_part data 60 4 "$PY" -m profiling.bench_data --loaders "${LOADERS[@]}" --workers 4 8 --num-images 512 \
    --batch-size 128 --steps 8 --repeats 1 --json "$W/data.json"
  for stage in 2 3; do
    if "$PY" -c "import deepspeed" >/dev/null 2>&1; then
      run_part "deepspeed_zero$stage" 120 3 "$PY" -m profiling.bench_step run.engine=deepspeed "run.zero_stage=$stage" \
        --warmup 3 --steps 6 --phase-steps 0 --out "$W" --tag "deepspeed_zero$stage" --record "$APPEND" "${LABEL[@]}"
    else
      skip "deepspeed_zero$stage" "deepspeed does not import"
    fi
  done
else
  skip pytest_gpu "no CUDA"
  [ "$DALI" = 1 ] && LOADERS+=(dali-cpu)
  # Tiny sizes: one intra-op thread; more spin against whatever else shares the machine's cores.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # The authors' preset against the default only, ViT-tiny: the harness's plumbing, in seconds (the
  # CPU tests run the full ablation).
  run_part step_vith14 120 4 "$PY" -m profiling.bench_step model.name=vit_tiny model.patch_size=8 data.crop_size=32 \
    data.batch_size=2 model.pred_depth=1 model.pred_emb_dim=48 mask.min_keep=4 run.device=cpu --compare-authors \
    --warmup 1 --steps 2 --phase-steps 1 --batches 2 --out "$W" --tag step_vith14 --record "$APPEND" \
    --trace "$W/trace_vith14.json.gz" --trace-steps 1 "${LABEL[@]}"
  run_part masked_gather 60 3 "$PY" -m profiling.bench_masked_gather --device cpu --size tiny --reps 3 \
    --json "$W/masked_gather.json"
  run_part ema 60 3 "$PY" -m profiling.bench_ema --device cpu --size tiny --reps 3 --json "$W/ema.json"
  run_part attention 60 3 "$PY" -m profiling.bench_attention --device cpu --models vitb16 --reps 2 \
    --json "$W/attention.json"
  run_part data 90 4 "$PY" -m profiling.bench_data --quick --loaders "${LOADERS[@]}" --json "$W/data.json"
  skip deepspeed_zero2 "no CUDA"
  skip deepspeed_zero3 "no CUDA"
fi
if [ -f "$W/step_vith14.json" ]; then
  run_part scaling 20 3 "$PY" -m profiling.scaling --from-json "$W/step_vith14.json" --gpus 1 8 16 32 64 --stages 0 2 3
else
  skip scaling "no step_vith14.json"
fi
