#!/bin/bash
# Device side: a per-kernel GPU profile of `bench lora-layer` variants on wgpu (cubecl's profiling
# logger, which syncs after every kernel), then the same variants timed without it. Carry `.gl/` and
# the binary in `.devcarry/` (`LT`, tools/device/lt.sh). Env: VARIANTS (default "plain_frozen
# factored"). Writes the logs to $OUT. Run: bash tools/device/profile_layer_gpu.sh
set -u
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
source tools/device/lt.sh  # /tmp/lt from $LT (default .devcarry/lt_new.xz)
V=${VARIANTS:-plain_frozen factored}
for v in $V; do
  D=$(mktemp -d)
  printf '[profiling.logger]\nlevel = "basic"\nfile = "%s/profile.log"\n' "$D" > $D/cubecl.toml
  (cd $D && /tmp/lt bench lora-layer --backend wgpu --tokens 8192 --iters 5 --only $v 2>&1 | tail -1)
  mkdir -p ${OUT:-/tmp/out}; gzip -c $D/profile.log > ${OUT:-/tmp/out}/layer_$v.log.gz
done
for v in $V; do /tmp/lt bench lora-layer --backend wgpu --tokens 8192 --iters 50 --only $v 2>&1 | tail -1; done
