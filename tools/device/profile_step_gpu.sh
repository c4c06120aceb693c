#!/bin/bash
# Device side: a per-kernel GPU profile of one `bench finetune` step on wgpu (cubecl's profiling
# logger, which syncs after every kernel, so the sum is GPU time), summed per kernel over the last
# step. Carry `.gl/` and the binary in `.devcarry/` (`LT`, tools/device/lt.sh). Env: VARIANT
# (default lora_c_attn_r8), EXTRA (e.g. "--precision f16"), LEVEL (basic|full). Writes the logs
# to $OUT. Run: bash tools/device/profile_step_gpu.sh
set -u
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
source tools/device/lt.sh  # /tmp/lt from $LT (default .devcarry/lt_new.xz)
D=$(mktemp -d); cd $D
cat > cubecl.toml <<TOML
[profiling.logger]
level = "${LEVEL:-full}"
file = "$D/profile.log"
[autotune.logger]
level = "full"
file = "$D/autotune.log"
TOML
V=${VARIANT:-lora_c_attn_r8}
/tmp/lt bench finetune --backend ${BACKEND:-wgpu} --batch 8 --seq 1024 --steps ${STEPS:-4} --only $V ${EXTRA:-} 2>&1 | tail -1
python3 - "$D/profile.log" <<'PY'
import re, sys, collections
rows = []
for l in open(sys.argv[1]):
    if not l.startswith('| '):
        continue
    _, d, name = l.split('|', 2)
    m = re.match(r'^([0-9.]+)(ns|µs|ms|s)$', d.strip())
    if m:
        rows.append((float(m.group(1)) * {'ns': 1e-6, 'µs': 1e-3, 'ms': 1.0, 's': 1e3}[m.group(2)],
                     name.strip().split(': ')[0]))
# Each step has one group of select kernels (embedding lookups, within ~100 kernels of each other;
# named `select_kernel` or `SelectKernel_<hash>` by cubecl version), ~2,000 kernels apart: a step
# runs from one group's first select to the next (else from one step's first attention forward to
# the next's). The log's tail may be cut off at exit, so take the last step that the next one's
# start closes.
sel = [i for i, (_, n) in enumerate(rows) if re.search(r'select_?kernel', n, re.I)]
starts = [i for k, i in enumerate(sel) if k == 0 or i - sel[k - 1] > 200]
if len(starts) < 2:
    # No select kernels (the lookups fused away): one step per 12 attention forwards (GPT-2
    # small's layers), from the first layer's.
    att = [i for i, (_, n) in enumerate(rows) if re.match(r'Flash(Cm|Forward)Kernel', n)]
    starts = att[::12]
print(f"kernels logged {len(rows)}, steps seen {len(starts)}")
if len(starts) < 2:
    sys.exit(0)
step = rows[starts[-2]:starts[-1]]
print(f"last complete step: {len(step)} kernels, GPU time {sum(d for d, _ in step):.1f} ms")
agg = collections.defaultdict(lambda: [0.0, 0])
for d, name in step:
    a = agg[name[:170]]; a[0] += d; a[1] += 1
for k, (t, c) in sorted(agg.items(), key=lambda x: -x[1][0])[:30]:
    print(f"{t:9.2f} ms {c:5d}  {k}")
PY
mkdir -p ${OUT:-/tmp/out}; gzip -c profile.log > ${OUT:-/tmp/out}/profile_$V.log.gz; gzip -c autotune.log > ${OUT:-/tmp/out}/autotune_$V.log.gz 2>/dev/null
