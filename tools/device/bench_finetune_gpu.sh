#!/bin/bash
# Device side of `bench finetune` on wgpu (the `device` tool): each variant alone (its JSON row holds
# the allocator peaks, `peak_mib` reserved and `in_use_mib`), and the whole GPU memory polled
# with nvidia-smi. Carry `.gl/` (the Vulkan loader debs) and `.devcarry/` (the release
# binary, `LT` as tools/device/lt.sh says; `gpu_anchor_peft.py` from ../shared/reference). Env: VARIANTS, STEPS, EXTRA (e.g.
# "--precision f16"), BACKEND (wgpu | vulkan: a binary built with `--features vulkan`), PEFT=0
# to skip the PEFT anchor. Run: bash tools/device/bench_finetune_gpu.sh
set -u
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
source tools/device/lt.sh  # /tmp/lt from $LT (default .devcarry/lt_new.xz)
nvidia-smi --query-gpu=name,memory.total --format=csv
for v in ${VARIANTS:-lora_c_attn_r8 lora_attn_mlp_r8 full}; do
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/smi_$v.txt &
  P=$!
  /tmp/lt bench finetune --backend ${BACKEND:-wgpu} --batch 8 --seq 1024 --steps ${STEPS:-5} --only $v ${EXTRA:-} 2>&1 | tail -2
  kill $P; sleep 0.5
  echo "$v peak GPU MiB: $(sort -n /tmp/smi_$v.txt | tail -1)"
done
if [ "${PEFT:-1}" = 1 ]; then timeout 300 python3 .devcarry/gpu_anchor_peft.py --steps 10 2>&1 | grep '^{' | head -3; fi
