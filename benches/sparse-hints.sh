#!/bin/bash
# A 1 TiB sparse disk holding 1 GiB, 10 MiB of it rewritten, pushed with a
# change list; against the same 10 MiB pushed (also with a change list)
# onto a 1 GiB disk holding the same data, same run. Goal (issue 11): the
# 1 TiB hinted delta takes at most 2x the 1 GiB one. Three rounds, the order
# of the two pushes alternating, each starting with no dirty pages; the
# last line gives the median ratio.
set -euo pipefail
DF=${DF:-$(cd "$(dirname "$0")/.." && pwd)/target/release/diskferry}
W=${WORK:-/tmp/diskferry-sparse}; rm -rf $W; mkdir -p $W/a $W/b
PORT_A=47441; PORT_B=47442; EXTRA_TARGET=small; . "$(dirname "$0")/two-agents.sh"
push() { $DF push "$1" --peer 127.0.0.1:$PORT_B --peer-fingerprint $FB --target $2 --config $W/a/serve.toml --json "${@:3}" | tail -1; }
BIG=$A SMALL=$W/a/small.img
python3 - $BIG $SMALL <<'P'
import os,sys,random
big,small=sys.argv[1],sys.argv[2]; r=random.Random(3)
with open(big,'wb') as f: f.truncate(1<<40)
with open(small,'wb') as f: f.truncate(1<<30)
# 1 GiB of data in 64 runs of 16 MiB, spread over the 1 TiB disk; the small disk holds the same runs back to back.
with open(big,'r+b') as fb, open(small,'r+b') as fs:
    for i in range(64):
        data=os.urandom(16<<20)
        fb.seek(i*(16<<30)+(r.randrange(0,1000)<<20)); fb.write(data)
        fs.seek(i*(16<<20)); fs.write(data)
P
gb=$(push $BIG vm | python3 -c 'import json,sys;print(json.load(sys.stdin)["generation"])')
gs=$(push $SMALL small | python3 -c 'import json,sys;print(json.load(sys.stdin)["generation"])')
# 10 MiB rewritten in 160 pieces of 64 KiB inside the data, the same pieces on both.
python3 - $BIG $SMALL $gb $gs $W <<'P'
import os,sys,random,json
big,small,gb,gs,w=sys.argv[1:6]; r=random.Random(4)
offs_big=[]; offs_small=[]
# recompute the run layout as written above
rr=random.Random(3); starts=[i*(16<<30)+(rr.randrange(0,1000)<<20) for i in range(64)]
with open(big,'r+b') as fb, open(small,'r+b') as fs:
    for _ in range(160):
        i=r.randrange(64); o=r.randrange(0,256)*65536; d=os.urandom(65536)
        fb.seek(starts[i]+o); fb.write(d); fs.seek(i*(16<<20)+o); fs.write(d)
        offs_big.append([starts[i]+o,65536]); offs_small.append([i*(16<<20)+o,65536])
json.dump({"since":gb,"ranges":offs_big},open(w+"/big.json","w")); json.dump({"since":gs,"ranges":offs_small},open(w+"/small.json","w"))
P
for rep in 1 2 3; do
  # Fresh bytes in the same 160 pieces every round: each push carries 10 MiB.
  [ $rep = 1 ] || python3 - $W <<'P'
import os,sys,json
w=sys.argv[1]
for name,img in (("big","vm.img"),("small","small.img")):
    with open(f"{w}/a/{img}",'r+b') as f:
        for o,n in json.load(open(f"{w}/{name}.json"))["ranges"]: f.seek(o); f.write(os.urandom(n))
P
  big() { sync; push $BIG vm --changes ranges:$W/big.json > $W/big.$rep.json; }
  small() { sync; push $SMALL small --changes ranges:$W/small.json > $W/small.$rep.json; }
  if [ $((rep % 2)) = 1 ]; then big; small; else small; big; fi
  python3 - $W/big.$rep.json $W/small.$rep.json <<'P'
import json,sys
b,s=json.load(open(sys.argv[1])),json.load(open(sys.argv[2]))
print(f"1 TiB: {b['change_source']} {b['seconds']:.2f} s, read {b['source_bytes_read']/2**20:.1f} MiB, changed {b['blocks_changed']} blocks; 1 GiB: {s['change_source']} {s['seconds']:.2f} s, changed {s['blocks_changed']} blocks; ratio {b['seconds']/s['seconds']:.2f} (goal <= 2)")
P
  # the next round's lists count from the generations just made
  python3 - $W $W/big.$rep.json $W/small.$rep.json <<'P'
import json,sys
w=sys.argv[1]
for name,rep in (("big",sys.argv[2]),("small",sys.argv[3])):
    l=json.load(open(f"{w}/{name}.json")); l["since"]=json.load(open(rep))["generation"]; json.dump(l,open(f"{w}/{name}.json","w"))
P
done
python3 - $W <<'P'
import json,statistics,sys
w=sys.argv[1]; r=[json.load(open(f"{w}/big.{i}.json"))['seconds']/json.load(open(f"{w}/small.{i}.json"))['seconds'] for i in (1,2,3)]
m=statistics.median(r)
print(f"median ratio {m:.2f} of {', '.join(f'{x:.2f}' for x in r)} (goal <= 2: {'met' if m<=2 else 'MISSED'})")
P
[ -n "${KEEP:-}" ] || rm -rf $W
