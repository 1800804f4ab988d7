#!/usr/bin/env bash
# One stage of the check of a lent GPU: `make gpu-check [STAGE=NAME]` (or `bash profiling/gpu_check.sh [NAME]`).
#
# A lent GPU machine gives 15 minutes in all, its start (1-2 minutes) included, and runs one command
# for at most 10; so the check comes in stages, each one device call, each runnable by name on a
# fresh machine:
#   first      (the default; its parts cut to a 285 s budget, an estimate not yet run on a GPU) the environment, the
#              preflight, the kernel correctness tests (the GPU tests of tests/kernels/), the ViT-H/14
#              step: the authors' preset against the default in one process (the authors' preset
#              runs as they ran it, never compiled), with the phase split and a 1-step trace, and
#              the ZeRO scaling model from that step
#   deepspeed  the DeepSpeed GPU test, then the default step under the DeepSpeed engine (ZeRO-2), the
#              FSDP2 engine and ZeRO-3, in a world of one: images/s and peak memory beside the plain
#              engine's
#   ablation   the single-switch ablation (the authors' preset, each switch alone on it: the bf16
#              target copy, the bf16 residual stream and uint8 images among them; the
#              default with FP8 target and with fused epilogues, the default without compile, the
#              default), then the step's GPU tests; the summary puts the step model's predicted
#              milliseconds per phase beside the measured ones for every row
#   kernels    the Triton kernels at ViT-H/14 shapes against the roofline of the measured copy bandwidth
#   attention  the attention backends at ViT-B/16, ViT-H/14 and ViT-H/16-448 token counts, batch 128
#   data       the DALI GPU tests (when DALI imports), then the data loaders on generated JPEGs
# Each stage other than `first` is cut to a 225 s budget. The recommended order, so that a first call
# and one more on the warm machine fit the 15 minutes: first, then deepspeed (README's GPU section).
#
# Needs only a Python with torch (and, for the Triton parts, triton, a C compiler and Python.h);
# no network. Each stage starts with
#   environment  a Python that imports the whole package (profiling/gpu_env.py): the given one, or a
#                throwaway virtualenv over it with the wheels of .whl/ (`make gpu-wheels`: DeepSpeed,
#                pydantic, ...) and the package installed offline; it fails naming a carried file
#                that did not install
#   preflight    device, capability, bf16, memory, compiler, Python.h, one Triton launch, optional
#                packages (profiling/preflight.py); its findings decide what runs below
# then runs its parts, each under `timeout` and inside the stage's time budget (GPU_CHECK_BUDGET
# seconds; default 285 for first, 225 for the others). Each part runs or is recorded as skipped
# with its reason. Without CUDA each stage runs its CPU form: the CPU-safe parts at tiny sizes
# (seconds each), the GPU-only parts skipped.
#
# Results: each stage writes its folder $GPU_CHECK_RESULTS/<stage> (default profiling/out/gpu_check,
# git-ignored, so it stays on a warm machine between calls): a log and JSON per part, status.tsv and
# about.tsv. The summary (profiling/gpu_summary.py: each part's status and key figure, images/s, MFU
# and GPU-hours beside the paper, the kernels against their roofline) merges every stage folder there
# and prints LAST, also when a part fails or times out or the script is interrupted. With $OUT set
# (a device call), the stage's folder is packed into $OUT/gpu_check_<stage>.tar.gz next to the
# summary, the Markdown to append to profiling/RESULTS.md, and the step plots and trace.
#
# Output: a device call returns the last ~12,000 characters. Each part shows its name, its command
# and the tail of its log (a few lines when it passed, 12 when it failed, each cut at 240
# characters), all parts together about GPU_CHECK_ECHO_CHARS (default 5000): past that a part
# shows its name and what still fits of its last lines. The summary follows.
#
# pytest: the machine's own, with its plugins' auto-loading off (PYTEST_DISABLE_PLUGIN_AUTOLOAD=1).
# Python: $PYTHON if set, else `python3` from PATH when it imports torch (the GPU machines: no venv),
# else .venv/bin/python (the CPU dev machines).
#
# Environment: GPU_CHECK_BUDGET (seconds), GPU_CHECK_SKIP ("part part ..."), GPU_CHECK_ECHO_CHARS,
# GPU_CHECK_RESULTS, GPU_CHECK_ENV (the throwaway virtualenv, default /tmp/ijepa-gpu-check-env),
# GPU_CHECK_WHEELS (default .whl), IJEPA_COMMIT (the commit to record where the copy has no .git),
# GPU_CHECK_DEVICE_LABEL (names the device in the reports).
set -u
cd "$(dirname "$0")/.."

