#!/usr/bin/env bash
# End-to-end comparison of diskferry with the peer tools, in ONE invocation,
# interleaved over REPS repetitions, on the workload of ../shared/bench/genwork.py
# (4 GiB under /tmp/ancbench by default). Every run prints one line
#   RESULT tool mode repN secs s secs+sync s(+sync) MB/s(image) MB/s wire=BYTES OK|FAIL [key=value...]
# as ../shared/bench/run.sh does; at the end, a summary of medians per case and
# the ratios the project's targets are written in (benches/compare_summary.py).
#
# Per repetition:
#   run.sh (REPS=1)   peers (rsync daemon delta/full, rsync local, socat, and any of
#                     diskrsync/bdsync/blocksync-fast installed) and, in its OURS slots:
#     df-sync delta     diskferry sync SRC TGT, fresh state dir (target without state: full compare)
#     df-sync full      diskferry sync SRC FULL --mode full, fresh state dir
#   df-sync-trusted delta   TGT given state by an untimed sync of src_stale.img, then SRC -> TGT timed
#   b3sum-t2 hash / df-hash hash   one hashing pass over SRC (the ceilings)
#   b3sum-t1 hash     one single-threaded pass: the unit for the agents' CPU (cpu=)
#   cp-sparse full    cp --sparse=always SRC X (secs+sync = until on disk)
#   df-push-stateless delta  push SRC onto the stale target, serve with no state for it
#   df-push-trusted delta    same, after an untimed push of src_stale.img gave the target state
#   df-push full             push SRC to a new file
# Our push lines carry src_cpu (push's cpu_seconds), tgt_cpu (serve's utime+stime
# during that push, from /proc), path_mtu, bytes_sent, self_s (push's own seconds).
#
# Env knobs (defaults):
#   REPS=3  COLD=0 (1: drop the page cache before every run; needs root)
#   S=4G SEED=42 ZERO_FRAC=0.25 MOD_FRAC=0.01   workload (regenerated when it differs)
#   REGEN=0 (1: regenerate the workload first)  ANC_DIR=/tmp/ancbench
#   TOOLS="..."  peers for run.sh (default: the installed ones of rsyncd rsync-local
#                rsyncd-full socat diskrsync diskrsync-full bdsync bdsync-full bsf bsf-warm bsf-full)
#   CASES="local trusted hash cp push"   which of our own cases to run (besides run.sh's)
#   NO_BUILD=1   skip cargo build --release
#   BASELINE=/path/to/another/diskferry   also run our own cases with that binary in
#                every repetition (tools tagged @base, order alternating), so before and
#                after figures come from one run on the same machine state
# Logs: $ANC_DIR/df/logs/, RESULT lines also in $ANC_DIR/df/results-<time>.txt.
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1 LC_ALL=C

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BENCH=${BENCH:-$(cd "$ROOT/../shared/bench" && pwd)}
export ANC_DIR=${ANC_DIR:-/tmp/ancbench}
REPS=${REPS:-3}
COLD=${COLD:-0}
S=${S:-4G}
SEED=${SEED:-42}
ZERO_FRAC=${ZERO_FRAC:-0.25}
MOD_FRAC=${MOD_FRAC:-0.01}
CASES=${CASES-"local trusted hash cp push"}
export PATH="$HOME/.cargo/bin:$PATH"
export SRC=$ANC_DIR/src.img TGT=$ANC_DIR/tgt.img FULL=$ANC_DIR/full.img
STALE=$ANC_DIR/src_stale.img
WORK=$ANC_DIR/df
LOGS=$WORK/logs
RUNS=$WORK/run
mkdir -p "$LOGS" "$RUNS"
RES=$WORK/results-$(date +%Y%m%d-%H%M%S).txt
: > "$RES"
export DF=$ROOT/target/release/diskferry
NEW_DF=$DF
BASELINE=${BASELINE:-}
TAG=
CLK_TCK=$(getconf CLK_TCK)

say() { printf '%s\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1; }
now() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }
case_on() { case " $CASES " in *" $1 "*) return 0 ;; esac; return 1; }

