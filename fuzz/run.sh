#!/usr/bin/env bash
# fuzz/run.sh TARGET SECONDS: run one cargo-fuzz target from its seeds (nightly + cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")/.."
target=$1 secs=${2:-60}
case $target in
  alpaca|news) dir=fuzz/data max_len=8192 ;;
  gpt2_loader|peft_adapter) dir=fuzz/model max_len=262144 ;;
  *) echo "unknown target '$target' (alpaca, news, gpt2_loader, peft_adapter)" >&2; exit 2 ;;
esac
seeds=$dir/seeds/$target
mkdir -p "$seeds" "$dir/corpus/$target"
micro=crates/lora-gpt/tests/fixtures/gpt2-micro
case $target in
  gpt2_loader)
    cp $micro/model/config.json $micro/model/model.safetensors "$seeds/" ;;
  peft_adapter)
    python3 - "$micro/adapter" "$seeds/micro" <<'PY'
import struct, sys
cfg = open(sys.argv[1] + "/adapter_config.json", "rb").read()
st = open(sys.argv[1] + "/adapter_model.safetensors", "rb").read()
open(sys.argv[2], "wb").write(struct.pack("<H", len(cfg)) + cfg + st)
PY
    ;;
esac
cargo +nightly fuzz run --fuzz-dir "$dir" "$target" "$dir/corpus/$target" "$seeds" -- \
  -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len="$max_len" -print_final_stats=1
