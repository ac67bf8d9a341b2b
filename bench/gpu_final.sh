#!/usr/bin/env bash
# One device call (~7 min): GPU correctness of the merged tree, the Inductor-launched kernels, a short
# forward benchmark and GPT-2 end to end. Logs under $OUT; a short summary last.
set -uo pipefail
OUT=${OUT:-/tmp/attnlower_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)" | tee "$OUT/env.txt"
s=()
t=$(date +%s); timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu -n 8 --runxfail \
  tests/lowering/test_cuda.py tests/lowering/test_flash_kernel.py tests/lowering/test_sliding_kernel.py \
  tests/lowering/test_paged_kernel.py >"$OUT/gpu_tests.log" 2>&1; s+=("gpu-tests rc=$? $(( $(date +%s)-t ))s")
grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -12
t=$(date +%s); ATTNLOWER_TEST_DEVICE=cuda timeout 85 python3 -m pytest -q -p no:cacheprovider -n 8 \
  tests/lowering/test_ops.py tests/lowering/test_paged_kernel.py >"$OUT/cpu_tests_on_cuda.log" 2>&1
s+=("cpu-tests-on-cuda rc=$? $(( $(date +%s)-t ))s"); grep -E "FAILED|passed|failed" "$OUT/cpu_tests_on_cuda.log" | tail -8
t=$(date +%s); BENCH_SEQ_LENS=1024,4096,16384 timeout 90 python3 bench/flash.py >"$OUT/flash.log" 2>&1
s+=("flash rc=$? $(( $(date +%s)-t ))s"); tail -28 "$OUT/flash.log"
t=$(date +%s); timeout 70 python3 examples/gpt2.py >"$OUT/gpt2.log" 2>&1; s+=("gpt2 rc=$? $(( $(date +%s)-t ))s"); tail -8 "$OUT/gpt2.log"
printf '%s\n' "${s[@]}"
