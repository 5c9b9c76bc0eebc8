#!/bin/bash
# A replication group of 8 disks of 512 MiB (the 4 GiB benchmark disk cut
# in eight) pushed with push-group — a full download, then a 1 % delta —
# against the same 4 GiB pushed as one disk in the same mode, same run.
# Goal (issue 12): the group takes at most 1.2x the one disk's time. Also
# reports the target agent's peak RssAnon during each push (stderr). REPS rounds (default 3).
set -euo pipefail
REPS=${REPS:-3}
DF=${DF:-$(cd "$(dirname "$0")/.." && pwd)/target/release/diskferry}
SRC=${WORKLOAD:-/tmp/ancbench/src.img}
[ -f "$SRC" ] || { echo "no workload at $SRC: run benches/compare.sh once (it makes it), or set WORKLOAD" >&2; exit 2; }
W=${WORK:-/tmp/diskferry-group}; rm -rf $W; mkdir -p $W/a $W/b
PORT_A=47451; PORT_B=47452; EXTRA_TARGET=one; . "$(dirname "$0")/two-agents.sh"
# Eight more targets on B, for the members.
for i in 0 1 2 3 4 5 6 7; do
  printf '[[target]]\nname = "m%s"\npath = "%s/b/m%s.img"\nallowed_peers = ["p"]\n' $i $W $i >> $W/b/serve.toml
done
kill $PB; wait $PB 2>/dev/null || true
$DF serve --config $W/b/serve.toml 2>$W/b/log & PB=$!
trap "kill $PA $PB 2>/dev/null" EXIT
for _ in $(seq 100); do grep -q serving $W/b/log && break; sleep 0.1; done
cp --sparse=always "$SRC" $W/a/one.img
size=$(stat -c %s "$SRC"); part=$((size / 8))
disks=()
for i in 0 1 2 3 4 5 6 7; do
  dd if="$SRC" of=$W/a/m$i.img bs=1M skip=$((i * part / 1048576)) count=$((part / 1048576)) conv=sparse status=none
  disks+=(--disk $W/a/m$i.img=m$i)
done
peer=(--peer 127.0.0.1:$PORT_B --peer-fingerprint $FB --config $W/a/serve.toml --json)
# Peak RssAnon of the target agent while a command runs (sampled every 20 ms).
sample() { local m=0 r; while [ ! -e $W/stop-sampling ]; do r=$(awk '/RssAnon/{print $2}' /proc/$PB/status); [ "$r" -gt "$m" ] && m=$r; echo $m > $W/peak; sleep 0.02; done; }
peak_of() { rm -f $W/stop-sampling; echo 0 > $W/peak; sample & local sp=$!; "$@"; touch $W/stop-sampling; wait $sp; echo "peak RssAnon $(( $(cat $W/peak) / 1024 )) MiB" >&2; }
secs() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read().splitlines()[-1])["seconds"])'; }
change() { python3 - "$@" <<'P'
import os,sys,random
r=random.Random(int(sys.argv[1]))
for p in sys.argv[2:]:
    size=os.path.getsize(p); f=open(p,'r+b')
    for _ in range(size//100//65536): f.seek(r.randrange(0,size//65536)*65536); f.write(os.urandom(65536))
P
}
for rep in $(seq $REPS); do
  one=$(peak_of $DF push $W/a/one.img --target one --mode full --force "${peer[@]}" | secs)
  grp=$(peak_of $DF push-group --group g "${disks[@]}" --mode full --force "${peer[@]}" | secs)
  echo "round $rep full: one disk $one s, group of 8 $grp s, ratio $(python3 -c "print(round($grp/$one,2))") (goal <= 1.2)"
  change $rep $W/a/one.img; change $rep $W/a/m?.img
  one=$(peak_of $DF push $W/a/one.img --target one "${peer[@]}" | secs)
  grp=$(peak_of $DF push-group --group g "${disks[@]}" "${peer[@]}" | secs)
  echo "round $rep delta: one disk $one s, group of 8 $grp s, ratio $(python3 -c "print(round($grp/$one,2))") (goal <= 1.2)"
done
echo "target agent: memory_budget_mib 128 (the default); VmHWM $(( $(awk '/VmHWM/{print $2}' /proc/$PB/status) / 1024 )) MiB"
[ -n "${KEEP:-}" ] || rm -rf $W
