#!/usr/bin/env bash
# Usage: bash run.sh "MODES" "NS"   e.g. bash run.sh "raw axum-small" "5000 18000"
# Server pinned to CPU 0, client to CPU 1; a fresh server process per (mode, N).
set -u
cd "$(dirname "$0")"
BIN=${BIN:-target/release/wslib-bench}
MODES=${1:-"axum-default axum-small axum-tiny tokio-websockets fastwebsockets fastwebsockets-hyper raw"}
NS=${2:-"5000 18000"}
PORT=${PORT:-9100}
IPB=${IPB:-10}
for m in $MODES; do
  for n in $NS; do
    taskset -c "${SRV_CPUS:-0}" $BIN server "$m" "$PORT" 2> "target/server-$m-$n.log" &
    spid=$!
    sleep 1
    out=$(taskset -c 1 $BIN client "$PORT" "$n" "$spid" "$IPB" "${SETTLE:-3}" "${HOLD:-0}")
    echo "$m ${WS_MT:+mt }${TAG:-} $out"
    { head -2 "target/server-$m-$n.log"; grep "live heap" "target/server-$m-$n.log" | tail -1; } | sed "s/^/    /"
    kill "$spid"; wait "$spid" 2>/dev/null
    IPB=$((IPB + 1)); PORT=$((PORT + 1))
  done
done
