#!/bin/sh
# Side-by-side load benchmark: subrosa-server (SQLite unless --server-arg says
# otherwise) and ejabberd, same devices, message size and traffic pattern.
#
#   bench/compare.sh [LOAD OPTIONS...]
#
# LOAD OPTIONS go to both `subrosa-bench load` and `subrosa-bench xmpp`
# (e.g. --devices 2000 --idle 2000,10000 --rate 10000 --seconds 10).
# SUBROSA_ARGS adds options for the Subrosa run only, e.g.
#   SUBROSA_ARGS="--server-arg=--database --server-arg=postgres://bench@127.0.0.1/bench" bench/compare.sh
# Needs root for ejabberd (bench/ejabberd/setup.sh). Figures in $OUT (default /tmp/subrosa-compare).
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/subrosa-compare}
mkdir -p "$OUT"
rm -f "$OUT"/subrosa*.json
cd "$ROOT"

cargo build --release --locked -p subrosa-bench -p subrosa-server
BENCH=$ROOT/target/release/subrosa-bench

# One server at a time: ejabberd stays stopped during the Subrosa run.
bench/ejabberd/setup.sh stop >/dev/null 2>&1 || true
# shellcheck disable=SC2086
"$BENCH" load "$@" ${SUBROSA_ARGS:-} --json "$OUT/subrosa.json" | tee "$OUT/subrosa.txt"

bench/ejabberd/setup.sh start
trap 'bench/ejabberd/setup.sh stop >/dev/null 2>&1 || true' EXIT
"$BENCH" xmpp "$@" --json "$OUT/ejabberd.json" | tee "$OUT/ejabberd.txt"
bench/ejabberd/setup.sh stop

echo
"$BENCH" compare "$OUT/subrosa.json" "$OUT/ejabberd.json" | tee "$OUT/compare.txt"
# The signed-HTTP path (the baseline row of the load run) beside ejabberd too.
if [ -f "$OUT/subrosa.http.json" ]; then
    echo
    "$BENCH" compare "$OUT/subrosa.http.json" "$OUT/ejabberd.json" | tee "$OUT/compare-http.txt"
fi
