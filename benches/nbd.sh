#!/bin/bash
# Hashing a qcow2 image through NBD (`diskferry hash IMG --format qcow2`,
# which runs its own qemu-nbd) against `qemu-img convert -O raw` of the same
# image to a null sink, same run, hot cache. The goal: at least half
# qemu-img's throughput. The image is compare.sh's 4 GiB workload
# converted to qcow2 (made once, kept beside it).
set -euo pipefail
DF=${DF:-$(cd "$(dirname "$0")/.." && pwd)/target/release/diskferry}
SRC=${WORKLOAD:-/tmp/ancbench/src.img}
REPS=${REPS:-3}
[ -f "$SRC" ] || { echo "no workload at $SRC: run benches/compare.sh once (it makes it), or set WORKLOAD" >&2; exit 2; }
IMG=${SRC%.img}.qcow2
[ -f "$IMG" ] || qemu-img convert -O qcow2 "$SRC" "$IMG"
size=$(qemu-img info --output=json "$IMG" | python3 -c 'import json,sys;print(json.load(sys.stdin)["virtual-size"])')
cat "$IMG" > /dev/null   # hot cache for both
t() { local s e; s=$(date +%s.%N); "$@" > /dev/null; e=$(date +%s.%N); python3 -c "print(f'{$e-$s:.3f}')"; }
qi=(); df=(); nbd=()
for rep in $(seq "$REPS"); do
  # /dev/null cannot be a raw target (qemu-img wants to size it): null-co
  # is QEMU's own sink of that size, the same reads and conversion.
  qi+=("$(t qemu-img convert -n --target-image-opts "$IMG" "driver=null-co,size=$size")")
  df+=("$(t "$DF" hash "$IMG" --format qcow2 --json)")
  nbd+=("$(DISKFERRY_NBD_DIRECT=0 t "$DF" hash "$IMG" --format qcow2 --json)")
  echo "run $rep: qemu-img convert ${qi[-1]} s, diskferry hash --format qcow2 ${df[-1]} s, every byte through qemu-nbd ${nbd[-1]} s"
done
python3 - "$size" "${qi[*]}" "${df[*]}" "${nbd[*]}" <<'P'
import statistics,sys
size=int(sys.argv[1]); qi,df,nbd=([float(x) for x in a.split()] for a in sys.argv[2:5])
q,d,n=statistics.median(qi),statistics.median(df),statistics.median(nbd)
ratio=q/d
print(f"median: qemu-img convert -O raw {q:.2f} s ({size/q/1e6:.0f} MB/s), diskferry hash --format qcow2 {d:.2f} s ({size/d/1e6:.0f} MB/s); throughput ratio {ratio:.2f} (goal >= 0.5): {'met' if ratio>=0.5 else 'MISSED'}")
print(f"every byte through qemu-nbd (DISKFERRY_NBD_DIRECT=0): {n:.2f} s ({size/n/1e6:.0f} MB/s), ratio {q/n:.2f}")
sys.exit(0 if ratio>=0.5 else 1)
P