# ------------------------------------------------------------------ cleanup
SERVE_PID=
SERVE_ADDR=
TOUCHED_TGT=0   # 1 while TGT may differ from the stale target
serve_stop() {
  if [ -n "$SERVE_PID" ]; then
    kill -TERM "$SERVE_PID" 2>/dev/null || true
    wait "$SERVE_PID" 2>/dev/null || true
    SERVE_PID=
  fi
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  serve_stop
  # Every write into TGT is a delta from SRC (or from src_stale, which equals the
  # stale TGT), so it touched only the modified pages: writing them back restores it.
  if [ "$TOUCHED_TGT" = 1 ] && [ -f "$ANC_DIR/undo.bin" ]; then
    python3 "$BENCH/genwork.py" --dir "$ANC_DIR" --reset-target >/dev/null 2>&1 || true
  fi
  rm -rf "$RUNS" "$ANC_DIR/cp.img" "$FULL"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ build
if [ "${NO_BUILD:-0}" != 1 ]; then
  say "building target/release/diskferry"
  (cd "$ROOT" && cargo build --release -q)
fi
[ -x "$DF" ] || { echo "no $DF" >&2; exit 1; }
[ -z "$BASELINE" ] || [ -x "$BASELINE" ] || { echo "no $BASELINE" >&2; exit 1; }

# ------------------------------------------------------------------ workload
regen() {
  say "generating the workload (S=$S seed=$SEED) under $ANC_DIR"
  python3 "$BENCH/genwork.py" --dir "$ANC_DIR" --size "$S" --seed "$SEED" \
    --zero-frac "$ZERO_FRAC" --mod-frac "$MOD_FRAC" | sed 's/^/workload /'
}
want=$(python3 -c "import sys;sys.path.insert(0,'$BENCH');import genwork;print(genwork.parse_size('$S'))")
want="$want $SEED $ZERO_FRAC $MOD_FRAC"
cur=$(python3 -c "import json;d=json.load(open('$ANC_DIR/workload.json'));print(d['size'],d['seed'],d['zero_frac_target'],d['mod_frac'])" 2>/dev/null || true)
if [ "${REGEN:-0}" = 1 ] || [ "$cur" != "$want" ] || [ ! -f "$SRC" ] || [ ! -f "$TGT" ] || [ ! -f "$ANC_DIR/undo.bin" ]; then
  regen
else
  say "workload reused: $cur (REGEN=1 to force)"
fi
SIZE=$(stat -c %s "$SRC")

reset_tgt() { python3 "$BENCH/genwork.py" --dir "$ANC_DIR" --reset-target >/dev/null; }

# src_stale.img: SRC with the original pages written back (== the stale TGT),
# made once per workload; a stamp of the workload parameters and undo.bin says
# whether the one on disk belongs to this workload.
stale_stamp() {
  printf '%s %s\n' "$want" "$(sha256sum "$ANC_DIR/undo.bin" | cut -d' ' -f1)"
}
make_stale() {
  if [ -f "$STALE" ] && [ "$(cat "$STALE.stamp" 2>/dev/null)" = "$(stale_stamp)" ]; then
    return 0
  fi
  say "making $STALE (SRC with the original pages of undo.bin written back)"
  rm -f "$STALE.tmp" "$STALE.stamp"
  cp --sparse=always "$SRC" "$STALE.tmp"
  python3 - "$ANC_DIR/undo.bin" "$STALE.tmp" <<'EOF'
import os, struct, sys
PAGE = 4096
fd = os.open(sys.argv[2], os.O_WRONLY)
with open(sys.argv[1], "rb") as undo:
    while True:
        rec = undo.read(8 + PAGE)
        if not rec:
            break
        if len(rec) != 8 + PAGE:
            sys.exit("undo.bin: truncated record")
        (off,) = struct.unpack("<Q", rec[:8])
        os.pwrite(fd, rec[8:], off)
os.fsync(fd)
os.close(fd)
EOF
  mv "$STALE.tmp" "$STALE"
  stale_stamp > "$STALE.stamp"
}
make_stale

# The stale target must equal src_stale.img before we start.
if ! cmp -s "$STALE" "$TGT"; then
  say "target is not the stale copy: resetting it"
  reset_tgt
  if ! cmp -s "$STALE" "$TGT"; then
    say "target still broken: regenerating the workload"
    regen
    make_stale
    cmp -s "$STALE" "$TGT" || { echo "workload inconsistent after regeneration" >&2; exit 1; }
  fi
fi

# After one of our runs into TGT: OK -> stale again at once; broken -> regenerate.
restore_tgt() {  # verdict
  if [ "$1" = OK ]; then
    reset_tgt
  else
    say "target broken -> regenerating the workload"
    regen
    make_stale
  fi
  TOUCHED_TGT=0
}

# ------------------------------------------------------------------ timing
drop() { sync; if [ "$COLD" = 1 ]; then echo 3 > /proc/sys/vm/drop_caches; fi; }
warm() { [ "$COLD" = 1 ] || cat "$SRC" "$TGT" > /dev/null; }
times_cpu() {  # FILE: user+sys of the children line of the last `times` output in FILE
  grep -a -E '^[0-9]+m[0-9.]+s [0-9]+m[0-9.]+s$' "$1" | tail -1 | awk '{
    t = 0
    for (i = 1; i <= 2; i++) { split($i, p, "m"); sub("s", "", p[2]); t += p[1] * 60 + p[2] }
    printf "%.3f", t }'
}
child_cpu() {  # user+sys seconds of this shell's waited-for children so far
  # `times` must run in this shell (not in a $(...) subshell): through a file.
  times > "$WORK/.times"
  CHILD_CPU=$(tail -1 "$WORK/.times" | awk '{
    t = 0
    for (i = 1; i <= 2; i++) { split($i, p, "m"); sub("s", "", p[2]); t += p[1] * 60 + p[2] }
    printf "%.3f", t }')
}

