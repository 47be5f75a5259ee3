#!/usr/bin/env bash
# gpu_check.sh: one bounded run of everything meshplan does on a GPU, on a bare machine.
#
#   bash benchmarks/gpu_check.sh --out DIR [--device cuda|cpu] [--wheels DIR] [--python PY]
#                                [--budget-s 480] [--work DIR]
#
# Steps (each bounded with `timeout`, all under one overall deadline; a step that fails or runs
# out of time is recorded and the next one runs):
#   0  install   use the interpreter as it is when meshplan and its solvers import, else install
#                the wheels of --wheels with `pip --no-index --no-deps --target` into the scratch
#                directory (never into the system);
#   1  pytest    the `gpu`-marked tests, one pytest process per test (skipped on --device cpu:
#                without CUDA every one of them would skip);
#   2  profile   `meshplan profile --quick` (a Llama of 1.2 B parameters on CUDA, tiny-llama on
#                CPU);
#   3  validate  `meshplan validate` of single-device configurations (micro-batch x recompute),
#                once per dtype: measured step time and peak memory;
#   4a memcheck  `meshplan memcheck PLAN --json` of every validated plan ("unavailable" when the
#                command does not exist);
#   4b estimate  `meshplan estimate --json` of the same configurations, analytic and with the
#                step-2 profile;
#   5  overhead  benchmarks/executor_overhead.py (executor vs a plain PyTorch loop) and its MFU.
#
# DIR receives at most 8 plain files, so that a results folder fetched back from a remote
# machine with a file-count limit arrives whole: summary.md, summary.json (both written by
# benchmarks/gpu_check_summary.py after every step), gpu_check.log (every step's output),
# profile.json, validation-<dtype>.json and work.tar.gz (the scratch directory: plans, metrics,
# per-run logs, pictures). Exit status: 0 when the run reached its summary (step failures are
# data, read them from the summary), 2 for bad options.

# The step functions are called by name through run_step, which shellcheck cannot follow.
# shellcheck disable=SC2329

# No `set -e`: a failing step is a result to record, not a reason to stop.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=""
DEVICE="cuda"
WHEELS=""
PY="${MESHPLAN_PYTHON:-}"
BUDGET_S=480
# Plans memcheck checks (the CPU branch lowers it, see configure).
MEMCHECK_MAX_PLANS=1000
WORK=""
# Seconds kept back from the overall deadline for the summary and the tarball.
RESERVE_S=15

usage() {
  sed -n '2,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

die_usage() {
  echo "error: $*" >&2
  usage >&2
  exit 2
}

parse_args() {
  while (($#)); do
    case "$1" in
      --out) OUT="${2:-}"; shift 2 || die_usage "--out needs a directory" ;;
      --device) DEVICE="${2:-}"; shift 2 || die_usage "--device needs cuda or cpu" ;;
      --wheels) WHEELS="${2:-}"; shift 2 || die_usage "--wheels needs a directory" ;;
      --python) PY="${2:-}"; shift 2 || die_usage "--python needs an interpreter" ;;
      --budget-s) BUDGET_S="${2:-}"; shift 2 || die_usage "--budget-s needs seconds" ;;
      --work) WORK="${2:-}"; shift 2 || die_usage "--work needs a directory" ;;
      -h | --help) usage; exit 0 ;;
      *) die_usage "unknown option '$1'" ;;
    esac
  done
  [[ -n "$OUT" ]] || die_usage "--out DIR is required"
  [[ "$DEVICE" == cuda || "$DEVICE" == cpu ]] || die_usage "--device '$DEVICE': use cuda or cpu"
  if ! [[ "$BUDGET_S" =~ ^[0-9]+$ ]] || ((BUDGET_S <= RESERVE_S)); then
    die_usage "--budget-s '$BUDGET_S': a whole number of seconds above $RESERVE_S"
  fi
  if [[ -n "$WHEELS" && ! -d "$WHEELS" ]]; then die_usage "--wheels '$WHEELS' is not a directory"; fi
  # Resolve before the `cd "$REPO"` below, so relative paths mean the caller's directory.
  mkdir -p "$OUT" || die_usage "--out '$OUT' cannot be created"
  OUT="$(cd "$OUT" && pwd)"
  if [[ -n "$WHEELS" ]]; then WHEELS="$(cd "$WHEELS" && pwd)"; fi
  if [[ -n "$WORK" ]]; then
    mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)"
    KEEP_WORK=1
  else
    # Outside OUT: the scratch holds hundreds of files, OUT gets them as one tarball.
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
    KEEP_WORK=0
  fi
}

