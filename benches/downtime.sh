#!/bin/bash
# failover-sync on the 4 GiB benchmark disk (compare.sh's workload) with a
# writer rewriting ~1 % of it between passes, the quiesce command stopping
# it; then a plain push of a delta of the same size as the final one, same
# run: downtime_seconds against that push's time. REPS runs (default 3);
# exits 1 when the median ratio misses the goal (at most GOAL=1.3).
set -e
REPS=${REPS:-3}; GOAL=${GOAL:-1.3}
DF=${DF:-$(cd "$(dirname "$0")/.." && pwd)/target/release/diskferry}
SRC=${WORKLOAD:-/tmp/ancbench/src.img}
[ -f "$SRC" ] || { echo "no workload at $SRC: run benches/compare.sh once (it makes it), or set WORKLOAD" >&2; exit 2; }
WORK=${WORK:-/tmp/diskferry-downtime}
RATIOS=$WORK.ratios; : > $RATIOS
one_run() (
W=$WORK; rm -rf $W; mkdir -p $W/a $W/b
PORT_A=47421; PORT_B=47422; EXTRA_TARGET=plain; . "$(dirname "$0")/two-agents.sh"
cp --sparse=always "$SRC" $A
push() { $DF push $1 --peer 127.0.0.1:47422 --peer-fingerprint $FB --target $2 --config $W/a/serve.toml --json | tail -1; }
push $A vm > /dev/null
cat > $W/writer.py <<'P'
import os,sys,random,time
p,d=sys.argv[1],sys.argv[2]; r=random.Random(5); f=open(p,'r+b'); size=os.path.getsize(p)
while not os.path.exists(d+'/stop'):
    n=0
    while n < size//100 and not os.path.exists(d+'/stop'):
        l=r.randint(4096,1<<20); o=r.randrange(0,size-l); f.seek(o); f.write(os.urandom(l)); n+=l
    f.flush(); time.sleep(1.5)
f.flush(); os.fsync(f.fileno()); open(d+'/stopped','w').close()
P
python3 $W/writer.py $A $W &
WP=$!
sleep 2
$DF failover-sync $A --peer 127.0.0.1:47422 --peer-fingerprint $FB --target vm --config $W/a/serve.toml --json \
  --quiesce-cmd "touch $W/stop; while [ ! -e $W/stopped ]; do sleep 0.01; done" --promote --max-passes 5 --converge-bytes 64M | tail -1 > $W/fs.json
wait $WP || true
cmp $A $B && echo "A == B"
python3 - $W/fs.json $W/final_bytes <<'P'
import json,sys
d=json.load(open(sys.argv[1]))
for i,p in enumerate(d['passes']): print(f"pass {i+1}: changed {p['bytes_changed']/2**20:.1f} MiB, sent {p['bytes_sent']/2**20:.1f} MiB, {p['seconds']:.2f} s")
print(f"final delta: changed {d['bytes_written']/2**20:.1f} MiB, push {d['seconds']:.2f} s; quiesce {d['quiesce_seconds']:.2f} s; downtime {d['downtime_seconds']:.2f} s; promoted {d['promoted']}")
open(sys.argv[2],'w').write(str(d['bytes_written']))
P
# A plain push of a delta of the same size, same run: a second copy on B.
push $A plain > /dev/null
N=$(cat $W/final_bytes)
python3 - $A $N <<'P'
import os,sys,random
p,n=sys.argv[1],int(sys.argv[2]); r=random.Random(9); f=open(p,'r+b'); size=os.path.getsize(p); w=0
while w < max(n,4096):
    l=min(r.randint(4096,1<<20), max(n-w,4096)); o=r.randrange(0,size-l); f.seek(o); f.write(os.urandom(l)); w+=l
P
s=$(date +%s.%N); push $A plain > $W/plain.json; e=$(date +%s.%N)
python3 - $W/fs.json $W/plain.json $e $s $RATIOS <<'P'
import json,sys
f,d=json.load(open(sys.argv[1])),json.load(open(sys.argv[2]))
print(f"plain push of a delta of the same size: changed {d['bytes_written']/2**20:.1f} MiB, {d['seconds']:.2f} s (wall {float(sys.argv[3])-float(sys.argv[4]):.2f} s)")
r=f['downtime_seconds']/max(d['seconds'],1e-3)
print(f"RESULT downtime {f['downtime_seconds']:.3f} s, plain push {d['seconds']:.3f} s, ratio {r:.2f}")
open(sys.argv[5],'a').write(f"{r}\n")
P
)
for rep in $(seq "$REPS"); do echo "== run $rep of $REPS"; one_run; done
python3 - $RATIOS $GOAL <<'P'
import sys,statistics
r=sorted(float(x) for x in open(sys.argv[1]).read().split())
m=statistics.median(r); goal=float(sys.argv[2])
print(f"downtime / plain push of the same delta: runs {', '.join(f'{x:.2f}' for x in r)}; median {m:.2f}x (goal <= {goal}x): {'met' if m<=goal else 'MISSED'}")
sys.exit(0 if m<=goal else 1)
P
