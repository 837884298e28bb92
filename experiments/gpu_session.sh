#!/usr/bin/env bash
# One GPU session's checks and timings, time-boxed, for a lent machine with little time:
# run it from the repository root with the peers' wheels in .whl/ (experiments/
# gpu_peer_setup.sh) and an output folder, e.g. on the device machine:
#
#   bash experiments/gpu_session.sh "$OUT" [STEP ...]
#
# STEPs (default: all, in this order; each bounded by its own timeout, so a slow step
# leaves the others their time): tests (compiled kernel tests: Mosaic GPU linear
# attention, Pallas-Triton and Triton-language linear attention incl. the bf16 vector
# gate), linear (the linear-attention sweep: auto, pallas_mosaic_gpu, jla), flash (the
# softmax sweep: auto, pallas_mosaic_gpu, cuDNN, FlashAttention-3), training (issue 21
# item 5: Lightning vs softmax LM, medium with 8 heads of 128, 32k tokens per step, at
# seq 1k, 4k, 16k, 32k), vector_linear (issue 21: the vector gate on Mosaic GPU beside
# the Triton-language kernels, 1k, 16k, 64k; not in the default list), triton_linear (issue 20: the Triton-language linear attention
# timed beside pallas_triton, three decay forms at 1k and 64k, then its vector-gate
# gradient launch settings swept; not in the default list),
# triton_flash (issue 20: the Triton-language flash attention's tests
# and timings beside pallas_triton and cuDNN; not in the default list), zoology (issue
# 18: attention at width 64 on Zoology's Figure 2 cells at the paper's budget; not in
# the default list). Logs and JSON go under OUT; a compact
# table to stdout.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT [tests|linear|flash|training ...]}
shift
steps=("${@:-tests linear flash training}")
mkdir -p "$out"
export PYTHONUNBUFFERED=1
source "$(dirname "${BASH_SOURCE[0]}")/gpu_peer_setup.sh" || exit 1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
quiet() { grep -v "^[WIE][0-9]\{4\} \|Warning\|warn(" ; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee "$out/gpu.txt"

for step in ${steps[*]}; do
  case "$step" in
    tests)
      JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu_only \
        tests/pallas_kernels/linear_attention/test_pallas_mosaic_gpu.py 2>&1 | tail -5 \
        | tee "$out/tests_mosaic_linear.log"
      JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider \
        tests/pallas_kernels/linear_attention/test_pallas_triton.py -k "vector" 2>&1 \
        | tail -5 | tee "$out/tests_pallas_triton_vector.log"
      JAX_PLATFORMS=cuda,cpu timeout 150 python3 -m pytest -q -p no:cacheprovider \
        tests/pallas_kernels/linear_attention/test_triton.py \
        tests/pallas_kernels/test_triton_call.py 2>&1 | tail -5 | tee "$out/tests_triton.log"
      ;;
    linear)
      timeout 480 python3 -m experiments.bench_linear_attention --peers=jax_linear_attention \
        --implementations=auto,pallas_mosaic_gpu --forms=fixed,scalar \
        --softmax_implementation= --trials=7 --output_dir="$out/linear" 2>&1 | quiet \
        | grep "^|" | tee "$out/linear.md"
      ;;
    flash)
      timeout 300 python3 -m experiments.bench_attention --peers=cudnn,flash_attn3_jax \
        --implementations=auto,pallas_mosaic_gpu --masks=causal \
        --extra_rows=causal@3000,causal@4096/head_dim=256,causal@8192/kv_heads=2,causal_window:1024@16384 \
        --trials=7 --output_dir="$out/flash" 2>&1 | quiet | grep "^|" | tee "$out/flash.md"
      ;;
    training)
      for seq in 4096 16384 1024 32768; do  # the cells 2026-12-07 left empty first
        for mixer in lightning softmax; do
          line=$(timeout 240 python3 -m experiments.bench_training --size=medium --num_heads=8 \
            --mixers=$mixer --seq_len=$seq --global_batch_size=$((32768 / seq)) --steps=5 \
            --warmup=1 2>"$out/training_${mixer}_${seq}.err" | grep '^{')
          [[ -n "$line" ]] || line="{\"mixers\": [\"$mixer\"], \"seq_len\": $seq, \"error\": \"no result (timeout or crash; see training_${mixer}_${seq}.err)\"}"
          echo "$line" | tee -a "$out/training.jsonl"
        done
      done
      ;;
    vector_linear)
      # Issue 21: the vector gate (GLA) on Mosaic GPU beside the Triton-language kernels.
      timeout 300 python3 -m experiments.bench_linear_attention \
        --implementations=auto,pallas_mosaic_gpu,triton --softmax_implementation= \
        --forms=vector --seq_lens=1024,16384,65536 --trials=5 \
        --output_dir="$out/vector_linear" 2>&1 | quiet | grep "^|" | tee "$out/vector_linear.md"
      ;;
    triton_linear)
      # Issue 20: the Triton-language linear attention beside pallas_triton (what it is to
      # replace), the three decay forms, 1k and 64k, forward and forward + backward.
      timeout 400 python3 -m experiments.bench_linear_attention \
        --implementations=pallas_triton,triton --softmax_implementation= \
        --forms=fixed,scalar,vector --seq_lens=1024,65536 --trials=5 \
        --output_dir="$out/triton_linear" 2>&1 | quiet | grep "^|" | tee "$out/triton_linear.md"
      # The vector gate's gradient launches over their value-block width and warps (the
      # scalar gate's gradient kernel spilled at 128 columns: 2.8x slower than at 32).
      timeout 200 python3 -m experiments.tune_linear_attention --kernels=triton \
        --form=vector --passes=fwd_bwd --seq_lens=1024 --gradient_block_v=32,64,128 \
        --gradient_num_warps=4,8 --trials=5 --output_dir="$out/triton_vector_tune" 2>&1 \
        | quiet | grep "^|" | tee "$out/triton_vector_tune.md"
      ;;
    triton_flash)
      # Issue 20: the Triton-language flash attention compiled: its tests, then timed
      # beside pallas_triton (what it replaces) and cuDNN, bf16 and f32.
      JAX_PLATFORMS=cuda,cpu timeout 200 python3 -m pytest -q -p no:cacheprovider \
        tests/pallas_kernels/flash_attention/test_triton.py 2>&1 | tail -3 \
        | tee "$out/tests_triton_flash.log"
      for dtype in bfloat16 float32; do
        timeout 150 python3 -m experiments.bench_attention --dtype=$dtype \
          --implementations=cudnn,pallas_triton,triton --masks=causal --seq_lens=1024,4096 \
          --trials=5 --output_dir="$out/triton_flash_$dtype" 2>&1 | quiet | grep "^|" \
          | tee "$out/triton_flash_$dtype.md"
      done
      ;;
    zoology)
      # Issue 18: Zoology's Figure 2 at the paper's budget for attention at width 64 (the
      # CPU grid's plateau), 4 learning rates x 2 cells, 4 runs at a time on the one GPU.
      # Needs TFDS, which the image lacks: its wheels in .whl_tfds/ (docs/results/zoology.md).
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site_tfds .whl_tfds/*.whl || { echo "no .whl_tfds" >&2; continue; }
      PYTHONPATH=$PYTHONPATH:/tmp/site_tfds timeout -s TERM 480 python3 -m experiments.mqar_grid \
        --grid=zoology_figure2 --cells=64x4,128x8 --d_models=64 --mixers=softmax \
        --processes=4 --output_dir=/tmp/zoo 2>&1 | tail -20 | tee "$out/zoology.log"
      mkdir -p "$out/zoology" && cp -r /tmp/zoo/results.jsonl /tmp/zoo/summary.md /tmp/zoo/*.png \
        /tmp/zoo/logs "$out/zoology/" 2>/dev/null
      ;;
    *) echo "gpu_session.sh: unknown step '$step' (tests, linear, flash, training, triton_linear, triton_flash, zoology)" >&2 ;;
  esac
done
