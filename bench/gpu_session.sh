#!/usr/bin/env bash
# Everything attnlower checks on a GPU, in one device call; logs under $OUT, short tables last.
#
#   bash bench/gpu_session.sh tests flash        # stages: tests accuracy flash sliding paged paged_sweep modern
#                                                #         wide_tiles examples e2e serve
#
# One device call is limited to 10 minutes, a session to 30: a fresh machine compiles every kernel
# again (the tests stage alone took ~200 s on 16 cores). Groups estimated from 2026-11-23 runs to fit:
#   TESTS_TIMEOUT=240 BENCH_SEQ_LENS=1024,4096,16384 bash bench/gpu_session.sh tests accuracy flash
#   EXAMPLES="gpt2 llama" bash bench/gpu_session.sh sliding paged examples
#
# tests:    every kernel test of tests/lowering (odd shapes, masks, dropout, poisoned outputs, fp32/fp16/bf16)
#           rerun on CUDA through ATTNLOWER_TEST_DEVICE=cuda, plus the tests marked gpu (real sizes); names stream
#           to the log (-v) and a junit file, so a run cut by its limit still says what failed. 194 s on 16
#           cores (2026-12-04); test_sm90_compile.py is left out (ptxas only: CI runs it without a GPU).
# e2e:      bench/e2e.py (every row group: ~8 minutes with --profile; E2E_ROWS picks some, E2E_ARGS adds flags,
#           e.g. "--cprofile attnlower").
# serve:    bench/serve.py in fp32 (agreement without bf16 rounding, first tokens held to a plain forward).
#           Needs transformers >= 5.25 (the GPU image has 5.17): WHEELS=<dir of wheels> installs them privately.
# flash / sliding / paged / paged_sweep: bench/<stage>.py (ratios against SDPA and FlexAttention in the same run);
#           SWEEP_ARGS adds flags to paged_sweep, e.g. "--reduce separate --block-n 64,128 --stages 2,3,4 --warps 8".
# modern:   bench/modern.py, issue 21's rows (MLA prefill and decode, sinks, packed documents and their targets);
#           it prints each group's seconds, compiles included. MODERN_ARGS adds flags, e.g.
#           "--groups packed --profile attnlower,flex" (GPU time per kernel).
# wide_tiles: bench/wide_tiles.py, the 256-wide head-dim class's tiles (MLA 192/128, D 256), forward and backward.
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
        ATTNLOWER_TEST_DEVICE=cuda timeout ${TESTS_TIMEOUT:-330} python3 -m pytest -v --tb=line -p no:cacheprovider \
            -m "gpu or not gpu" -n 16 --junitxml="$OUT/gpu_tests.xml" tests/lowering \
            --ignore=tests/lowering/test_sm90_compile.py >"$OUT/gpu_tests.log" 2>&1
        rc=$?; grep -E " (FAILED|ERROR) " "$OUT/gpu_tests.log" | sed 's/.*\] //' | sort -u | head -30
        tail -1 "$OUT/gpu_tests.log" ;;
    e2e)
        timeout ${E2E_TIMEOUT:-540} python3 bench/e2e.py --profile --iters 10 --out "$OUT/e2e" ${E2E_ROWS:+--rows $E2E_ROWS} ${E2E_ARGS:-} \
            >"$OUT/e2e.log" 2>&1; rc=$?; grep -E "x$|x,|fail|Error|target|one after the other" "$OUT/e2e.log" | cut -c1-220 | tail -20 ;;
    serve)
        if [ -n "${WHEELS:-}" ]; then
            python3 -m pip install -q --no-deps --no-index --target /tmp/serve_site "$WHEELS"/*.whl >"$OUT/serve_pip.log" 2>&1
        fi
        PYTHONPATH="${WHEELS:+/tmp/serve_site:}$PYTHONPATH" timeout 300 python3 bench/serve.py --dtype float32 \
            --requests 64 --timeout 100 >"$OUT/serve.log" 2>&1; rc=$?; tail -5 "$OUT/serve.log" ;;
    modern)
        timeout 300 python3 bench/modern.py ${MODERN_ARGS:-} >"$OUT/modern.log" 2>&1; rc=$?; tail -30 "$OUT/modern.log" ;;
    paged_sweep)
        timeout 300 python3 bench/paged_sweep.py ${SWEEP_ARGS:-} >"$OUT/paged_sweep.log" 2>&1; rc=$?
        tail -30 "$OUT/paged_sweep.log" ;;
    flash|sliding|paged|accuracy|wide_tiles)
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
