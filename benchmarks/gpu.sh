#!/usr/bin/env bash
# GPU checks and training benchmarks, as run for docs/benchmarks.md on the device machine:
#   bash benchmarks/gpu.sh setup fsdp lora       then   bash benchmarks/gpu.sh setup qlora full
#   env: TOKENS (target tokens per case, default 100000), BATCH (doppel's rows per micro-batch, default 8),
#        ATTENTION (doppel's attention kernel, e.g. varlen; default auto)
#   bash benchmarks/gpu.sh setup tests      the CUDA-only tests (tests/test_gpu.py, tests/test_attention.py)
# Needs the wheels named in docs/benchmarks.md in .whl/ when the machine has no package index.
# Writes JSON and logs to $OUT (default: runs/gpu).
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 DOPPEL_CACHE=/tmp/doppel-cache
# without the embedded package there, random models take the SmolLM2 tokenizer saved in .tok/
[ -d .tok ] && export DOPPEL_RANDOM_TOKENIZER=$PWD/.tok
PY=python3
for step in "$@"; do
  case $step in
    setup)
      if [ -d .whl ]; then
        rm -rf /tmp/site; $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site:$PWD/src
      fi
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
      $PY -c "import torch, transformers, trl, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/device.txt"
      # a synthetic export of 200k messages → dataset
      $PY -c "from doppel.readers.synthetic import write_large_export; write_large_export(open('/tmp/export.json', 'wb'), 200000, 400)"
      $PY -m doppel prepare /tmp/export.json -o /tmp/data | tee -a "$OUT/device.txt" ;;
    tests)
      # the tests' tokenizer is the embedded one, saved in .tok/ (the embedded package is not on this machine)
      # and on CUDA, QLoRA's dtypes (bitsandbytes' GPU kernels) and the out-of-memory message
      timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_attention.py \
        tests/test_train.py::test_qlora_keeps_embeddings_norms_and_head_in_bf16_over_a_4bit_base \
        tests/test_train.py::test_out_of_memory_says_which_options_need_less \
        > "$OUT/tests.log" 2>&1; tail -15 "$OUT/tests.log" ;;
    fsdp)
      # the shipped FSDP config on this machine's GPU, full fine-tuning of a small model, final save
      rm -rf /tmp/fsdp-run
      timeout 300 accelerate launch --config_file configs/fsdp.yaml --num_processes 1 -m doppel train /tmp/data \
        -o /tmp/fsdp-run --model random:llama-1b --mode full --max-steps 20 --logging-steps 5 --save-steps 10 \
        --batch-size 4 > "$OUT/fsdp.log" 2>&1
      cat /tmp/fsdp-run/run.json >> "$OUT/fsdp.log"; ls -la /tmp/fsdp-run >> "$OUT/fsdp.log" ;;
    lora|qlora|full|lora-nogc)
      # lora-nogc: LoRA without gradient checkpointing (the 7B's activations fit in 80 GB)
      extra=(); mode=$step
      [ -n "${BATCH:-}" ] && extra+=(--batch-size "$BATCH")   # doppel's rows per micro-batch (default 8)
      [ -n "${ATTENTION:-}" ] && extra+=(--attention "$ATTENTION")
      [ "$step" = lora-nogc ] && extra+=(--gradient-checkpointing off) && mode=lora
      timeout 420 $PY -m doppel bench train --dataset /tmp/data --model random:mistral-7b --mode "$mode" \
        --tokens "${TOKENS:-100000}" --json "$OUT/bench-$step${ATTENTION:+-$ATTENTION}.json" "${extra[@]}" > "$OUT/bench-$step.log" 2>&1
      tail -5 "$OUT/bench-$step.log" ;;
  esac
done