# measure NAME CMD...: runs CMD (stdout to $LOGS/NAME.out, stderr to .err) and sets
# SECS (until it returned), SECS_SYNC (plus a following sync), CPU (its CPU seconds), RC.
measure() {
  local name=$1; shift
  local t0 t1 t2 c0 c1
  child_cpu
  c0=$CHILD_CPU
  t0=$(now)
  set +e
  "$@" > "$LOGS/$name.out" 2> "$LOGS/$name.err"
  RC=$?
  set -e
  t1=$(now)
  child_cpu
  c1=$CHILD_CPU
  sync
  t2=$(now)
  SECS=$(sub "$t0" "$t1")
  SECS_SYNC=$(sub "$t0" "$t2")
  CPU=$(sub "$c0" "$c1")
}

# json FILE KEY...: values of KEY in the last JSON line of FILE ("-" when absent).
json() {
  python3 - "$@" <<'EOF'
import json, sys
obj = {}
try:
    for line in open(sys.argv[1], errors="replace"):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                pass
except OSError:
    pass
print(" ".join(str(obj.get(k, "-")) for k in sys.argv[2:]))
EOF
}

verdict() {  # rc target-path
  if [ "$1" -ne 0 ]; then
    echo "FAIL(rc=$1)"
  elif cmp -s "$SRC" "$2"; then
    echo OK
  else
    echo FAIL
  fi
}

