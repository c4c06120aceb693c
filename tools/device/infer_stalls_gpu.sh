#!/bin/bash
# Device side of `bench infer` on wgpu with the facts needed to explain slow passes: every pass's
# wall and process CPU time (`--trace`, interleaved on stderr with cubecl's kernel-compilation and
# autotune log lines from a cubecl.toml), GPU clocks and load (nvidia-smi, every 100 ms). Carry `.gl/` and
# the binary in `.devcarry/` (`LT`, tools/device/lt.sh). Env: RUNS (default "default minimal"),
# ITERS (30), SEQ (1024). Writes under $OUT (or /tmp/out).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
source tools/device/lt.sh  # /tmp/lt from $LT (default .devcarry/lt_new.xz)
nvidia-smi --query-gpu=name,clocks.max.sm,compute_mode --format=csv
nvidia-smi --query-compute-apps=pid,name,used_memory --format=csv
# Compilations and autotune decisions on stderr, next to the passes (no profiling: it syncs
# every kernel).
cat > cubecl.toml <<'TOML'
[compilation.logger]
level = "basic"
stderr = true
[autotune.logger]
level = "minimal"
stderr = true
TOML
for run in ${RUNS:-default minimal}; do
  nvidia-smi --query-gpu=timestamp,clocks.sm,utilization.gpu,power.draw,pstate --format=csv,noheader -lms 100 > $OUT/smi_$run.csv &
  P=$!
  if [ $run = minimal ]; then export CUBECL_AUTOTUNE_LEVEL=minimal; else unset CUBECL_AUTOTUNE_LEVEL; fi
  /tmp/lt bench infer --backend wgpu --seq ${SEQ:-1024} --iters ${ITERS:-30} --trace \
    --out $OUT/infer_$run.json > $OUT/trace_$run.txt 2>&1
  tail -4 $OUT/trace_$run.txt
  kill $P
done
