#!/bin/bash
# Hinted deltas on the 4 GiB benchmark disk (compare.sh's workload) with 1 %
# of its blocks rewritten: a change list (ranges), a qcow2 dirty bitmap and
# the extent map of reflink snapshots (a raw image on a loop-mounted XFS),
# each against a full-read delta of the same change to a second target and
# one `b3sum --num-threads 2` pass over the raw image, same run, hot cache.
# Goals (issue 11): source_bytes_read <= 2x the changed blocks + 1 % of the
# disk, and the hinted push <= 0.6x the b3sum pass.
# ROUNDS=3 (default): each source is timed that many times in a row (a new
# 1 % rewrite each round, each hinted push counting from the one before),
# every round beside its own full-read delta and b3sum pass; a last line per
# source gives the medians (this machine varies up to 2x between minutes).
set -euo pipefail
DF=${DF:-$(cd "$(dirname "$0")/.." && pwd)/target/release/diskferry}
SRC=${WORKLOAD:-/tmp/ancbench/src.img}
[ -f "$SRC" ] || { echo "no workload at $SRC: run benches/compare.sh once (it makes it), or set WORKLOAD" >&2; exit 2; }
ROUNDS=${ROUNDS:-3}
W=${WORK:-/tmp/diskferry-hints}; rm -rf $W; mkdir -p $W/a $W/b
PORT_A=47431; PORT_B=47432; EXTRA_TARGET=plain; . "$(dirname "$0")/two-agents.sh"
push() { $DF push "$1" --peer 127.0.0.1:$PORT_B --peer-fingerprint $FB --target $2 --config $W/a/serve.toml --json "${@:3}" | tail -1; }
# The full-read deltas to target "plain" come from a state directory of
# their own (the same identity): a source keeps one history per disk, and a
# push of it to another target replaces the record a hint counts from (the
# hint is then refused, as it must be).
mkdir -p $W/a2/state && cp -a $W/a/state/identity $W/a2/state/
plain() { $DF push "$1" --peer 127.0.0.1:$PORT_B --peer-fingerprint $FB --target plain --state-dir $W/a2/state --json "${@:2}" | tail -1; }
field() { python3 -c "import json,sys;print(json.load(open('$1'))['$2'])"; }
# Hot cache for b3sum too: the pushes' images and targets push SRC out.
# Every timed run starts with no dirty pages: the setup writes about 8 GiB
# (copies, first pushes), whose writeback would otherwise land in the
# commit's fsyncs of whichever push runs next.
b3() { local s e; cat "$SRC" > /dev/null; sync; s=$(date +%s.%N); b3sum --num-threads 2 "$SRC" > /dev/null; e=$(date +%s.%N); python3 -c "print(f'{$e-$s:.3f}')"; }
# 1 % of the 64 KiB blocks rewritten at random; prints the change list's ranges.
rewrite_py='
import os,sys,random,json
p,seed=sys.argv[1],int(sys.argv[2]); r=random.Random(seed); size=os.path.getsize(p); blocks=size//65536
picked=sorted(r.sample(range(blocks), blocks//100)); f=open(p,"r+b"); out=[]
for b in picked:
    f.seek(b*65536); f.write(os.urandom(65536)); out.append([b*65536,65536])
f.close(); print(json.dumps(out))'
report() { # name hinted.json plain.json b3sum-seconds
  python3 - "$@" <<'P'
import json,sys
name,h,p,b=sys.argv[1],json.load(open(sys.argv[2])),json.load(open(sys.argv[3])),float(sys.argv[4])
changed=h['blocks_changed']*65536; disk=h['disk_bytes']; bound=2*changed+disk//100
print(f"{name}: change_source {h['change_source']}, read {h['source_bytes_read']/2**20:.1f} MiB (bound {bound/2**20:.1f} MiB: {'met' if h['source_bytes_read']<=bound else 'MISSED'}), "
      f"hinted push {h['seconds']:.2f} s vs full-read delta {p['seconds']:.2f} s ({p['source_bytes_read']/2**20:.0f} MiB read) vs b3sum -t2 {b:.2f} s: "
      f"{h['seconds']/b:.2f}x b3sum (goal <= 0.6x: {'met' if h['seconds']<=0.6*b else 'MISSED'})")
P
}
ROUND_FILE=$W/rounds
round_done() { # name hinted.json plain.json b3sum-seconds: reports one round and keeps it for the medians
  report "$@"
  echo "$1 $2 $3 $4" >> $ROUND_FILE
  cp "$2" "$2.$(wc -l < $ROUND_FILE)"; cp "$3" "$3.$(wc -l < $ROUND_FILE)"
}
medians() { # name: the median of each figure over the source's rounds
  python3 - "$1" $ROUND_FILE <<'P'
import json,statistics,sys
name=sys.argv[1]; rows=[l.split() for l in open(sys.argv[2])]
rows=[(json.load(open(f"{h}.{i+1}")),json.load(open(f"{p}.{i+1}")),float(b)) for i,(n,h,p,b) in enumerate(rows) if n==name]
med=lambda xs: statistics.median(xs)
h=med([r[0]['seconds'] for r in rows]); p=med([r[1]['seconds'] for r in rows]); b=med([r[2] for r in rows])
ratios=[r[0]['seconds']/r[2] for r in rows]; ratio=med(ratios); read=med([r[0]['source_bytes_read'] for r in rows])
print(f"{name}: medians of {len(rows)} rounds: hinted push {h:.2f} s ({read/2**20:.1f} MiB read), full-read delta {p:.2f} s, b3sum -t2 {b:.2f} s; "
      f"ratio per round {', '.join(f'{x:.2f}' for x in ratios)}: median {ratio:.2f}x b3sum "
      f"(goal <= 0.6x: {'met' if ratio<=0.6 else 'MISSED'})")
P
}

# --- ranges: a change list from the writer itself
A=$W/a/vm.img
cp --sparse=always "$SRC" $A
plain $A > /dev/null
gen=$(push $A vm | python3 -c 'import json,sys;print(json.load(sys.stdin)["generation"])')
for r in $(seq $ROUNDS); do
  python3 -c "$rewrite_py" $A $r > $W/ranges
  python3 -c "import json;print(json.dumps({'since':'$gen','ranges':json.load(open('$W/ranges'))}))" > $W/changes.json
  cat $A > /dev/null; sync
  push $A vm --changes ranges:$W/changes.json > $W/ranges-hinted.json
  gen=$(field $W/ranges-hinted.json generation)
  sync; plain $A > $W/ranges-plain.json
  round_done ranges $W/ranges-hinted.json $W/ranges-plain.json "$(b3)"
done
medians ranges
cmp $A $W/b/vm.img && cmp $A $W/b/plain.img && echo "ranges: both replicas byte-exact"
rm -f $A $W/b/vm.img $W/b/plain.img   # room for the qcow2 round (its first pushes are --force)

# --- dirty bitmap: the same workload as a qcow2 image
Q=$W/a/vm.qcow2
qemu-img convert -O qcow2 "$SRC" $Q
plain $Q --format qcow2 --force > /dev/null
push $Q vm --format qcow2 --changes dirty-bitmap --force > /dev/null
for r in $(seq $ROUNDS); do
  python3 - $Q $r <<'P' > $W/qemu-io.cmds
import random,subprocess,sys
r=random.Random(1 + int(sys.argv[2])); size=4<<30; blocks=size//65536
for b in sorted(r.sample(range(blocks), blocks//100)):
    print(f"write -P {r.randrange(1,255)} {b*65536} 65536")
P
  qemu-io -f qcow2 $Q < $W/qemu-io.cmds > /dev/null
  cat $Q > /dev/null; sync
  push $Q vm --format qcow2 --changes dirty-bitmap > $W/bitmap-hinted.json
  sync; plain $Q --format qcow2 > $W/bitmap-plain.json
  round_done dirty-bitmap $W/bitmap-hinted.json $W/bitmap-plain.json "$(b3)"
done
medians dirty-bitmap
qemu-img compare -q -f qcow2 -F raw $Q $W/b/vm.img && qemu-img compare -q -f qcow2 -F raw $Q $W/b/plain.img \
  && echo "dirty-bitmap: both replicas byte-exact"
rm -f $Q $W/b/vm.img $W/b/plain.img

# --- extent map: the raw workload on a loop-mounted XFS, reflink snapshots
# (root and xfsprogs, as the tests need them)
if [ "$(id -u)" != 0 ] || ! command -v mkfs.xfs > /dev/null; then
  echo "extent-map: skipped (needs root and mkfs.xfs)"; rm -rf $W; exit 0
fi
X=$W/xfs; mkdir -p $X/mnt; truncate -s 12G $X/fs.img
mkfs.xfs -q -f -m reflink=1 $X/fs.img
LOOP=$(losetup -f --show $X/fs.img)
# (set -e holds in the trap too: each step may find its work done already)
trap "kill $PA $PB 2>/dev/null || true; umount $X/mnt 2>/dev/null || true; losetup -d $LOOP 2>/dev/null || true" EXIT
mount $LOOP $X/mnt
E=$X/mnt/vm.img
cp --sparse=always "$SRC" $E
plain $E --force > /dev/null
push $E vm --snapshot reflink --changes extent-map --force > /dev/null
for r in $(seq $ROUNDS); do
  python3 -c "$rewrite_py" $E $((2 + r)) > /dev/null
  cat $E > /dev/null; sync
  push $E vm --snapshot reflink --changes extent-map > $W/extent-hinted.json
  sync; plain $E > $W/extent-plain.json
  round_done extent-map $W/extent-hinted.json $W/extent-plain.json "$(b3)"
done
medians extent-map
cmp $E $W/b/vm.img && cmp $E $W/b/plain.img && echo "extent-map: both replicas byte-exact"
# The agents first: the mount is busy while they run.
kill $PA $PB 2>/dev/null; wait $PA $PB 2>/dev/null || true
umount $X/mnt
# udev may still be probing the device just unmounted: one retry.
losetup -d $LOOP 2>/dev/null || { sleep 1; losetup -d $LOOP; }
rm -rf $W
