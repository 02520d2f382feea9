#!/usr/bin/env bash
# What a lent GPU machine runs for issue #13: every stage in one call of at most ~8 minutes (the budgets below
# sum to 475 s; each step runs under `timeout`, and a failed or timed-out step does not stop the later ones; a
# step may also use what earlier steps left of their budgets, so the total holds).
#
#   bash bench/gpu_suite.sh [OUTDIR]      OUTDIR: default $OUT on the device machine, else bench/results/gpu-run
#
# stage     budget  what                                                                     writes (OUTDIR)
# env         30 s  nvidia-smi, versions, device-to-device copy bandwidth (1 and 4 GiB);     env.txt
#                   the carried wheels installed (10)
# tests       95 s  tests/test_cuda.py: every built-in and flag variant (fp32, bf16), groups  tests.log
#                   that disagree on flags, master weights, 1000 tensors, the factored
#                   optimizers (2-D/3-D/odd, rows wider than a block) against the eager torch
#                   oracle on the GPU; LAMB in a CUDA graph with a scheduler's lr tensor;
#                   GradScaler's skipped step (pytest -n 8 where pytest-xdist is there)
# sanitize    95 s  one LAMB and one NVLAMB step, small model (bench/gpu_checks.py step):     sanitizer.log
#                   plain (compiles, 15), compute-sanitizer racecheck (40), memcheck (40)
# bench      255 s  optgen bench, one run per part, merged into one report:                 bench.log, bench.json,
#                   adamw,lamb,lars,nvlamb with their peers on bert-large (45),              bench.png
#                   gpt2-small (35), synthetic:1e9 (55); lamb 'optgen autotuned' (40: its
#                   first step is the tuning, launch_config the chosen config) and
#                   'torch.compile(generated)' (40: first step = compile) on gpt2-small;
#                   adafactor,came on gpt2-small (30); merge and plot (10)
# Each step's exit status, wall time and budget: suite.txt (7 files in all).
#
# OPTGEN_SUITE_DEVICE=cpu: the dry run of a machine without a GPU (the CUDA steps say 'skipped: no CUDA', tests
# are only collected, bench measures tiny sets). OPTGEN_SUITE_STAGES=env,bench runs some stages only (a rerun);
# OPTGEN_SUITE_MODELS replaces the three sets of the main bench runs; OPTGEN_SUITE_ARGS adds arguments to every
# bench run. Runs from a source checkout (no install) with the
# machine's python3 (torch, triton, sympy, jinja2, pytest; timm is there). Peers it lacks (pytorch-optimizer,
# torch-optimizer with pytorch-ranger, came-pytorch) come as wheels in .whl/ (see bench/README.md), installed
# --no-index into a private folder. Back here: cp bench.json bench/results/<gpu>-<date>.json, the same for .png.
set -uo pipefail
out=${1:-${OUT:-bench/results/gpu-run}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here" || exit 1
device=${OPTGEN_SUITE_DEVICE:-cuda}
stages=",${OPTGEN_SUITE_STAGES:-env,tests,sanitize,bench},"
work=$(mktemp -d /tmp/optgen-suite.XXXXXX)
# fresh caches for generated code, autotuning, Triton and Inductor, one set per stage: the bench's first steps
# compile (on its first set; later sets find Triton's disk cache), whatever ran before, a rerun too
caches() { export OPTGEN_CACHE_DIR="$work/$1/optgen" TRITON_CACHE_DIR="$work/$1/triton" TORCHINDUCTOR_CACHE_DIR="$work/$1/inductor"; }
caches env
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
py=${PYTHON:-python3}  # the interpreter with torch (the test of the dry run passes its own)
started=$(date +%s%N)
: >"$out/suite.txt"

note() { echo "$*" | tee -a "$out/suite.txt"; }

budgeted=0  # the budgets of the steps run so far, seconds: every step ends by then (plus timeout's 5 s grace)
# run NAME BUDGET LOG CMD...: CMD under `timeout`, its output appended to LOG (and shown); one line in suite.txt.
# A step may use the time earlier steps left unused (they finished early): its limit is BUDGET plus that, so
# the later steps keep their whole budgets and the suite its total.
run() {
    local name=$1 budget=$2 log=$3 t0 rc ms status saved limit
    shift 3
    t0=$(date +%s%N)
    saved=$((budgeted - (t0 - started) / 1000000000))
    [ "$saved" -gt 0 ] || saved=0
    limit=$((budget + saved))
    budgeted=$((budgeted + budget))
    echo "== $name (budget ${budget} s + ${saved} s left by earlier steps): $*" | tee -a "$log"
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    ms=$((($(date +%s%N) - t0) / 1000000))
    case $rc in 0) status=ok ;; 124 | 137) status=TIMEOUT ;; *) status=FAILED ;; esac
    echo "== $name: $status (exit $rc) in $((ms / 1000)).$((ms % 1000 / 100)) s" | tee -a "$log"
    printf '%-22s %-8s exit %-4s %6d.%d s of %4d s (+%d)\n' "$name" "$status" "$rc" $((ms / 1000)) $((ms % 1000 / 100)) "$budget" "$saved" >>"$out/suite.txt"
    return "$rc"
}

skip() {  # NAME LOG REASON
    echo "== $1: skipped: $3" | tee -a "$2"
    printf '%-22s skipped: %s\n' "$1" "$3" >>"$out/suite.txt"
}

