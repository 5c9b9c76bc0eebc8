#!/usr/bin/env python3
"""Summary of benches/compare.sh: medians per case and the ratios the project's
speed targets are written in. Reads RESULT and SPARSE lines (of compare.sh or of
../shared/bench/run.sh) from the files given, or stdin.

usage: compare_summary.py [--workload /tmp/ancbench/workload.json] FILE...

Times are medians over the runs that ended OK (target equal to the source);
`s` is until the command returned, `s+sync` adds a following `sync` (data on
disk). Deltas are compared on `s`, full copies on `s+sync`. Stdlib only."""
import argparse
import json
import re
import statistics
import sys

LINE = re.compile(
    r"RESULT\s+(\S+)\s+(\S+)\s+rep(\d+)\s+([\d.]+) s\s+([\d.]+) s\(\+sync\)\s+\S+ MB/s wire=(\S+) (\S+)(.*)"
)
SPARSE = re.compile(r"SPARSE\s+(\S+)\s+du=(\d+)\s+src_du=(\d+)\s+size=(\d+)")

# Display order; anything else follows in the order seen.
ORDER = [
    ("df-sync", "delta"), ("df-sync-trusted", "delta"), ("rsync-local", "delta"),
    ("df-push-stateless", "delta"), ("df-push-trusted", "delta"), ("rsyncd", "delta"),
    ("b3sum-t2", "hash"), ("b3sum-t1", "hash"), ("df-hash", "hash"),
    ("df-sync", "full"), ("df-push", "full"), ("cp-sparse", "full"), ("rsyncd", "full"), ("socat-tcp", "full"),
]


