#!/usr/bin/env bash
# Every GPU check the project owes, in one device call (about 9 minutes on an H100): the sm_90 compile check, the
# whole test suite on CUDA, then the kernel, generation, end-to-end GRPO and classic-RLHF (sft/rm/ppo/dpo)
# benchmarks. Logs and JSON go to $OUT (or ./gpu_out; at most 8 files come back from the device tool); each step has
# its own time limit so that one slow step cannot starve the rest.
#
#     bash bench/gpu_checks.sh                 # on the GPU box, from the repository root
#     STEPS="pytest kernels" bash bench/gpu_checks.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
STEPS=${STEPS:-"env compile pytest kernels generate e2e rlhf"}
# The HH data lives beside the checkout (../shared), which does not travel to the GPU box: copy it into an ignored
# folder of the checkout and point HH_DATA at it there.
HH_DATA=${HH_DATA:-../shared/data/hh-rlhf/harmless-base-test.jsonl.gz}
summary=()

step() {  # step NAME SECONDS CMD...: run CMD under a time limit, log to $OUT/NAME.log, remember its exit code
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    summary+=("$name rc=$rc $((SECONDS - t0))s")
}

for s in $STEPS; do
    case $s in
        env) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
             python3 -c "import torch, triton, transformers; \
print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" ;;
        compile) step compile 90 python3 tests/gpu_compile_check.py ;;
        pytest) step pytest 200 python3 -m pytest -q -n 8 -p no:cacheprovider -m "not slow" tests/kernels tests/engine ;;
        kernels) step kernels 150 python3 bench/bench_kernels.py --size gpu --rep-ms 100 --out "$OUT/kernels.json" ;;
        generate) step generate 90 python3 bench/bench_generate.py --out "$OUT/generate.json" ;;
        e2e) step e2e 120 python3 bench/bench_e2e.py --steps 3 --out "$OUT/e2e.json" ;;
        rlhf) step rlhf 300 python3 bench/bench_rlhf.py --data "$HH_DATA" --out "$OUT/rlhf.json" ;;
        *) echo "unknown step $s"; exit 2 ;;
    esac
done
echo "=== summary"
printf '%s\n' "${summary[@]}"