# Sizes per device. CUDA: Llama-3.2-1B's shape (meta-llama/Llama-3.2-1B config.json: 16 layers,
# hidden 2048, 32 heads, 8 KV heads, SwiGLU 8192, vocab 128256, tied embeddings), 1.24 B
# parameters; global batch 4 x 2048 tokens keeps an fp32 step near a second on one H200.
# CPU: the tiny presets and 32 tokens, so the whole run stays near two minutes on 2 cores.
set_sizes() {
  if [[ "$DEVICE" == cuda ]]; then
    MODEL="$WORK/llama-1b.yaml"
    cat >"$MODEL" <<'EOF'
# Llama-3.2-1B's shape (meta-llama/Llama-3.2-1B config.json), 1.24 B parameters.
{family: llama, layers: 16, hidden: 2048, heads: 32, kv_heads: 8, ffn_hidden: 8192, vocab: 128256, max_seq_len: 2048, tied_embeddings: true}
EOF
    SEQ=2048 GLOBAL_BATCH=4 STEPS=5 WARMUP=2 RUN_TIMEOUT_S=90
    # micro-batch:recompute pairs, each validated in every dtype: 4 x 2 = 8 configurations.
    CONFIGS="1:none 1:full 4:none 4:full"
    DTYPES="bf16 fp32"
    PROFILE_ARGS=(--device cuda --nproc 1 --quick --micro-batches '1,4' --budget-s 45)
    # ~0.9 B parameters in the benchmark's own GPT shape (GELU, LayerNorm, learned positions).
    BENCH_ARGS=(--layers 16 --hidden 2048 --heads 16 --vocab 32000 --seq 1024 --batch 8
      --micro-batch 4 --steps 8 --warmup 2 --repeats 2)
    PER_TEST_S=60
    # Step limits (s); they add up to a little more than the 480 s budget, whose deadline
    # takes what the last step would overrun.
    LIMITS=([pytest]=75 [profile]=70 [validate]=200 [memcheck]=45 [estimate]=30 [overhead]=60)
    cat >"$WORK/cluster.yaml" <<'EOF'
# One H200 (presets/gpus.yaml H200-141GB) alone: no intra-node peers; links as dgx-h200's.
name: h200x1
node_types:
  h200-1:
    gpu: H200-141GB
    gpus: 1
    intra_link: {name: nvlink4, bandwidth_gb_per_s: 450, latency_us: 2}
    nic: {name: ndr-ib, bandwidth_gb_per_s: 50, latency_us: 5}
    nics: 1
nodes:
  - {type: h200-1}
EOF
  else
    MODEL="tiny-llama"
    SEQ=32 GLOBAL_BATCH=2 STEPS=3 WARMUP=1 RUN_TIMEOUT_S=90
    # Each CPU configuration is a torchrun start (5-30 s on 2 busy cores): two per dtype still
    # cover both micro-batch sizes, both recompute modes and both dtypes.
    CONFIGS="1:none 2:full"
    DTYPES="fp32 bf16"
    # One worker, as the one-worker cluster runs: a CPU profile is refused for a cluster whose
    # nodes run another number of workers (they share the host's cores differently).
    # memcheck starts a fresh process per plan (~25 s on 2 busy cores): one plan keeps the
    # CPU run inside its 2 minutes; on CUDA every validated plan is checked.
    MEMCHECK_MAX_PLANS=1
    PROFILE_ARGS=(--device cpu --nproc 1 --quick --micro-batches '1,2' --budget-s 10)
    BENCH_ARGS=(--layers 2 --hidden 64 --heads 4 --vocab 512 --seq 32 --batch 4
      --micro-batch 2 --steps 6 --warmup 2 --repeats 1)
    PER_TEST_S=60
    # Wider than on CUDA: a shared 2-core host may be several times slower than when idle.
    LIMITS=([pytest]=60 [profile]=90 [validate]=240 [memcheck]=240 [estimate]=60 [overhead]=90)
    cat >"$WORK/cluster.yaml" <<'EOF'
# One CPU worker (gloo), links as the cpu-2 preset's (presets/clusters.yaml).
name: cpu-1
node_types:
  cpu-1:
    gpu: cpu-worker
    gpus: 1
    intra_link: {name: loopback, bandwidth_gb_per_s: 2, latency_us: 30}
    nic: {name: tcp, bandwidth_gb_per_s: 1, latency_us: 50}
    nics: 1
nodes:
  - {type: cpu-1}
EOF
  fi
  {
    for pair in $CONFIGS; do
      echo "- {tp: 1, pp: 1, dp: 1, micro_batch: ${pair%%:*}, recompute: ${pair##*:}}"
    done
  } >"$WORK/configs.yaml"
}

