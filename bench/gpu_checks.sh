#!/usr/bin/env bash
# Every GPU check the project owes, in one device call (at most BUDGET_S = 500 s of steps): the sm_90 compile check,
# the compiled extension's build with its CUDA kernels, the whole test suite on CUDA (the fused decode kernels,
# CUDA-graph replay vs eager, no host sync inside a replay, the CUDA race_sample), then the kernel, launch-count,
# generation (static buffers + CUDA graphs vs eager, fused q/k/v + gate/up projections vs separate; batch 1; G = 16
# with 1,024-token prompts, shared prefix on/off), decode host time, the fused draw (eager vs Triton vs CUDA C++),
# end-to-end GRPO (with the rollout/trainer log-prob gap), FSDP2 sharding with bf16 mixed precision on one GPU,
# packed vs padded policy updates (GSM8K shapes), and classic-RLHF (sft/rm/ppo/dpo) benchmarks. Logs and
# JSON go to $OUT (or ./gpu_out), packed at the end into $OUT/gpu_checks.tgz (the device tool brings back at most 8
# files; PACK=0 leaves them loose); each step has its own time limit so that one slow step cannot starve the rest.
#
#     bash bench/gpu_checks.sh                 # on the GPU box, from the repository root
#     STEPS="pytest kernels" bash bench/gpu_checks.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Most owed first: the suite, then the generator's numbers; what does not fit BUDGET_S (seconds, the device tool's
# 10-minute command limit less a margin) is skipped and named in the summary, never cut mid-step.
STEPS=${STEPS:-"env compile ext pytest launches generate generate_b1 shared_prefix decode_host sampler e2e fsdp packing kernels rlhf peers"}
BUDGET_S=${BUDGET_S:-500}
# The HH data lives beside the checkout (../shared), which does not travel to the GPU box: copy it into an ignored
# folder of the checkout and point HH_DATA at it there.
HH_DATA=${HH_DATA:-../shared/data/hh-rlhf/harmless-base-test.jsonl.gz}
GSM8K_DATA=${GSM8K_DATA:-../shared/data/gsm8k}
summary=()

step() {  # step NAME SECONDS CMD...: run CMD under a time limit, log to $OUT/NAME.log, remember its exit code
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    if (( SECONDS + limit > BUDGET_S )); then  # it might not finish inside the budget: leave it for the next call
        echo "=== $name skipped: ${SECONDS}s used, its limit ${limit}s would pass BUDGET_S=${BUDGET_S}"
        summary+=("$name skipped (budget)")
        return
    fi
    echo "=== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    summary+=("$name rc=$rc $((SECONDS - t0))s")
}

for s in $STEPS; do
    case $s in
        env) python3 -c "import pydantic" 2>/dev/null || pip install --no-index --find-links .wheels pydantic \
                 || echo "pydantic missing: run bench/fetch_gpu_wheels.sh here and carry .wheels"
             nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
             python3 -c "import torch, triton, transformers; \
print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" ;;
        compile) step compile 60 python3 tests/gpu_compile_check.py ;;
        ext) step ext 180 python3 -m kernels ;;  # the compiled extension, CUDA kernels included
        pytest) step pytest 240 python3 -m pytest -q -n 8 -p no:cacheprovider -m "not slow" tests/kernels tests/engine ;;
        kernels) step kernels 120 python3 bench/bench_kernels.py --size gpu --rep-ms 100 --out "$OUT/kernels.json" ;;
        launches) step launches 40 python3 bench/count_launches.py --out "$OUT/launches.json" ;;
        generate) step generate 120 python3 bench/bench_generate.py --compare-eager --compare-fused-projections \
                      --max-model-len 1024 --out "$OUT/generate.json" ;;
        generate_b1) step generate_b1 45 python3 bench/bench_generate.py --prompts 1 --n 1 --max-tokens 512 \
                      --compare-eager --max-model-len 1024 --no-hf --out "$OUT/generate_b1.json" ;;
        shared_prefix) step shared_prefix 60 python3 bench/bench_generate.py --prompts 4 --n 16 --prompt-len 1024 \
                      --max-tokens 256 --max-model-len 2048 --compare-shared-prefix --enforce-eager --no-hf \
                      --out "$OUT/shared_prefix.json" ;;
        decode_host) step decode_host 30 python3 bench/bench_decode_host.py --out "$OUT/decode_host.json" ;;
        sampler) step sampler 60 python3 bench/bench_sampler.py --out "$OUT/sampler.json" ;;
        e2e) step e2e 60 python3 bench/bench_e2e.py --steps 3 --out "$OUT/e2e.json" ;;
        fsdp) step fsdp 60 python3 bench/fsdp_check.py --out "$OUT/fsdp.json" ;;  # FSDP2 + bf16 on one GPU (NCCL)
        packing) step packing 60 python3 bench/bench_packing.py --device cuda --repeats 5 --data "$GSM8K_DATA" \
                     --out "$OUT/packing.json" ;;  # issue 14: packed vs padded update time
        # issue 15; packed vs padded has its own step (packing), so ours_packed is left out to fit the limit
        peers) step peers 480 python3 bench/bench_peers.py --device cuda --data "$GSM8K_DATA" --repeats 3 \
                   --gen-repeats 2 --loss-reps 3 --no-ours-packed --out "$OUT/peers_gpu.json" \
                   --png "$OUT/peers_gpu.png" ;;
        rlhf) step rlhf 300 python3 bench/bench_rlhf.py --data "$HH_DATA" --out "$OUT/rlhf.json" ;;
        *) echo "unknown step $s"; exit 2 ;;
    esac
done
echo "=== summary"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
# The device tool brings back at most 8 files: with PACK=1 (the default) everything is packed into one archive.
if [ "${PACK:-1}" = 1 ]; then
    tar -czf "$OUT.tgz" -C "$OUT" . && rm -rf "${OUT:?}"/* && mv "$OUT.tgz" "$OUT/gpu_checks.tgz"
    echo "packed into $OUT/gpu_checks.tgz (tar -xzf it under bench/results/)"
fi
