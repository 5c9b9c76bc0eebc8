#!/usr/bin/env bash
# What a full push's source costs beyond the transport it runs on. In each
# round, interleaved, on one disk image:
#   floor-maps agent/examples/quic_floor: the image's non-empty 64 KiB blocks,
#              from the same shared maps a push sends, written to a serve's
#              bench stream on the agent's QUIC settings (no hashing, no
#              framing; the receiver drops them): the sender's CPU
#   floor-hot  the same bytes as one hot 1 MiB buffer sent over and over
#   floor-hashed  floor-maps with each block hashed (blake3) on the sending
#              thread right before it is written: whether hashing next to
#              the send, while the bytes are in cache, costs less than a
#              push's hashing on other threads
#   push       `diskferry push --mode full` to a fresh target: the source's CPU
#   b3sum-t1   one `b3sum --num-threads 1` pass over the image (CPU, user+sys)
# and then the medians, each as a multiple of the b3sum pass, and a lower
# bound for a push: the hot transport plus the hashing a push must add (I2:
# the source's blake3 of every block), the b3sum pass's CPU scaled to the
# bytes sent.
#
#   benches/transport-floor.sh              # DISK=/tmp/ancbench/src.img if there, ROUNDS=3
#   DISK=/path/img ROUNDS=5 benches/transport-floor.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
W=$(mktemp -d /tmp/df-floor.XXXXXX)
SP=
cleanup() { [ -n "$SP" ] && kill "$SP" 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
if [ -z "${DISK:-}" ]; then
  if [ -f /tmp/ancbench/src.img ]; then DISK=/tmp/ancbench/src.img; else
    # 2 GiB: random 4 MiB pieces with every fourth left a hole.
    DISK=$W/disk.img; truncate -s 2G "$DISK"
    for i in $(seq 0 511); do [ $((i % 4)) = 3 ] || dd if=/dev/urandom of="$DISK" bs=4M seek=$i count=1 conv=notrunc status=none; done
  fi
fi
[ "${NO_BUILD:-0}" = 1 ] || cargo build --release -q -p diskferry-agent --bin diskferry --example quic_floor
DF=$PWD/target/release/diskferry QF=$PWD/target/release/examples/quic_floor
$DF init --state-dir "$W/src" >/dev/null; $DF init --state-dir "$W/srv" >/dev/null
SFP=$($DF id --state-dir "$W/src"); TFP=$($DF id --state-dir "$W/srv")
cat >"$W/serve.toml" <<T
listen = "127.0.0.1:0"
state_dir = "$W/srv"
[[peer]]
name = "s"
fingerprint = "$SFP"
[[target]]
name = "full"
path = "$W/full.img"
allowed_peers = ["s"]
T
serve() {
  $DF serve --config "$W/serve.toml" >/dev/null 2>"$W/serve.log" & SP=$!
  for _ in $(seq 100); do
    A=$(sed -n 's/^diskferry serving on \([0-9.]*:[0-9]*\) .*/\1/p' "$W/serve.log"); [ -n "$A" ] && return; sleep 0.1
  done
  echo "serve did not start: $(cat "$W/serve.log")" >&2; exit 1
}
stop() { kill "$SP"; wait "$SP" 2>/dev/null || true; SP=; }
cat "$DISK" >/dev/null
: >"$W/results"
for r in $(seq "$ROUNDS"); do
  serve
  # A send that stalls fails the run (pipefail) instead of hanging it.
  for mode in maps hot hashed; do
    timeout 300 "$QF" "$W/src" "$A" "$TFP" "$DISK" "$mode" | sed "s/^/floor-$mode /" >>"$W/results"
  done
  stop
  rm -rf "$W/srv/targets" "$W/full.img"
  serve
  $DF push "$DISK" --peer "$A" --peer-fingerprint "$TFP" --target full --state-dir "$W/src" --json --mode full \
    | sed 's/^/push /' >>"$W/results"
  stop
  /usr/bin/time -f 'b3sum-t1 {"cpu_seconds": %U, "sys": %S}' b3sum --num-threads 1 "$DISK" 2>&1 >/dev/null | tail -1 >>"$W/results"
  echo "round $r of $ROUNDS done" >&2
done
python3 - "$W/results" "$(stat -c %s "$DISK")" <<'P'
import json, statistics as st, sys
rows = {}
for line in open(sys.argv[1]):
    kind, _, js = line.partition(" ")
    d = json.loads(js)
    if kind == "b3sum-t1":
        d["cpu_seconds"] += d["sys"]
    rows.setdefault(kind, []).append(d)
disk = int(sys.argv[2])
med = {k: st.median(float(d["cpu_seconds"]) for d in v) for k, v in rows.items()}
sent = st.median(d["bytes_sent"] for d in rows["floor-maps"])
b3 = med["b3sum-t1"]
hashing = b3 * sent / disk
print(f"image {disk} bytes, {sent:.0f} bytes of non-empty blocks; medians of {len(rows['push'])} rounds, CPU seconds")
print("| what | CPU-s | x b3sum -t1 | all rounds |")
print("|---|---|---|---|")
for k, label in [("b3sum-t1", "b3sum --num-threads 1 pass"), ("floor-hot", "transport alone, one hot buffer"),
                 ("floor-maps", "transport alone, from the maps"),
                 ("floor-hashed", "transport from the maps, each block hashed on the sending thread"),
                 ("push", "full push, source agent")]:
    print(f"| {label} | {med[k]:.2f} | {med[k] / b3:.2f}x | {', '.join('%.2f' % float(d['cpu_seconds']) for d in rows[k])} |")
# A lower bound: the b3sum pass reads the image too, so only the hot
# transport adds to it without counting that read twice.
print(f"| lower bound: hot transport + the hashing a push adds (b3sum pass scaled to the bytes sent, {hashing:.2f}) | {med['floor-hot'] + hashing:.2f} | {(med['floor-hot'] + hashing) / b3:.2f}x | derived |")
P
