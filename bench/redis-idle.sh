#!/usr/bin/env bash
# Idle memory of several nodes on one Redis (issue 14: 4 nodes × 19k = 76k idle connections on
# this machine, server RSS per connection ≤ 1.25 KiB, Redis's own memory beside it). Starts
# NODES release nodes on a Redis you may write to, then NODES `bench connections` processes at
# once (one shard each, every shard spread over all the nodes: connection i goes to node
# i mod NODES), reads each node's VmRSS before and while the connections are held, and Redis's
# used_memory likewise. Bounded: NODES × PER connections, held HOLD; loopback only.
#
#   REDIS_PORT=6390 NODES=4 PER=19000 bench/redis-idle.sh
#
# Output: one line per node `node=I conns=C rss_before_kib=A rss_held_kib=B kib_per_conn=X`,
# then `redis_used_memory_per_terminal_bytes=Y` and each shard's connected/failed counts.
set -euo pipefail
BIN=${BIN:-target/release/livepush}
PORT=${REDIS_PORT:-6390}
NODES=${NODES:-4}
PER=${PER:-19000}
HOLD=${HOLD:-40s}
KEY=bench-key-0123456789
SECRET=bench-secret-0123456789abcdef
PREFIX=idle$$
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

redis-cli -p "$PORT" ping >/dev/null
used() { redis-cli -p "$PORT" info memory | sed -n 's/^used_memory:\([0-9]*\).*/\1/p'; }
rss() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status"; }
urls=() nodes=()
for i in $(seq "$NODES"); do
  "$BIN" serve --redis "redis://127.0.0.1:$PORT/" --redis-prefix "$PREFIX" \
    --listen 127.0.0.1:0 --wake-listen off --api-key "$KEY" --token-secret "$SECRET" \
    >"$work/node$i.out" 2>/dev/null &
  pids+=($!) nodes+=($!)
  for _ in $(seq 100); do grep -q "listening on" "$work/node$i.out" 2>/dev/null && break; sleep 0.05; done
  urls+=("$(sed -n 's/^livepush listening on //p' "$work/node$i.out" | head -1)")
done
sleep 2
before=() ; for p in "${nodes[@]}"; do before+=("$(rss "$p")"); done
redis_before=$(used)
servers=$(IFS=,; echo "${urls[*]}")
total=$((NODES * PER))
shards=()
for i in $(seq 0 $((NODES - 1))); do
  "$BIN" bench connections --server "$servers" --api-key "$KEY" --token-secret "$SECRET" \
    --conns "$total" --shard "$i/$NODES" --hold "$HOLD" --json >"$work/shard$i.json" 2>"$work/shard$i.err" &
  pids+=($!) shards+=($!)
done
# Read while held: once every node holds its PER connections (established sockets on its
# port), or their number stopped growing for 10 s (some handshakes failed), plus 5 s to
# settle. Per-connection figures divide by what each node actually holds.
ports=() ; for u in "${urls[@]}"; do ports+=("${u##*:}"); done
established() { ss -Htn state established "( sport = :$1 )" | wc -l; }
prev=-1 still=0
while :; do
  sum=0
  for p in "${ports[@]}"; do sum=$((sum + $(established "$p"))); done
  [ "$sum" -ge "$total" ] && break
  if [ "$sum" -eq "$prev" ]; then still=$((still + 1)); else still=0; fi
  [ "$still" -ge 10 ] && break
  prev=$sum
  sleep 1
done
sleep 5
held=() conns=()
for i in "${!nodes[@]}"; do
  held+=("$(rss "${nodes[$i]}")") conns+=("$(established "${ports[$i]}")")
done
redis_held=$(used)
wait "${shards[@]}" || true
for i in $(seq 0 $((NODES - 1))); do
  echo "node=$i conns=${conns[$i]} rss_before_kib=${before[$i]} rss_held_kib=${held[$i]} kib_per_conn=$(python3 -c "print(round((${held[$i]}-${before[$i]})/${conns[$i]},3))")"
done
held_total=0; for c in "${conns[@]}"; do held_total=$((held_total + c)); done
echo "redis_used_memory_per_terminal_bytes=$(((redis_held - redis_before) / held_total))"
for i in $(seq 0 $((NODES - 1))); do
  python3 - "$work/shard$i.json" <<'PY' || cat "$work/shard$i.err"
import json, sys
d = json.load(open(sys.argv[1]))
print("shard", sys.argv[1].rsplit("shard", 1)[1].split(".")[0], {k: v for k, v in d.items() if k in ("connected", "failed", "ended")})
PY
done
