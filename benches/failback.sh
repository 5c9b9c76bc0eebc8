#!/bin/bash
# A planned failover round trip on a 2 GiB disk: time and bytes read of the
# reverse push (B -> A, A at the failover point) against rsync --inplace of
# the same change onto a copy of A's disk, same run, hot cache.
set -e
DF=${DF:-$(cd "$(dirname "$0")/.." && pwd)/target/release/diskferry}
W=${WORK:-/tmp/diskferry-failback}; rm -rf $W; mkdir -p $W/a $W/b
PORT_A=47411; PORT_B=47412; . "$(dirname "$0")/two-agents.sh"
python3 - $A <<'P'
import os,sys,random
r=random.Random(7); f=open(sys.argv[1],'wb'); f.truncate(2<<30)
for i in range(0,2<<30,64<<20):
    if r.random()<0.75: f.seek(i); f.write(os.urandom(64<<20))
P
$DF push $A --peer 127.0.0.1:47412 --peer-fingerprint $FB --target vm --state-dir $W/a/state --json | tail -1 > $W/full.json
$DF failover vm --config $W/b/serve.toml --json | tail -1
cp --sparse=always $A $W/a/rsync.img
python3 - $B <<'P'
import os,sys,random
r=random.Random(8); f=open(sys.argv[1],'r+b'); n=0
while n < 64<<20:
    l=r.randint(4096,256<<10); o=r.randrange(0,(2<<30)-l); f.seek(o); f.write(os.urandom(l)); n+=l
print("VM wrote", n, "bytes")
P
cat $A $B $W/a/rsync.img > /dev/null
s=$(date +%s.%N)
$DF push $B --peer 127.0.0.1:47411 --peer-fingerprint $FA --target vm --state-dir $W/b/state --json | tail -1 > $W/rev.json
e=$(date +%s.%N)
s2=$(date +%s.%N)
rsync -I --inplace --no-whole-file $B $W/a/rsync.img
e2=$(date +%s.%N)
python3 - $W/rev.json $s $e $s2 $e2 <<'P'
import json,sys
d=json.load(open(sys.argv[1])); t=float(sys.argv[3])-float(sys.argv[2]); r=float(sys.argv[5])-float(sys.argv[4])
print(f"reverse push: mode {d['mode']} {t:.2f} s, blocks changed {d['blocks_changed']} ({d['blocks_changed']*65536/2**20:.1f} MiB), "
      f"target read {d['target_bytes_read']/2**20:.1f} MiB, sent {d['bytes_sent']/2**20:.1f} MiB, common {d['common_point']}")
print(f"rsync -I --inplace --no-whole-file: {r:.2f} s (reads both 2 GiB files); ratio {r/t:.2f}x")
P
cmp $A $B && echo "A == B"
cmp $W/a/rsync.img $B && echo "rsync copy == B"