STAGE=${1:-first}
case $STAGE in
  first) DEFAULT_BUDGET=285 ;;
  deepspeed|ablation|kernels|attention|data) DEFAULT_BUDGET=225 ;;
  *) echo "gpu-check: unknown stage '$STAGE': first, deepspeed, ablation, kernels, attention or data"; exit 2 ;;
esac
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-$DEFAULT_BUDGET}
RESERVE=15  # seconds kept for packing and the summary
RESULTS=${GPU_CHECK_RESULTS:-profiling/out/gpu_check}
W="$RESULTS/$STAGE"
rm -rf "$W"
mkdir -p "$W"
STATUS="$W/status.tsv"
: > "$STATUS"
ECHO_CHARS=${GPU_CHECK_ECHO_CHARS:-5000}
SHOWN=0  # characters the parts have shown so far
APPEND="$W/RESULTS_append.md"
export PYTHONUNBUFFERED=1
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
PY=""
CHILD=""
# The preflight's findings (profiling/preflight.py --facts) replace these.
CUDA=0
DEVICE="unknown (the preflight did not finish)"
TRITON="skipped: the preflight did not finish"
DALI=0

status() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$STATUS"; }
skip() { status "$1" "skipped ($2)" 0; }

# The stage's record, the merged summary, then the packing for the device tool; runs on every exit,
# so the summary always prints last.
summary() {
  local rc=$?
  trap - EXIT INT TERM
  local commit=${IJEPA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
  printf 'stage\t%s\nstarted\t%s\ndevice\t%s\ndate\t%s\ncommit\t%s\nseconds\t%s\n' "$STAGE" "$START" "$DEVICE" \
    "$(date -u '+%Y-%m-%d %H:%M UTC')" "$commit" $(( $(date +%s) - START )) > "$W/about.tsv"
  # summary.md: every stage in full; shown: every stage's parts, this stage's tables (what fits a reply)
  local summary_md="$W/summary.md" shown="$W/summary_shown.md"
  if [ -z "$PY" ] ||
      ! "$PY" -m profiling.gpu_summary "$RESULTS" --detail "$STAGE" --full-to "$summary_md" > "$shown" 2>/dev/null; then
    {
      echo "gpu-check stage $STAGE on $DEVICE, commit $commit"
      echo
      awk -F'\t' 'BEGIN { print "| part | status | seconds |"; print "|---|---|---|" } { printf "| %s | %s | %s |\n", $1, $2, $3 }' "$STATUS"
    } > "$summary_md"
    cp "$summary_md" "$shown"
  fi
  local failed
  failed=$(cut -f2 "$STATUS" | grep -c -E '^(failed|timeout)')
  local where="$W"
  if [ -n "${OUT:-}" ]; then
    cp "$summary_md" "$OUT/summary.md"
    [ -f "$APPEND" ] && cp "$APPEND" "$OUT/RESULTS_append.md"
    for f in "$W"/step_vith14_throughput.png "$W"/step_vith14_phases.png "$W"/trace_vith14.json.gz; do
      [ -f "$f" ] && [ "$(stat -c %s "$f")" -lt 16000000 ] && cp "$f" "$OUT/"
    done
    tar czf "$OUT/gpu_check_$STAGE.tar.gz" -C "$RESULTS" "$STAGE"
    where="$OUT (gpu_check_$STAGE.tar.gz holds every log and JSON of the stage)"
  fi
  echo
  echo "==================== gpu-check summary ===================="
  cat "$shown"
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

# gpu_tests NAME LIMIT PATH...: the GPU-marked tests under PATH (the machine's pytest, no plugins)
gpu_tests() {
  local name=$1 limit=$2
  shift 2
  if [ "$CUDA" != 1 ]; then
    skip "$name" "no CUDA"
  elif ! "$PY" -c "import pytest" >/dev/null 2>&1; then
    skip "$name" "no pytest"
  else
    run_part "$name" "$limit" 4 "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu "$@"
  fi
}

# deepspeed_step STAGE LIMIT ARGS...: the step under the DeepSpeed engine at ZeRO STAGE, when DeepSpeed imports
deepspeed_step() {
  local zero=$1 limit=$2
  shift 2
  local copy=true  # the bf16 target copy needs the whole target on each rank, which ZeRO-3 partitions
  [ "$zero" = 3 ] && copy=false
  if "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    run_part "deepspeed_zero$zero" "$limit" 3 "$PY" -m profiling.bench_step run.engine=deepspeed \
      "run.zero_stage=$zero" "speed.bf16_target_copy=$copy" "$@" --phase-steps 0 --out "$W" --tag "deepspeed_zero$zero" --record "$APPEND" "${LABEL[@]}"
  else
    skip "deepspeed_zero$zero" "deepspeed does not import: run 'make gpu-wheels' here to carry it in .whl/"
  fi
}

# fsdp2_step LIMIT ARGS...: the step under the FSDP2 engine (torch alone: always imports)
fsdp2_step() {
  local limit=$1
  shift
  run_part fsdp2 "$limit" 3 "$PY" -m profiling.bench_step run.engine=fsdp2 "$@" --phase-steps 0 --out "$W" \
    --tag fsdp2 --record "$APPEND" "${LABEL[@]}"
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
# torch's version from its metadata: importing torch here would cost seconds of the lease
echo "gpu-check stage $STAGE: python $("$PY" -c 'import importlib.metadata as m, sys; print(sys.version.split()[0], "torch", m.version("torch"))');" \
     "budget ${BUDGET}s; outputs in $W"

run_part preflight 60 12 "$PY" -m profiling.preflight --facts "$W/preflight.env"
# shellcheck disable=SC1091  # written just now by the preflight, as shell-quoted assignments
[ -f "$W/preflight.env" ] && . "$W/preflight.env"
LABEL=()
[ -n "${GPU_CHECK_DEVICE_LABEL:-}" ] && LABEL=(--device-label "$GPU_CHECK_DEVICE_LABEL")
TRITON_OK=0
[ "${TRITON%% *}" = ok ] && TRITON_OK=1
if [ "$CUDA" != 1 ]; then
  # Tiny sizes: one intra-op thread; more spin against whatever else shares the machine's cores.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # The step at ViT-tiny on the CPU: the harness's plumbing in seconds, not a measurement of it.
  TINY=(model.name=vit_tiny model.patch_size=8 data.crop_size=32 data.batch_size=2 model.pred_depth=1
        model.pred_emb_dim=48 mask.min_keep=4 run.device=cpu)
fi

# Expected seconds on one H100 (estimates; the summary's seconds column has the measured ones); the
# limits are caps, cut to what is left of the budget. Every stage: environment ~15, preflight ~20
# (torch import, one Triton compile and launch).
#   first: pytest_kernels ~60 (a Triton compile per kernel specialisation the tests launch, tiny
#     shapes); step_vith14 ~110: a ViT-H/14 step at batch 128 is 84 TFLOP (ijepa_fast.models.flops: 0.65
#     TFLOP an image), 0.085 s at the datasheet's 989 TFLOP/s, so 0.2-0.6 s at 15-40% MFU; 2 rows of
#     4 warm-up + 10 timed + 3 phase-split steps and 1 traced, ~3 s to build ViT-H and the predictor
#     for each, and Inductor's compile of the default's blocks (assumed ~1 minute); scaling ~5.
#   deepspeed: pytest_deepspeed ~40 (DeepSpeed's import, four tiny engines); deepspeed_zero2 ~80
#     (compiled, as the default); fsdp2 ~80 (compiled: its bf16-gathered blocks are other graphs than
#     ZeRO-2's, so Inductor compiles again), before ZeRO-3, which the budget cuts first;
#     deepspeed_zero3 ~40 (runs eager: ZeRO-3 refuses compile).
#   ablation: 11 eager rows of ~10 s each and the compiled default ~70; pytest_step ~40 (with the
#     GPU tests of the bf16 target copy, the device feed and FP8). The rows
#     measured from the default's side compile too (the two FP8 rows ~70 each, the fused epilogue's
#     max-autotune longer: unknown), so they run last and a 225 s budget cuts them first: rerun them
#     alone with GPU_CHECK_BUDGET raised, or `ijepa-bench --configs NAME ...`.
#   kernels: masked_gather, ema ~20 each: do_bench (~0.2 s a row) over 24 and 9 rows, a Triton compile each.
#   attention ~45: 9 cases x up to 8 backends, do_bench each.
#   data ~30: 512 JPEGs written, then 4 and 8 workers, each 2w+1 warm-up and 4w timed batches of 128.
case $STAGE in
  first)
    gpu_tests pytest_kernels 100 tests/kernels
    if [ "$CUDA" = 1 ]; then
      run_part step_vith14 170 4 "$PY" -m profiling.bench_step --compare-authors --warmup 3 --steps 10 --phase-steps 3 \
        --out "$W" --tag step_vith14 --record "$APPEND" --trace "$W/trace_vith14.json.gz" --trace-steps 1 "${LABEL[@]}"
    else
      run_part step_vith14 120 4 "$PY" -m profiling.bench_step "${TINY[@]}" --compare-authors --warmup 1 --steps 2 \
        --phase-steps 1 --batches 2 --out "$W" --tag step_vith14 --record "$APPEND" \
        --trace "$W/trace_vith14.json.gz" --trace-steps 1 "${LABEL[@]}"
    fi
    if [ -f "$W/step_vith14.json" ]; then
      run_part scaling 20 3 "$PY" -m profiling.scaling --from-json "$W/step_vith14.json" --gpus 1 8 16 32 64 --stages 0 2 3 fsdp2 \
        --json "$W/scaling.json"
    else
      skip scaling "no step_vith14.json"
    fi
    ;;
  deepspeed)
    gpu_tests pytest_deepspeed 70 tests/test_deepspeed.py
    if [ "$CUDA" = 1 ]; then
      deepspeed_step 2 100 --warmup 2 --steps 6 --batches 2
      fsdp2_step 100 --warmup 2 --steps 6 --batches 2
      deepspeed_step 3 70 --warmup 2 --steps 6 --batches 2
    else
      # On a CPU DeepSpeed first JIT-builds a shared-memory op (a minute, and a build killed by a
      # time limit leaves a lock that stalls every later one); tests/test_deepspeed.py runs the engine there.
      skip deepspeed_zero2 "no CUDA"
      skip fsdp2 "no CUDA (tests/test_fsdp2.py runs the engine on the CPU)"
      skip deepspeed_zero3 "no CUDA"
    fi
    ;;
  ablation)
    if [ "$CUDA" = 1 ]; then
      run_part ablation 200 4 "$PY" -m profiling.bench_step --ablation --warmup 3 --steps 6 --phase-steps 2 \
        --out "$W" --tag ablation --record "$APPEND" "${LABEL[@]}"
    else
      run_part ablation 150 4 "$PY" -m profiling.bench_step "${TINY[@]}" --ablation --warmup 1 --steps 2 \
        --phase-steps 0 --batches 2 --out "$W" --tag ablation --record "$APPEND" "${LABEL[@]}"
    fi
    gpu_tests pytest_step 60 tests/test_speed.py tests/test_bench.py tests/test_device_feed.py tests/test_target_copy.py \
      tests/test_fp8.py tests/test_fused_epilogue.py
    ;;
  kernels)
    if [ "$CUDA" != 1 ]; then
      run_part masked_gather 60 3 "$PY" -m profiling.bench_masked_gather --device cpu --size tiny --reps 3 \
        --json "$W/masked_gather.json"
      run_part ema 60 3 "$PY" -m profiling.bench_ema --device cpu --size tiny --reps 3 --json "$W/ema.json"
    elif [ "$TRITON_OK" = 1 ]; then
      run_part masked_gather 90 3 "$PY" -m profiling.bench_masked_gather --size vith14 --json "$W/masked_gather.json"
      run_part ema 60 3 "$PY" -m profiling.bench_ema --size vith14 --json "$W/ema.json"
    else
      skip masked_gather "Triton launch $TRITON"
      skip ema "Triton launch $TRITON"
    fi
    ;;
  attention)
    if [ "$CUDA" = 1 ]; then
      run_part attention 150 3 "$PY" -m profiling.bench_attention --json "$W/attention.json" --record "$APPEND"
    else
      run_part attention 60 3 "$PY" -m profiling.bench_attention --device cpu --models vitb16 --reps 2 \
        --json "$W/attention.json"
    fi
    ;;
  data)
    LOADERS=(pytorch)
    if [ "$DALI" = 1 ]; then
      gpu_tests pytest_dali 60 tests/test_dali.py tests/test_shard.py
    else
      skip pytest_dali "nvidia-dali does not import"
    fi
    if [ "$CUDA" = 1 ]; then
      [ "$DALI" = 1 ] && LOADERS+=(dali-gpu)
      run_part data 120 4 "$PY" -m profiling.bench_data --loaders "${LOADERS[@]}" --workers 4 8 --num-images 512 \
        --batch-size 128 --steps 8 --repeats 1 --json "$W/data.json"
    else
      [ "$DALI" = 1 ] && LOADERS+=(dali-cpu)
      run_part data 90 4 "$PY" -m profiling.bench_data --quick --loaders "${LOADERS[@]}" --json "$W/data.json"
    fi
    ;;
esac
