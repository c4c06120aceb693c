# Sourced by the device scripts: unpacks the carried release binary to /tmp/lt, every time (a warm
# machine keeps /tmp from the call before). LT: the file (default .devcarry/lt_new.xz, built with
# `--features vulkan` and packed with `strip -o /tmp/x BIN; xz -T2 -6 -c /tmp/x > .devcarry/lt_new.xz`;
# else .devcarry/lora-train.gz); .xz is unpacked with xz, anything else with gunzip.
LT=${LT:-$( [ -f .devcarry/lt_new.xz ] && echo .devcarry/lt_new.xz || echo .devcarry/lora-train.gz )}
rm -f /tmp/lt
case "$LT" in
  *.xz) xz -dc "$LT" > /tmp/lt ;;
  *) gunzip -c "$LT" > /tmp/lt ;;
esac
chmod +x /tmp/lt