result() {  # tool mode rep secs secs_sync wire verdict [extras...]
  local tool=$1 mode=$2 rep=$3 secs=$4 secs_sync=$5 wire=$6 v=$7
  shift 7
  local line
  line=$(printf "RESULT %-16s %-5s rep%s %8s s %8s s(+sync) %9s MB/s wire=%s %s" "$tool" "$mode" "$rep" \
    "$secs" "$secs_sync" "$(awk -v s="$SIZE" -v t="$secs" 'BEGIN{printf "%.1f", s/t/1e6}')" "$wire" "$v")
  if [ $# -gt 0 ]; then line="$line $*"; fi
  say "$line" | tee -a "$RES"
}

du_bytes() { du --block-size=1 "$1" | cut -f1; }
sparse_line() {  # name path
  local l
  l=$(printf "SPARSE %-16s du=%s src_du=%s size=%s" "$1" "$(du_bytes "$2")" "$(du_bytes "$SRC")" "$(stat -c %s "$2")")
  say "$l" | tee -a "$RES"
}

# ------------------------------------------------------------------ peers via run.sh
if [ -z "${TOOLS:-}" ]; then
  TOOLS=""
  have rsync && TOOLS="$TOOLS rsyncd rsync-local rsyncd-full"
  have socat && TOOLS="$TOOLS socat"
  PEERS_PATH="${PEERS_BIN:-/tmp/peers/bin}:$PATH"
  PATH="$PEERS_PATH" have diskrsync && TOOLS="$TOOLS diskrsync diskrsync-full"
  PATH="$PEERS_PATH" have bdsync && TOOLS="$TOOLS bdsync bdsync-full"
  PATH="$PEERS_PATH" have blocksync-fast && TOOLS="$TOOLS bsf bsf-warm bsf-full"
fi
# shellcheck disable=SC2016  # expanded by run.sh's bash -c
# (`times` adds the command's CPU seconds to the log; the du line the copy's allocation)
OURS_DELTA_CMD='"$DF" sync "$SRC" "$TGT" --state-dir "$DF_STATE_B" --json; rc=$?; times; exit $rc'
# shellcheck disable=SC2016
OURS_FULL_CMD='"$DF" sync "$SRC" "$FULL" --mode full --state-dir "$DF_STATE_E" --json; rc=$?; times; echo "DU_FULL=$(du --block-size=1 "$FULL" | cut -f1)"; exit $rc'
if case_on local; then RUN_TOOLS="ours ours-full$TOOLS"; else RUN_TOOLS="${TOOLS# }"; fi

run_peers() {  # rep [tools]
  local rep=$1 tools=${2:-$RUN_TOOLS}
  export DF_STATE_B=$RUNS/b.$rep DF_STATE_E=$RUNS/e.$rep
  rm -rf "$DF_STATE_B" "$DF_STATE_E"
  TOUCHED_TGT=1
  REGEN=0 REPS=1 S=$S SEED=$SEED ZERO_FRAC=$ZERO_FRAC MOD_FRAC=$MOD_FRAC COLD=$COLD TOOLS="$tools" \
    OURS_DELTA_CMD="$OURS_DELTA_CMD" OURS_FULL_CMD="$OURS_FULL_CMD" \
    bash "$BENCH/run.sh" 2>&1 | while IFS= read -r line; do
      case $line in
        RESULT*)
          line=${line/#RESULT ours    /RESULT df-sync$TAG }
          line=${line/ rep1 / rep$rep }
          if [[ $line =~ ^RESULT\ df-sync[@a-z]*\ +delta ]]; then
            line="$line compare=$(json "$ANC_DIR/logs/ours.delta.1.log" compare) cpu=$(times_cpu "$ANC_DIR/logs/ours.delta.1.log")"
          elif [[ $line =~ ^RESULT\ df-sync[@a-z]*\ +full ]]; then
            line="$line cpu=$(times_cpu "$ANC_DIR/logs/ours.full.1.log")"
            line="$line du=$(grep -a -o 'DU_FULL=[0-9]*' "$ANC_DIR/logs/ours.full.1.log" | tail -1 | cut -d= -f2)"
          fi
          say "$line" | tee -a "$RES"
          ;;
        *) say "  run.sh: $line" ;;
      esac
    done
  rm -rf "$DF_STATE_B" "$DF_STATE_E"
  # run.sh resets TGT after each delta (or regenerates); check that it is stale.
  if ! cmp -s "$STALE" "$TGT"; then restore_tgt FAIL; fi
  TOUCHED_TGT=0
}

# ------------------------------------------------------------------ local trusted delta
local_trusted() {  # rep
  local rep=$1 st=$RUNS/c.$1
  rm -rf "$st"
  TOUCHED_TGT=1
  "$DF" sync "$STALE" "$TGT" --state-dir "$st" --json > "$LOGS/trusted-prep.$rep.out" 2> "$LOGS/trusted-prep.$rep.err" \
    || { say "untimed state sync failed: $(tail -1 "$LOGS/trusted-prep.$rep.err")"; }
  drop; warm
  measure "df-sync-trusted.$rep" "$DF" sync "$SRC" "$TGT" --state-dir "$st" --json
  local v; v=$(verdict "$RC" "$TGT")
  result "df-sync-trusted$TAG" delta "$rep" "$SECS" "$SECS_SYNC" - "$v" \
    "compare=$(json "$LOGS/df-sync-trusted.$rep.out" compare)" "cpu=$CPU" \
    "prep_changed=$(json "$LOGS/trusted-prep.$rep.out" blocks_changed)"
  restore_tgt "$v"
  rm -rf "$st"
}

