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
    # u16 little-endian config length, the config, then the safetensors bytes.
    cfg=$micro/adapter/adapter_config.json n=$(stat -c %s "$cfg")
    { printf "\\x$(printf %02x $((n & 255)))\\x$(printf %02x $((n >> 8)))"; cat "$cfg" \
        "$micro/adapter/adapter_model.safetensors"; } > "$seeds/micro"
    ;;
esac
cargo +nightly fuzz run --fuzz-dir "$dir" "$target" "$dir/corpus/$target" "$seeds" -- \
  -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len="$max_len" -print_final_stats=1
