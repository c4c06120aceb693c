#!/bin/bash
# Device side (the `device` tool): A/B of two `lora-train` release binaries on `bench finetune`,
# alternated ROUNDS times in one call so that both see the same machine. Carry `.gl/` (the Vulkan
# loader debs) and `.devcarry/` with `lt_old.xz` and `lt_new.xz` (`strip -o /tmp/x BIN; xz -T2 -6 -c
# /tmp/x > .devcarry/lt_new.xz`; both built with `--features vulkan`). Env: BINS (the builds to
# alternate, default "old new": .devcarry/lt_<name>.xz each), V (variant, default
# lora_c_attn_r8), STEPS (5), ROUNDS (2), BACKEND (vulkan), EXTRA (default "--precision f16"),
# MAX_BLOCKS (writes burn.toml's `[fusion.beam_search] max_blocks`; unset: Burn's default, 5).
# Prints one JSON row (ms, tokens/s, peak and in-use MiB) per run. Run: bash tools/device/ab_finetune_gpu.sh
set -u
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
for b in ${BINS:-old new}; do xz -dc .devcarry/lt_$b.xz > /tmp/lt_$b && chmod +x /tmp/lt_$b; done
D=$(mktemp -d); cd $D
[ -n "${MAX_BLOCKS:-}" ] && printf '[fusion.beam_search]\nmax_blocks = %s\n' "$MAX_BLOCKS" > burn.toml
for round in $(seq ${ROUNDS:-2}); do
  for b in ${BINS:-old new}; do
    echo -n "round $round $b: "
    /tmp/lt_$b bench finetune --backend ${BACKEND:-vulkan} --batch 8 --seq 1024 --steps ${STEPS:-5} \
      --only ${V:-lora_c_attn_r8} --no-peft ${EXTRA:---precision f16} 2>&1 | tail -1
  done
done