want() { [[ $stages == *",$1,"* ]]; }

# -- 1. env ----------------------------------------------------------------------------------------------------
if want env; then
    log="$out/env.txt"
    : >"$log"
    {
        date -u
        git rev-parse --short HEAD 2>/dev/null && echo "$(git status --porcelain | wc -l) changed file(s)"
        nvidia-smi || echo "nvidia-smi: not available"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv 2>/dev/null
        command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -n 2
        nproc
    } 2>&1 | tee -a "$log"
    if ls "$here"/.whl/*.whl >/dev/null 2>&1; then
        run wheels 10 "$log" $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$work/site" "$here"/.whl/*.whl && export PYTHONPATH="$PYTHONPATH:$work/site"
    fi
    run env 20 "$log" $py bench/gpu_checks.py env "$device"
elif ls "$here"/.whl/*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
        "$here"/.whl/*.whl && export PYTHONPATH="$PYTHONPATH:$work/site"
fi

# -- 2. correctness on the device ------------------------------------------------------------------------------
if want tests; then
    log="$out/tests.log"
    caches tests
    : >"$log"
    if [ "$device" = cuda ]; then
        parallel=()
        $py -c 'import xdist' 2>/dev/null && parallel=(-n 8)
        run tests 95 "$log" $py -m pytest -p no:cacheprovider -v -rfEs --durations=15 "${parallel[@]}" tests/test_cuda.py
    else
        run tests-collect 60 "$log" $py -m pytest -p no:cacheprovider -q --collect-only tests/test_cuda.py
        skip tests "$log" "no CUDA (collected only)"
    fi
fi

if want sanitize; then
    log="$out/sanitizer.log"
    caches sanitize
    : >"$log"
    run sanitize-plain 15 "$log" $py bench/gpu_checks.py step "$device"
    if [ "$device" != cuda ]; then
        skip sanitize "$log" "no CUDA"
    elif ! command -v compute-sanitizer >/dev/null; then
        skip sanitize "$log" "compute-sanitizer not on the PATH"
    else
        # --error-exitcode: a hazard or bad access fails the step; memcheck without torch's caching allocator,
        # so that an access past a tensor's end leaves its own allocation
        run racecheck 40 "$log" compute-sanitizer --tool racecheck --error-exitcode 9 --print-limit 20 \
            $py bench/gpu_checks.py step cuda
        run memcheck 40 "$log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
            --error-exitcode 9 --print-limit 20 $py bench/gpu_checks.py step cuda
    fi
fi

# -- 3. bench ----------------------------------------------------------------------------------------------------
if want bench; then
    log="$out/bench.log"
    caches bench
    : >"$log"
    mkdir -p "$work/parts"
    slow="optgen autotuned,torch.compile(generated)"  # GPU-only rows that start slowly: runs of their own
    if [ "$device" = cuda ]; then
        models=${OPTGEN_SUITE_MODELS:-bert-large,gpt2-small,synthetic:1e9}
        args=(${OPTGEN_SUITE_ARGS:-})
    else
        models=${OPTGEN_SUITE_MODELS:-tiny-transformer,many-small,synthetic:200000}
        args=(--rounds 2 --warmup 1 --sample-ms 2 ${OPTGEN_SUITE_ARGS:-})
    fi
    part=0
    bench() {  # NAME BUDGET bench-arguments...
        local name=$1 budget=$2
        shift 2
        part=$((part + 1))
        run "bench-$name" "$budget" "$log" $py -m optgen.cli bench --device "$device" "$@" "${args[@]}" \
            --json "$work/parts/$part-$name.json"
    }
    for model in ${models//,/ }; do  # one run per set: a set that outruns its budget costs only its own rows
        case $model in gpt2-small | many-small) budget=35 ;; synthetic:1e9 | synthetic:200000) budget=55 ;; *) budget=45 ;; esac
        bench "${model//:/-}" "$budget" --model "$model" --optimizers adamw,lamb,lars,nvlamb --skip-impls "$slow"
    done
    if [ "$device" = cuda ]; then
        bench autotuned 40 --model gpt2-small --optimizers lamb --impls "optgen autotuned"
        bench compiled 40 --model gpt2-small --optimizers lamb --impls "torch.compile(generated)"
        bench factored 30 --model gpt2-small --optimizers adafactor,came --skip-impls "$slow"
    else
        skip bench-autotuned "$log" "no CUDA (GPU-only row)"
        skip bench-compiled "$log" "no CUDA (GPU-only row)"
        bench factored 30 --model tiny-transformer --optimizers adafactor,came
    fi
    if ls "$work"/parts/*.json >/dev/null 2>&1; then
        run bench-merge 10 "$log" $py -m optgen.cli bench --merge $(ls "$work"/parts/*.json | sort -V) \
            --json "$out/bench.json" --plot "$out/bench.png"
    else
        skip bench-merge "$log" "no bench part finished"
    fi
fi

ms=$((($(date +%s%N) - started) / 1000000))
note "total $((ms / 1000)).$((ms % 1000 / 100)) s ($device); outputs in $out: $(ls "$out" | tr '\n' ' ')"
rm -rf "$work"
grep -qE ' (FAILED|TIMEOUT) ' "$out/suite.txt" && exit 1
exit 0