# ------------------------------------------------------------------ hashing ceilings
hashing() {  # rep
  local rep=$1 v
  drop; warm
  measure "b3sum-t2.$rep" b3sum --num-threads 2 "$SRC"
  v=OK; [ "$RC" -eq 0 ] || v="FAIL(rc=$RC)"
  result b3sum-t2 hash "$rep" "$SECS" "$SECS_SYNC" - "$v" "cpu=$CPU"
  # One single-threaded pass: the unit the agents' CPU per byte is judged in.
  drop; warm
  measure "b3sum-t1.$rep" b3sum --num-threads 1 "$SRC"
  v=OK; [ "$RC" -eq 0 ] || v="FAIL(rc=$RC)"
  result b3sum-t1 hash "$rep" "$SECS" "$SECS_SYNC" - "$v" "cpu=$CPU"
}
df_hash() {  # rep
  local rep=$1 v
  drop; warm
  measure "df-hash$TAG.$rep" "$DF" hash "$SRC" --json
  v=OK; [ "$RC" -eq 0 ] || v="FAIL(rc=$RC)"
  result "df-hash$TAG" hash "$rep" "$SECS" "$SECS_SYNC" - "$v" "cpu=$CPU" "self_s=$(json "$LOGS/df-hash$TAG.$rep.out" seconds)"
}

# ------------------------------------------------------------------ cp --sparse
cp_sparse() {  # rep
  local rep=$1 x=$ANC_DIR/cp.img v
  rm -f "$x"
  drop; warm
  measure "cp-sparse.$rep" cp --sparse=always "$SRC" "$x"
  v=$(verdict "$RC" "$x")
  result cp-sparse full "$rep" "$SECS" "$SECS_SYNC" "-" "$v" "cpu=$CPU" "du=$(du_bytes "$x")"
  if [ "$rep" = 1 ] && [ "$RC" -eq 0 ]; then sparse_line cp-sparse "$x"; fi
  rm -f "$x"
}

# ------------------------------------------------------------------ network
SRC_ID=$WORK/source-state
SERVE_STATE=$WORK/serve-state
fingerprint() {  # state-dir: the identity's fingerprint, made on first use
  "$DF" id --state-dir "$1" 2>/dev/null || "$DF" init --state-dir "$1"
}
setup_push() {
  SRC_FP=$(fingerprint "$SRC_ID")
  SERVE_FP=$(fingerprint "$SERVE_STATE")
  cat > "$WORK/serve.toml" <<EOF
listen = "127.0.0.1:0"
state_dir = "$SERVE_STATE"
[[peer]]
name = "bench-source"
fingerprint = "$SRC_FP"
[[target]]
name = "stale"
path = "$TGT"
allowed_peers = ["bench-source"]
[[target]]
name = "full"
path = "$FULL"
allowed_peers = ["bench-source"]
EOF
}

# A fresh serve with no state for any target (its identity is kept).
serve_start() {  # log-tag
  serve_stop
  rm -rf "$SERVE_STATE/targets"
  local log=$LOGS/serve.$1.log
  : > "$log"
  "$DF" serve --config "$WORK/serve.toml" > /dev/null 2>> "$log" &
  SERVE_PID=$!
  SERVE_ADDR=
  for _ in $(seq 100); do
    SERVE_ADDR=$(sed -n 's/^diskferry serving on \([0-9.]*:[0-9]*\) .*/\1/p' "$log" | tail -1)
    [ -n "$SERVE_ADDR" ] && return 0
    kill -0 "$SERVE_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "diskferry serve did not start:" >&2
  cat "$log" >&2
  exit 1
}

