#!/usr/bin/env bash
# Everything attnlower checks on a GPU, in one device call; logs under $OUT, short tables last.
#
#   bash bench/gpu_session.sh tests flash        # stages: tests accuracy flash sliding paged examples
#
# One device call is limited to 10 minutes, a session to 30: a fresh machine compiles every kernel
# again (the tests stage alone took ~200 s on 16 cores). Groups estimated from 2026-11-23 runs to fit:
#   TESTS_TIMEOUT=240 BENCH_SEQ_LENS=1024,4096,16384 bash bench/gpu_session.sh tests accuracy flash
#   EXAMPLES="gpt2 llama" bash bench/gpu_session.sh sliding paged examples
#
# tests:    the CPU kernel tests (odd shapes, masks, dropout, poisoned outputs, fp32/fp16/bf16) rerun on
#           CUDA through ATTNLOWER_TEST_DEVICE=cuda, plus the tests marked gpu (real sizes).
# flash / sliding / paged: bench/<stage>.py (ratios against SDPA and FlexAttention in the same run).
# examples: GPT-2 / Llama / Mistral through torch.compile(backend="attnlower") on the GPU vs eager.
set -uo pipefail
OUT=${OUT:-/tmp/attnlower_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || echo "pip install -e . failed (see install.log); using PYTHONPATH"
python3 -c "import torch, triton; print('device', torch.cuda.get_device_name(), '| torch', torch.__version__, \
'| triton', triton.__version__, '| cuda', torch.version.cuda)" | tee "$OUT/env.txt"
stages=${*:-tests accuracy flash sliding paged examples}
summary=()
for stage in $stages; do
    t0=$(date +%s)
    case $stage in
    tests)
        ATTNLOWER_TEST_DEVICE=cuda timeout ${TESTS_TIMEOUT:-330} python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" \
            -n 8 --maxfail=30 tests/lowering/test_flash_kernel.py tests/lowering/test_sliding_kernel.py \
            tests/lowering/test_paged_kernel.py >"$OUT/gpu_tests.log" 2>&1
        rc=$?; tail -25 "$OUT/gpu_tests.log" | grep -E "FAILED|ERROR|passed|failed" | tail -15 ;;
    flash|sliding|paged|accuracy)
        timeout 300 python3 "bench/$stage.py" >"$OUT/$stage.log" 2>&1; rc=$?; tail -30 "$OUT/$stage.log" ;;
    examples)
        rc=0
        for ex in ${EXAMPLES:-gpt2 llama mistral}; do
            timeout 150 python3 "examples/$ex.py" >"$OUT/example_$ex.log" 2>&1 || rc=$?
            tail -6 "$OUT/example_$ex.log"
        done ;;
    *) echo "unknown stage $stage"; rc=2 ;;
    esac
    summary+=("$stage rc=$rc $(( $(date +%s) - t0 ))s")
done
printf '%s\n' "${summary[@]}"
