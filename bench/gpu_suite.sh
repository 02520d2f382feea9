#!/usr/bin/env bash
# What a lent GPU machine must measure for issue #5, in calls that each fit a 10-minute limit.
#
#   bash bench/gpu_suite.sh STAGE [OUTDIR]     STAGE: env | tests | bench-small | bench-large | all
#
# OPTGEN_SUITE_SMALL / OPTGEN_SUITE_LARGE (comma lists of models) and OPTGEN_SUITE_OPTIMIZERS split a stage
# that would outrun one call (first steps compile: Inductor for the torch.compile row, Triton and the tuning
# for the optgen rows; none of it has been timed on a GPU yet).
# Runs from a source checkout (no install: optgen finds templates/ and generated/ beside the package) with
# the machine's own python3 (torch + triton + sympy + jinja2 + pytest). Peers that are not installed there
# (pytorch-optimizer, torch-optimizer, bitsandbytes, DeepSpeed) are listed as skipped with the reason; to
# measure them, download their wheels into .whl/ here first (see the device tool's README) and carry .whl.
# Each stage writes into OUTDIR (default: $OUT on the device machine, else bench/results/gpu-run):
#   env.txt, tests.log, <stage>.json/.png/.log. Back here, one report for the issue:
#   optgen bench --merge bench-small.json bench-large.json --json bench/results/<gpu>-<date>.json \
#       --plot bench/results/<gpu>-<date>.png
# The GPU targets the results are read against: AdamW >= 1.0x torch fused; LAMB >= 1.5x the fastest peer
# and >= 85% of the copy bandwidth at >= 100M parameters; first step <= 5 s on bert-large (first_step_s
# of the 'optgen' row; the 'optgen autotuned' row's first step includes the tuning).
set -uo pipefail
stage=${1:?stage: env, tests, bench-small, bench-large or all}
out=${2:-${OUT:-bench/results/gpu-run}}
mkdir -p "$out"
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d "$here/.whl" ] && ls "$here"/.whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$here"/.whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
device=${OPTGEN_SUITE_DEVICE:-cuda}  # cpu: a dry run of this script on a machine without a GPU
optimizers=${OPTGEN_SUITE_OPTIMIZERS:-adamw,lamb,lars,nvlamb}  # a stage over 10 minutes: split it by optimizers or models

run_env() {
    {
        date -u
        nvidia-smi 2>&1 || true
        python3 - <<'EOF'
import platform, torch, triton, sympy
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__, "sympy", sympy.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(), f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs", "capability", torch.cuda.get_device_capability())
EOF
    } 2>&1 | tee "$out/env.txt"
}

run_tests() {
    # the CUDA tests (skipped on CPU machines) and the AOT compile of every generated kernel
    # TRITON_INTERPRET=0: conftest defaults to the interpreter, which cannot run CUDA tensors
    TRITON_INTERPRET=0 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_aot.py 2>&1 | tee "$out/tests.log"
}

run_bench() {  # name, models
    python3 -m optgen.cli bench --device "$device" --model "$2" --optimizers "$optimizers" \
        ${OPTGEN_SUITE_ARGS:-} --json "$out/$1.json" --plot "$out/$1.png" 2>&1 | tee "$out/$1.log"
}

case "$stage" in
    env) run_env ;;
    tests) run_tests ;;
    bench-small) run_bench bench-small "${OPTGEN_SUITE_SMALL:-synthetic:4000000,resnet50,bert-base-like,vit-b32}" ;;
    bench-large) run_bench bench-large "${OPTGEN_SUITE_LARGE:-bert-base,gpt2-small,bert-large}" ;;
    all) run_env && run_tests && run_bench bench-small "${OPTGEN_SUITE_SMALL:-synthetic:4000000,resnet50,bert-base-like,vit-b32}" \
        && run_bench bench-large "${OPTGEN_SUITE_LARGE:-bert-base,gpt2-small,bert-large}" ;;
    *) echo "unknown stage: $stage (env, tests, bench-small, bench-large, all)" >&2; exit 2 ;;
esac