# ------------------------------------------------------------------ time and step bookkeeping

START_S=$SECONDS
STEP_END_S=0
declare -A LIMITS

# Seconds left for the current step: its own limit, cut by the overall deadline.
left_s() {
  local overall=$((START_S + BUDGET_S - RESERVE_S - SECONDS))
  local step=$((STEP_END_S - SECONDS))
  echo $((step < overall ? step : overall))
}

# Run a command with what is left of the step's time, optionally capped lower by $1 seconds.
# Returns the command's status, 124 when `timeout` stopped it or no time was left.
bounded() {
  local cap=$1 left
  shift
  left=$(left_s)
  ((cap < left)) && left=$cap
  if ((left < 2)); then
    echo "[gpu_check] no time left for: $*"
    return 124
  fi
  # --kill-after: torchrun and its workers get SIGTERM first (they clean up), then SIGKILL.
  timeout --kill-after=10 "$left" "$@"
}

# One line per step in steps.tsv: id, name, status, seconds, detail (the summary reads it).
record() {
  local id=$1 name=$2 status=$3 seconds=$4 detail=$5
  detail="${detail//$'\t'/ }"
  detail="${detail//$'\n'/ }"
  printf '%s\t%s\t%s\t%s\t%s\n' "$id" "$name" "$status" "$seconds" "$detail" >>"$WORK/steps.tsv"
  printf '[gpu_check] step %-3s %-9s %-11s %4ss  %s\n' "$id" "$name" "$status" "$seconds" "$detail" >&2
}

# run_step ID NAME LIMIT_S FUNCTION: the function sets STEP_STATUS and STEP_DETAIL; its output
# goes to logs/ID-NAME.log and is appended to OUT/gpu_check.log straight away, so a run killed
# from outside still leaves every finished step's log behind.
run_step() {
  local id=$1 name=$2 limit=$3 fn=$4 t0=$SECONDS log="$WORK/logs/$1-$2.log"
  STEP_STATUS="failed" STEP_DETAIL=""
  STEP_END_S=$((SECONDS + limit))
  if (($(left_s) < 5)); then
    record "$id" "$name" skipped 0 "overall deadline of ${BUDGET_S}s reached"
    return
  fi
  echo "[gpu_check] step $id $name (limit ${limit}s;" \
    "$((START_S + BUDGET_S - SECONDS))s of the ${BUDGET_S}s budget left)" >&2
  "$fn" >"$log" 2>&1
  record "$id" "$name" "$STEP_STATUS" $((SECONDS - t0)) "$STEP_DETAIL"
  {
    echo "======== step $id $name: $STEP_STATUS ($((SECONDS - t0)) s)"
    cat "$log"
  } >>"$OUT/gpu_check.log"
  summarize --quiet
}

summarize() {
  "$PY" "$REPO/benchmarks/gpu_check_summary.py" --work "$WORK" --out "$OUT" \
    --device "$DEVICE" "$@" || echo "[gpu_check] summary helper failed (exit $?)" >&2
}

# A status from an exit code: 124/137 (timeout's TERM/KILL) is a timeout.
status_of() {
  case "$1" in
    0) echo ok ;;
    124 | 137) echo timeout ;;
    *) echo failed ;;
  esac
}

# ------------------------------------------------------------------ steps

