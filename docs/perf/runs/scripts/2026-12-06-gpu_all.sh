# One device call: linear tests, linear timing, flash odd lengths. Logs under $OUT.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
filter() { grep -v "^W1\|^W0\|Warning\|warn\|^I1\|^I0" ; }
JAX_PLATFORMS=cuda timeout ${T_TESTS:-140} python3 -m pytest -q -m gpu_only tests/pallas_kernels/linear_attention/test_pallas_mosaic_gpu.py -p no:cacheprovider 2>&1 | tail -15 | tee $OUT/linear_tests.log
BUDGET=${T_LINEAR:-200} timeout $(( ${T_LINEAR:-200} + 60 )) python3 docs/perf/runs/scripts/2026-12-06-linear_gpu.py 2>&1 | filter | tee $OUT/linear.log
timeout ${T_FLASH:-110} python3 -m experiments.check_flash_odd_lengths --trials=7 2>&1 | filter | tail -20 | tee $OUT/flash.log
JAX_PLATFORMS=cuda timeout ${T_TRITON:-50} python3 -m pytest -q tests/pallas_kernels/test_triton_call.py tests/pallas_kernels/linear_attention/test_triton.py -p no:cacheprovider 2>&1 | tail -8 | tee $OUT/triton.log