proc_cpu_ticks() {  # utime+stime of a process (all its threads), in clock ticks; "-" if gone
  local st
  st=$(cat "/proc/$1/stat" 2>/dev/null) || { echo -; return 0; }
  st=${st##*) }
  # shellcheck disable=SC2086  # split the fields
  set -- $st
  echo $(( ${12} + ${13} ))
}
cpu_between() {  # ticks-before ticks-after -> seconds
  if [ "$1" = - ] || [ "$2" = - ]; then echo -; return 0; fi
  awk -v a="$1" -v b="$2" -v t="$CLK_TCK" 'BEGIN{printf "%.2f", (b-a)/t}'
}

push() {  # image target-name [args...]: one push of image to the running serve
  local img=$1 tname=$2
  shift 2
  "$DF" push "$img" --peer "$SERVE_ADDR" --peer-fingerprint "$SERVE_FP" --target "$tname" \
    --state-dir "$SRC_ID" --json "$@"
}

# push_case TOOL MODE REP TARGET-NAME TARGET-PATH [push args...]: timed push of SRC.
push_case() {
  local tool=$1 mode=$2 rep=$3 tname=$4 tpath=$5
  shift 5
  drop; warm
  local k0 k1
  k0=$(proc_cpu_ticks "$SERVE_PID")
  measure "$tool.$rep" push "$SRC" "$tname" "$@"
  k1=$(proc_cpu_ticks "$SERVE_PID")
  local v; v=$(verdict "$RC" "$tpath")
  local out=$LOGS/$tool.$rep.out
  read -r wire mtu sent self cpu plan changed < <(json "$out" wire_bytes path_mtu bytes_sent seconds cpu_seconds plan blocks_changed)
  result "$tool" "$mode" "$rep" "$SECS" "$SECS_SYNC" "$wire" "$v" \
    "src_cpu=$cpu" "tgt_cpu=$(cpu_between "$k0" "$k1")" \
    "path_mtu=$mtu" "bytes_sent=$sent" "self_s=$self" "plan=$plan" "changed=$changed"
  if [ "$RC" -ne 0 ]; then say "  push failed: $(tail -2 "$LOGS/$tool.$rep.err" | tr '\n' ' ')"; fi
  PUSH_VERDICT=$v
}

network() {  # rep
  local rep=$1
  # delta onto the stale target, which the serve has no state for
  serve_start "stateless.$rep"
  TOUCHED_TGT=1
  push_case "df-push-stateless$TAG" delta "$rep" stale "$TGT"
  restore_tgt "$PUSH_VERDICT"
  # delta with the target's trusted manifest: an untimed push of src_stale gives it state
  serve_start "trusted.$rep"
  TOUCHED_TGT=1
  if ! push "$STALE" stale > "$LOGS/push-prep.$rep.out" 2> "$LOGS/push-prep.$rep.err"; then
    say "  untimed state push failed: $(tail -1 "$LOGS/push-prep.$rep.err")"
  fi
  push_case "df-push-trusted$TAG" delta "$rep" stale "$TGT"
  restore_tgt "$PUSH_VERDICT"
  # full download to a new file
  serve_start "full.$rep"
  rm -f "$FULL"
  push_case "df-push$TAG" full "$rep" full "$FULL" --mode full
  if [ "$rep" = 1 ] && [ -f "$FULL" ]; then sparse_line "df-push-full$TAG" "$FULL"; fi
  rm -f "$FULL"
  serve_stop
}

# ------------------------------------------------------------------ main loop
say "compare: S=$S ($SIZE bytes) REPS=$REPS COLD=$COLD cases=[$CASES] peers=[${TOOLS# }] nproc=$(nproc)"
say "diskferry: $DF ($("$DF" --version))"
[ -z "$BASELINE" ] || say "baseline (@base): $BASELINE ($("$BASELINE" --version))"
if case_on push; then setup_push; fi
# Our own cases with binary $2, its tools tagged $3.
ours() {  # rep binary tag
  DF=$2 TAG=$3
  if [ -n "$TAG" ] && case_on local; then run_peers "$1" "ours ours-full"; fi
  if case_on trusted; then local_trusted "$1"; fi
  if case_on hash; then df_hash "$1"; fi
  if case_on push; then network "$1"; fi
  DF=$NEW_DF TAG=
}
for rep in $(seq "$REPS"); do
  say "== repetition $rep of $REPS"
  if [ -n "${RUN_TOOLS// /}" ]; then run_peers "$rep"; fi
  if case_on hash; then hashing "$rep"; fi
  if case_on cp; then cp_sparse "$rep"; fi
  if [ -n "$BASELINE" ] && [ $((rep % 2)) = 1 ]; then ours "$rep" "$BASELINE" @base; fi
  ours "$rep" "$NEW_DF" ""
  if [ -n "$BASELINE" ] && [ $((rep % 2)) = 0 ]; then ours "$rep" "$BASELINE" @base; fi
done

say ""
say "RESULT lines: $RES   logs: $LOGS/ and $ANC_DIR/logs/"
python3 "$HERE/compare_summary.py" --workload "$ANC_DIR/workload.json" "$RES"
