#!/bin/sh
# Instruction counts of the server per delivered message, by function, with
# callgrind: repeatable even on a busy machine (wall figures are not).
#
#   bench/profile.sh http|frames [OUTDIR]
#
# Runs subrosa-server under callgrind with instrumentation off, drives it
# with `subrosa-bench load --paths PATH` (40 devices, closed loop), turns
# instrumentation on for 15 s of the saturation phase only, and prints the
# messages stored and delivered meanwhile (from the metrics endpoint).
# Divide the totals of `callgrind_annotate --inclusive=yes OUTDIR/cg.out.1`
# by the delivered count. BIN picks the build (default target/release).
set -eu
P=${1:?usage: bench/profile.sh http|frames [OUTDIR]}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
D=${2:-/tmp/subrosa-profile-$P}
PORT=${PORT:-18480}
BIN=${BIN:-$ROOT/target/release}
rm -rf "$D"
mkdir -p "$D"
valgrind --tool=callgrind --callgrind-out-file="$D/cg.out" --instr-atstart=no \
    "$BIN/subrosa-server" --listen 127.0.0.1:$PORT --data "$D/data" \
    --metrics-listen 127.0.0.1:$((PORT + 1)) --max-connections-per-ip 1000000 \
    >"$D/server.out" 2>"$D/server.err" &
VPID=$!
for _ in $(seq 1 120); do
    grep -q "listening on" "$D/server.out" 2>/dev/null && break
    sleep 1
done
"$BIN/subrosa-bench" load --server http://127.0.0.1:$PORT --server-pid $VPID --paths "$P" \
    --devices 40 --idle 40 --concurrency 8 --warmup 2 --seconds 20 --rate 0 --deep 0 \
    >"$D/bench.txt" 2>&1 &
BPID=$!
count() {
    curl -s http://127.0.0.1:$((PORT + 1))/metrics |
        awk -v e="$1" '$0 ~ "subrosa_messages_total\\{event=\""e"\"\\}" {print $2}'
}
until grep -q "^idle: " "$D/bench.txt" 2>/dev/null || ! kill -0 $BPID 2>/dev/null; do sleep 0.5; done
sleep 3
callgrind_control -i on $VPID >/dev/null
S0=$(count stored)
D0=$(count delivered)
sleep 15
callgrind_control -i off $VPID >/dev/null
S1=$(count stored)
D1=$(count delivered)
callgrind_control -d $VPID >/dev/null
echo "$P: stored $((S1 - S0)), delivered $((D1 - D0)) while instrumented; profile in $D/cg.out.1"
wait $BPID || true
kill $VPID
wait $VPID || true
