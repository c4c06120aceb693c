#!/bin/bash
# Device side (the `device` tool): GPT-2 small from random weights, fully fine-tuned for 200 steps
# on Tiny Shakespeare with several precisions and seeds at once (in parallel on the one GPU: the
# losses do not depend on timing). Carry `.gl/` and `.devcarry/` with `lt_<BIN>.xz` (default
# async), `tokenizer.json` and `shakespeare.txt`. Env: RUNS (default "f32:0 f32:1 f16:0 f16:1":
# precision:seed pairs), BIN, TAG (names this call's logs, for calls in parallel). Prints each
# run's validation and training losses. Run: bash tools/device/curves_gpu.sh
set -u
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
LT=/tmp/lt_${BIN:-async}; [ -x $LT ] || { xz -dc .devcarry/lt_${BIN:-async}.xz > $LT.part && chmod +x $LT.part && mv $LT.part $LT; }
R=${PWD}
for run in ${RUNS:-f32:0 f32:1 f16:0 f16:1}; do
  p=${run%:*}; s=${run#*:}
  $LT finetune --model-type gpt2 --tokenizer $R/.devcarry/tokenizer.json --dataset text \
    --data $R/.devcarry/shakespeare.txt --out /tmp/run_${TAG:-}${p}_$s --backend vulkan --block-size 256 --full \
    --max-iters 200 --batch-size 8 --lr 3e-4 --warmup 20 --eval-every 50 --eval-batches 10 \
    --log-every 20 --seed $s --precision $p > /tmp/log_${TAG:-}${p}_$s 2>&1 &
done
wait
for run in ${RUNS:-f32:0 f32:1 f16:0 f16:1}; do
  p=${run%:*}; s=${run#*:}
  echo "${TAG:-}$p seed $s: val $(grep -o 'val loss [0-9.]*' /tmp/log_${TAG:-}${p}_$s | awk '{print $3}' | tr '\n' ' ')train $(grep -o ': loss [0-9.]*' /tmp/log_${TAG:-}${p}_$s | awk '{print $3}' | tr '\n' ' ')$(grep -c overflowed /tmp/log_${TAG:-}${p}_$s) overflows"
  grep -iE 'error|panic' /tmp/log_${TAG:-}${p}_$s | head -3
done