def num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def mb(x):
    return "-" if x is None else f"{x / 1e6:.2f} MB"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="/tmp/ancbench/workload.json")
    ap.add_argument("files", nargs="*")
    a = ap.parse_args()

    try:
        w = json.load(open(a.workload))
    except (OSError, ValueError):
        w = {}
    size = w.get("size")
    changed_bytes = w.get("modified_bytes")

    runs = {}
    order = []
    sparse = {}
    streams = [open(f, errors="replace") for f in a.files] or [sys.stdin]
    for stream in streams:
        for line in stream:
            m = SPARSE.search(line)
            if m:
                sparse[m.group(1)] = tuple(int(x) for x in m.group(2, 3, 4))
                continue
            m = LINE.search(line)
            if not m:
                continue
            tool, mode, rep, secs, secs_sync, wire, verdict, rest = m.groups()
            extras = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
            key = (tool, mode)
            if key not in runs:
                runs[key] = []
                order.append(key)
            runs[key].append({
                "ok": verdict == "OK", "s": float(secs), "ss": float(secs_sync), "wire": num(wire), **extras,
            })
    if size is None:
        size = 4 << 30
    gb = size / 1e9
    keys = [k for k in ORDER if k in runs] + [k for k in order if k not in ORDER]

    def stat(key, field):
        rs = [r for r in runs.get(key, []) if r["ok"]]
        return med([num(r.get(field)) for r in rs])

    print()
    print(f"== medians per case (image {size / 1e9:.2f} GB"
          + (f", {changed_bytes // 4096} changed 4 KiB pages = {changed_bytes / 1e6:.2f} MB" if changed_bytes else "")
          + ")")
    print("| tool | mode | ok/runs | s median (min-max) | s+sync median | MB/s | wire bytes | CPU-s/GB source | CPU-s/GB target | path_mtu |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in keys:
        rs = runs[key]
        ok = [r for r in rs if r["ok"]]
        s = med([r["s"] for r in ok])
        ss = med([r["ss"] for r in ok])
        rng = f" ({min(r['s'] for r in ok):.2f}-{max(r['s'] for r in ok):.2f})" if ok else ""
        src_cpu = stat(key, "src_cpu") if stat(key, "src_cpu") is not None else stat(key, "cpu")
        tgt_cpu = stat(key, "tgt_cpu")
        wire = med([r["wire"] for r in ok])
        mtu = stat(key, "path_mtu")
        print(f"| {key[0]} | {key[1]} | {len(ok)}/{len(rs)} | {fmt(s)}{rng} | {fmt(ss)} | "
              f"{fmt(size / s / 1e6 if s else None, '.0f')} | {fmt(wire, '.0f')} | "
              f"{fmt(src_cpu / gb if src_cpu is not None else None)} | {fmt(tgt_cpu / gb if tgt_cpu is not None else None)} | "
              f"{fmt(mtu, '.0f')} |")

    def t(tool, mode, field="s"):
        rs = [r for r in runs.get((tool, mode), []) if r["ok"]]
        return med([r[field] for r in rs])

    def ratio(a, b):
        return a / b if a is not None and b else None

    checks = []  # (what, value, shown, target text, ok?)

    def faster(what, ours, peer, goal):
        r = ratio(peer, ours)
        checks.append((what, f"{fmt(ours)} s, reference {fmt(peer)} s", f"{fmt(r)}x faster", f">= {goal}x",
                       None if r is None else r >= goal))

    def within(what, ours, base, goal=None):
        r = ratio(ours, base)
        checks.append((what, f"{fmt(ours)} s, reference {fmt(base)} s", f"{fmt(r)}x", f"<= {goal}x" if goal else "-",
                       None if r is None or goal is None else r <= goal))

    faster("local sync, target without state, vs rsync local (--inplace --no-whole-file)",
           t("df-sync", "delta"), t("rsync-local", "delta"), 3)
    within("local delta with the target's trusted manifest, vs b3sum --num-threads 2",
           t("df-sync-trusted", "delta"), t("b3sum-t2", "hash"), 1.5)
    within("diskferry hash vs b3sum --num-threads 2", t("df-hash", "hash"), t("b3sum-t2", "hash"), 1.2)
    faster("push delta, target without state, vs rsync daemon delta",
           t("df-push-stateless", "delta"), t("rsyncd", "delta"), 3)
    budget = 2 * changed_bytes + 0.0005 * size if changed_bytes else None
    for tool in ("df-push-stateless", "df-push-trusted"):
        wire = t(tool, "delta", "wire")
        r = ratio(wire, budget)
        checks.append((f"{tool} wire bytes vs 2 x changed pages + 0.05% of disk", f"{mb(wire)}, budget {mb(budget)}",
                       f"{fmt(r)}x", "<= 1x", None if r is None else r <= 1))
    within("push delta with the target's trusted manifest, vs b3sum --num-threads 2",
           t("df-push-trusted", "delta"), t("b3sum-t2", "hash"), 1.5)
    faster("push full, until on disk, vs rsync daemon --whole-file + sync",
           t("df-push", "full", "ss"), t("rsyncd", "full", "ss"), 1.5)
    within("push full, until on disk, vs cp --sparse=always + sync",
           t("df-push", "full", "ss"), t("cp-sparse", "full", "ss"), 1.6)
    # CPU per byte of a full download, in single-threaded b3sum passes.
    b3 = stat(("b3sum-t1", "hash"), "cpu")
    for side, field, goal in (("target", "tgt_cpu", 3), ("source", "src_cpu", 2)):
        cpu = stat(("df-push", "full"), field)
        r = ratio(cpu, b3)
        checks.append((f"push full, {side} agent CPU vs one b3sum --num-threads 1 pass (CPU)",
                       f"{fmt(cpu)} CPU-s, reference {fmt(b3)} CPU-s", f"{fmt(r)}x", f"<= {goal}x",
                       None if r is None else r <= goal))
    # For reference, no target:
    within("(ref) local full copy, until on disk, vs cp --sparse=always + sync",
           t("df-sync", "full", "ss"), t("cp-sparse", "full", "ss"))
    within("(ref) push full, until on disk, vs plain TCP (socat) + sync",
           t("df-push", "full", "ss"), t("socat-tcp", "full", "ss"))

    print()
    print("== targets")
    print("| check | measured | ratio | target | |")
    print("|---|---|---|---|---|")
    for what, measured, shown, goal, ok in checks:
        if goal == "-":
            verdict = ""
        else:
            verdict = "n/a" if ok is None else ("ok" if ok else "MISSED")
        print(f"| {what} | {measured} | {shown} | {goal} | {verdict} |")

    print()
    print("== CPU seconds per GB of image (medians)")
    print("| case | source agent | target agent |")
    print("|---|---|---|")
    for key, what in ((("df-push-stateless", "delta"), "push delta, target without state"),
                      (("df-push-trusted", "delta"), "push delta, trusted manifest"),
                      (("df-push", "full"), "push full")):
        if key in runs:
            s, tg = stat(key, "src_cpu"), stat(key, "tgt_cpu")
            print(f"| {what} | {fmt(s / gb if s is not None else None)} | {fmt(tg / gb if tg is not None else None)} |")
    for key, what in ((("df-sync", "delta"), "local sync, target without state (one process)"),
                      (("df-sync-trusted", "delta"), "local delta, trusted manifest (one process)"),
                      (("df-sync", "full"), "local full copy (one process)"),
                      (("df-hash", "hash"), "diskferry hash"), (("b3sum-t2", "hash"), "b3sum --num-threads 2"),
                      (("b3sum-t1", "hash"), "b3sum --num-threads 1"),
                      (("cp-sparse", "full"), "cp --sparse=always")):
        if key in runs and stat(key, "cpu") is not None:
            print(f"| {what} | {fmt(stat(key, 'cpu') / gb)} | |")

    if sparse:
        print()
        print("== sparseness of full copies (du --block-size=1)")
        print("| copy | allocated | source allocated | apparent size |")
        print("|---|---|---|---|")
        for name, (du, src_du, sz) in sparse.items():
            print(f"| {name} | {du} ({du / src_du:.3f}x of source) | {src_du} | {sz} |")
        for key in (("df-sync", "full"),):
            dus = [num(r.get("du")) for r in runs.get(key, []) if r["ok"]]
            dus = [d for d in dus if d]
            src_du = next(iter(sparse.values()))[1]
            if dus:
                print(f"| {key[0]}-{key[1]} | {int(dus[0])} ({dus[0] / src_du:.3f}x of source) | {src_du} | |")

    fails = [(k, sum(not r["ok"] for r in rs)) for k, rs in runs.items() if any(not r["ok"] for r in rs)]
    if fails:
        print()
        print("FAILED runs: " + ", ".join(f"{k[0]} {k[1]} x{n}" for k, n in fails))


if __name__ == "__main__":
    main()
