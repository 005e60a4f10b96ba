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
# SUBROSA_PG_SERVER (e.g. postgres://postgres@127.0.0.1:5432) adds two runs
# on PostgreSQL, binary frames only, each on a fresh database `subrosa_bench`
# that this script drops and creates with psql: one node, then three nodes on
# that one database (devices spread over the nodes, CPU and memory summed);
# each is set beside ejabberd, and three nodes beside one.
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

# PostgreSQL: one node, then three on one database.
if [ -n "${SUBROSA_PG_SERVER:-}" ]; then
    for nodes in 1 3; do
        psql -q "$SUBROSA_PG_SERVER/postgres" -c 'DROP DATABASE IF EXISTS subrosa_bench' -c 'CREATE DATABASE subrosa_bench'
        # shellcheck disable=SC2086
        "$BENCH" load "$@" ${SUBROSA_ARGS:-} --paths frames --nodes "$nodes" \
            --server-arg=--database --server-arg="$SUBROSA_PG_SERVER/subrosa_bench" \
            --json "$OUT/subrosa-pg$nodes.json" | tee "$OUT/subrosa-pg$nodes.txt"
    done
fi

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
for nodes in 1 3; do
    if [ -f "$OUT/subrosa-pg$nodes.json" ]; then
        echo
        "$BENCH" compare "$OUT/subrosa-pg$nodes.json" "$OUT/ejabberd.json" | tee "$OUT/compare-pg$nodes.txt"
    fi
done
if [ -f "$OUT/subrosa-pg3.json" ] && [ -f "$OUT/subrosa-pg1.json" ]; then
    echo
    echo "three PostgreSQL nodes against one (ratio = three / one):"
    "$BENCH" compare "$OUT/subrosa-pg3.json" "$OUT/subrosa-pg1.json" | tee "$OUT/compare-pg3-pg1.txt"
fi