step_install() {
  local site="$WORK/site"
  echo "python: $PY ($("$PY" --version 2>&1))"
  if "$PY" -c 'import cli.main, pulp, highspy' 2>&1; then
    STEP_STATUS=skipped STEP_DETAIL="meshplan, pulp and highspy import with $PY: nothing installed"
  elif [[ -z "$WHEELS" ]]; then
    STEP_DETAIL="meshplan's dependencies do not import with $PY and no --wheels was given"
    return
  else
    local rc whl
    if "$PY" -m pip --version; then
      # --no-index: the GPU machine has no network; --target: a private directory, so the
      # system's packages stay as they are.
      bounded 120 "$PY" -m pip install --no-index --no-deps --no-compile -q --target "$site" \
        "$WHEELS"/*.whl
      rc=$?
    else
      # No pip: a wheel is a zip of its importable tree (PEP 427), so unpacking it works for
      # these (no scripts, no data directories).
      rc=0
      for whl in "$WHEELS"/*.whl; do
        bounded 60 "$PY" -m zipfile -e "$whl" "$site" || rc=$?
      done
    fi
    export PYTHONPATH="$site:$PYTHONPATH"
    local err
    if ((rc != 0)); then
      STEP_STATUS=$(status_of "$rc") STEP_DETAIL="installing the wheels of $WHEELS: exit $rc"
    elif ! err=$("$PY" -c 'import cli.main, pulp, highspy' 2>&1); then
      STEP_DETAIL="installed $(cd "$WHEELS" && echo *.whl), but: ${err##*$'\n'}"
    else
      STEP_STATUS=ok STEP_DETAIL="installed $(cd "$WHEELS" && echo *.whl) into the scratch site"
    fi
  fi
  # The versions behind every number below.
  "$PY" - "$WORK/env.json" <<'EOF'
import json, platform, sys
from importlib import metadata
env = {"python": sys.version.split()[0], "platform": platform.platform(), "host": platform.node()}
for name in ("torch", "numpy", "pulp", "highspy", "networkx", "typer", "rich", "pyyaml"):
    try:
        env[name] = metadata.version(name)
    except metadata.PackageNotFoundError:  # a missing package is a finding, not a crash
        env[name] = "not installed"
try:
    import torch
    env["torch_cuda"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    if env["cuda_available"]:
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
except Exception as e:
    env["torch_error"] = repr(e)
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
EOF
  command -v nvidia-smi >/dev/null && bounded 20 nvidia-smi
}

step_pytest() {
  local files ids rc n passed=0 failed=0 skipped=0 timed_out=0 id out
  # Only the files that hold gpu tests: the others may import packages the GPU machine lacks
  # (hypothesis), and a collection error would stop pytest before any gpu test ran.
  mapfile -t files < <(grep -l 'mark\.gpu' "$REPO"/tests/test_*.py)
  if ((${#files[@]} == 0)); then STEP_STATUS=skipped STEP_DETAIL="no gpu-marked tests" && return; fi
  if [[ "$DEVICE" == cpu ]]; then
    # Without CUDA every gpu test skips (tests/conftest.py); not collecting them saves a torch
    # import, a quarter of a minute on a busy 2-core host.
    STEP_STATUS=skipped
    STEP_DETAIL="not run on --device cpu (gpu tests skip without CUDA): $(grep -c 'mark\.gpu' \
      "${files[@]}" | awk -F: '{n += $2} END {print n}') gpu tests in ${#files[@]} files"
    return
  fi
  out=$(bounded 60 "$PY" -m pytest -p no:cacheprovider -q --collect-only -m gpu "${files[@]}")
  rc=$?
  echo "$out"
  mapfile -t ids < <(grep '::' <<<"$out")
  n=${#ids[@]}
  if ((rc != 0 || n == 0)); then
    STEP_STATUS=$(status_of "$rc") STEP_DETAIL="collecting gpu tests: exit $rc, $n found"
    [[ $STEP_STATUS == ok ]] && STEP_STATUS=failed
    return
  fi
  # One process per test: a hung NCCL call costs one test's limit, not the step.
  for id in "${ids[@]}"; do
    echo "---- $id"
    out=$(bounded "$PER_TEST_S" "$PY" -m pytest -p no:cacheprovider -q -rs "$id" 2>&1)
    rc=$?
    echo "$out"
    if ((rc == 124 || rc == 137)); then
      timed_out=$((timed_out + 1))
    elif ((rc != 0)); then
      failed=$((failed + 1))
    elif grep -q ' passed' <<<"$out"; then
      passed=$((passed + 1))
    else
      skipped=$((skipped + 1))
    fi
  done
  STEP_DETAIL="$n gpu tests: $passed passed, $failed failed, $skipped skipped, $timed_out timed out"
  if ((failed)); then
    STEP_STATUS=failed
  elif ((timed_out)); then
    STEP_STATUS=timeout
  elif ((skipped)); then
    # On --device cuda a skipped gpu test means torch saw no CUDA device.
    STEP_STATUS=failed
  else
    STEP_STATUS=ok
  fi
}

step_profile() {
  bounded 100000 "$PY" -m cli profile "${PROFILE_ARGS[@]}" --model "$MODEL" --seq-len "$SEQ" \
    --out "$WORK/profile.json"
  local rc=$?
  STEP_STATUS=$(status_of "$rc") STEP_DETAIL="meshplan profile: exit $rc"
  if [[ -f "$WORK/profile.json" ]]; then
    cp "$WORK/profile.json" "$OUT/profile.json"
    STEP_DETAIL+="; $("$PY" "$REPO/benchmarks/gpu_check_summary.py" --describe-profile \
      "$WORK/profile.json")"
  elif ((rc == 0)); then
    STEP_STATUS=failed STEP_DETAIL+=", but no profile.json"
  fi
}

step_validate() {
  local dtype rc desc per bad=0 details=() nconf
  nconf=$(wc -w <<<"$CONFIGS")
  for dtype in $DTYPES; do
    echo "---- dtype $dtype"
    # validate writes validation.json only when it ends: a share of the time left per
    # configuration lets a slow one time out inside validate (recorded as its error) instead
    # of `timeout` killing the whole run (nothing recorded).
    per=$((($(left_s) - 20) / nconf))
    ((per > RUN_TIMEOUT_S)) && per=$RUN_TIMEOUT_S
    if ((per < 10)); then
      details+=("$dtype: not run, $(left_s)s left")
      bad=$((bad + 1)) STEP_STATUS=timeout
      continue
    fi
    bounded 100000 "$PY" -m cli validate --model "$MODEL" --cluster "$WORK/cluster.yaml" \
      --configs "$WORK/configs.yaml" --global-batch "$GLOBAL_BATCH" --seq-len "$SEQ" \
      --dtype "$dtype" --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" \
      --timeout-s "$per" --out "$WORK/validate-$dtype"
    rc=$?
    if [[ -f "$WORK/validate-$dtype/validation.json" ]]; then
      cp "$WORK/validate-$dtype/validation.json" "$OUT/validation-$dtype.json"
      # The helper exits 1 when a configuration was not measured: validate's exit 0 only
      # says that at least one was.
      if ! desc=$("$PY" "$REPO/benchmarks/gpu_check_summary.py" --describe-validation \
        "$WORK/validate-$dtype/validation.json"); then
        ((rc == 0)) && rc=1
      fi
      details+=("$dtype: $desc (exit $rc)")
    else
      details+=("$dtype: exit $rc, no validation.json")
    fi
    if ((rc != 0)); then
      bad=$((bad + 1))
      STEP_STATUS=$(status_of "$rc")
    fi
  done
  ((bad == 0)) && STEP_STATUS=ok
  STEP_DETAIL="$(printf '%s; ' "${details[@]}")"
  STEP_DETAIL="${STEP_DETAIL%; }"
}

plans() {
  local dtype
  for dtype in $DTYPES; do
    compgen -G "$WORK/validate-$dtype/plans/*.json" || true
  done
}

step_memcheck() {
  local plan name dtype rc n=0 ok=0 last=0
  "$PY" -m cli memcheck --help
  rc=$?
  if ((rc != 0)); then
    STEP_STATUS=unavailable STEP_DETAIL="memcheck not available (meshplan memcheck --help: exit $rc)"
    # Unless meshplan itself does not start: that is a failure, not a missing command.
    "$PY" -m cli --help >/dev/null || STEP_STATUS=failed STEP_DETAIL="meshplan does not start"
    return
  fi
  mkdir -p "$WORK/memcheck"
  while read -r plan; do
    [[ -n "$plan" ]] || continue
    ((n >= MEMCHECK_MAX_PLANS)) && break
    dtype=$(basename "$(dirname "$(dirname "$plan")")")
    name="${dtype#validate-}-$(basename "$plan")"
    n=$((n + 1))
    # JSON to stdout, messages to the log; exit 3 ("does not fit") still reports.
    bounded 100000 "$PY" -m cli memcheck "$plan" --json >"$WORK/memcheck/$name"
    rc=$?
    echo "$plan: exit $rc"
    if ((rc == 0 || rc == 3)); then ok=$((ok + 1)); else last=$rc; fi
  done < <(plans)
  if ((n == 0)); then
    STEP_STATUS=skipped STEP_DETAIL="no validated plans to check"
  elif ((ok == n)); then
    STEP_STATUS=ok STEP_DETAIL="$ok/$n plans checked"
    ((n == MEMCHECK_MAX_PLANS)) && STEP_DETAIL+=" (at most $MEMCHECK_MAX_PLANS on $DEVICE)"
  else
    STEP_STATUS=$(status_of "$last") STEP_DETAIL="$ok/$n plans checked (last failure: exit $last)"
    [[ $STEP_STATUS == ok ]] && STEP_STATUS=failed
  fi
}

step_estimate() {
  local dtype pair mb rcm kind rc n=0 ok=0 last=0 profile_args profiled=""
  mkdir -p "$WORK/estimate"
  # meshplan refuses a profile for another dtype than the one it was measured in, so the
  # profile-based estimate exists for that dtype only (the others are analytic only).
  [[ -f "$WORK/profile.json" ]] &&
    profiled=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["meta"]["dtype"])' \
      "$WORK/profile.json")
  for dtype in $DTYPES; do
    for pair in $CONFIGS; do
      mb=${pair%%:*} rcm=${pair##*:}
      for kind in analytic profile; do
        profile_args=()
        if [[ $kind == profile ]]; then
          [[ $dtype == "$profiled" ]] || continue
          profile_args=(--profile "$WORK/profile.json")
        fi
        n=$((n + 1))
        bounded 100000 "$PY" -m cli estimate --model "$MODEL" --cluster "$WORK/cluster.yaml" \
          --global-batch "$GLOBAL_BATCH" --seq-len "$SEQ" --tp 1 --pp 1 --micro-batch "$mb" \
          --recompute "$rcm" --dtype "$dtype" "${profile_args[@]}" --json \
          >"$WORK/estimate/$kind-$dtype-mb$mb-$rcm.json"
        rc=$?
        echo "$kind $dtype mb$mb $rcm: exit $rc"
        # Exit 3: the configuration does not fit, and the report was still printed.
        if ((rc == 0 || rc == 3)); then ok=$((ok + 1)); else last=$rc; fi
      done
    done
  done
  if ((ok == n)); then
    STEP_STATUS=ok STEP_DETAIL="$ok/$n estimates"
  else
    STEP_STATUS=$(status_of "$last") STEP_DETAIL="$ok/$n estimates (last failure: exit $last)"
    [[ $STEP_STATUS == ok ]] && STEP_STATUS=failed
  fi
  [[ -f "$WORK/profile.json" ]] || STEP_DETAIL+="; analytic only (no profile)"
  [[ -n $profiled ]] && STEP_DETAIL+="; profile-based for $profiled only (the profile's dtype)"
}

# The benchmark's model (benchmarks/executor_overhead.py `_plan`) as a model YAML, so that
# `meshplan estimate` gives the FLOPs per step and the peak behind its MFU.
bench_model_yaml() {
  local layers hidden heads vocab seq i
  local -a a=("${BENCH_ARGS[@]}")
  for ((i = 0; i < ${#a[@]}; i += 2)); do
    case "${a[i]}" in
      --layers) layers=${a[i + 1]} ;;
      --hidden) hidden=${a[i + 1]} ;;
      --heads) heads=${a[i + 1]} ;;
      --vocab) vocab=${a[i + 1]} ;;
      --seq) seq=${a[i + 1]} ;;
      --batch) BENCH_BATCH=${a[i + 1]} ;;
      --micro-batch) BENCH_MB=${a[i + 1]} ;;
    esac
  done
  BENCH_SEQ=$seq
  # ModelSpec's defaults, which the benchmark keeps: GELU, LayerNorm, learned positions, biases,
  # untied embeddings.
  echo "{name: bench, layers: $layers, hidden: $hidden, heads: $heads, kv_heads: $heads," \
    "ffn_hidden: $((4 * hidden)), vocab: $vocab, max_seq_len: $seq, mlp: gelu, norm: layernorm," \
    "position: learned, bias: true, tied_embeddings: false}" >"$WORK/bench-model.yaml"
}

step_overhead() {
  local rc dtype
  bench_model_yaml
  [[ "$DEVICE" == cuda ]] && dtype=bf16 || dtype=fp32
  bounded 100000 "$PY" "$REPO/benchmarks/executor_overhead.py" --device "$DEVICE" \
    "${BENCH_ARGS[@]}" --json >"$WORK/overhead.json"
  rc=$?
  cat "$WORK/overhead.json"
  STEP_STATUS=$(status_of "$rc") STEP_DETAIL="executor_overhead.py: exit $rc"
  if ((rc == 0)); then
    bounded 30 "$PY" -m cli estimate --model "$WORK/bench-model.yaml" \
      --cluster "$WORK/cluster.yaml" --global-batch "$BENCH_BATCH" --seq-len "$BENCH_SEQ" \
      --tp 1 --pp 1 --micro-batch "$BENCH_MB" --dtype "$dtype" --json \
      >"$WORK/overhead-estimate.json" || echo "estimate for the MFU failed (exit $?)"
    STEP_DETAIL=$("$PY" "$REPO/benchmarks/gpu_check_summary.py" --describe-overhead "$WORK") ||
      STEP_STATUS=failed
  fi
}

# ------------------------------------------------------------------ main

finish() {
  local tar_rc
  summarize --quiet
  # Everything else in one file; scratch directories of pip (site/) are not results.
  tar -czf "$OUT/work.tar.gz" -C "$(dirname "$WORK")" --exclude="$(basename "$WORK")/site" \
    --transform="s,^$(basename "$WORK"),work," "$(basename "$WORK")"
  tar_rc=$?
  ((tar_rc == 0)) || echo "[gpu_check] tar of $WORK failed (exit $tar_rc)" >&2
  summarize
  echo "[gpu_check] total $((SECONDS - START_S)) s; results in $OUT" >&2
  ((KEEP_WORK)) || rm -rf "$WORK"
}

main() {
  parse_args "$@"
  cd "$REPO" || exit 2
  # Checked here, before the install step, because the summary helper needs an interpreter.
  if [[ -z "$PY" ]]; then PY="$(command -v python3 || command -v python || true)"; fi
  if [[ -z "$PY" ]] || ! command -v "$PY" >/dev/null; then
    die_usage "no python interpreter ('$PY')"
  fi
  # The working tree first: `python -m cli` and torchrun's `-m executor.train` use this tree
  # without `pip install -e`.
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  mkdir -p "$WORK/logs"
  : >"$WORK/steps.tsv"
  : >"$OUT/gpu_check.log"
  rm -f "$OUT"/validation-*.json "$OUT/profile.json" "$OUT/work.tar.gz"
  echo "[gpu_check] device $DEVICE, budget ${BUDGET_S}s, scratch $WORK, results $OUT" >&2
  set_sizes
  trap 'record "-" interrupted failed 0 "stopped by a signal"; finish; exit 143' TERM INT
  run_step 0 install 150 step_install
  run_step 1 pytest "${LIMITS[pytest]}" step_pytest
  run_step 2 profile "${LIMITS[profile]}" step_profile
  run_step 3 validate "${LIMITS[validate]}" step_validate
  run_step 4a memcheck "${LIMITS[memcheck]}" step_memcheck
  run_step 4b estimate "${LIMITS[estimate]}" step_estimate
  run_step 5 overhead "${LIMITS[overhead]}" step_overhead
  trap - TERM INT
  finish
}

# On one line: bash reads a script as it runs, so `exit` here keeps an edit made to this file
# during a run from being executed after main returns.
{ main "$@"; exit $?; }
