#!/usr/bin/env bash
# Cross-node traffic: Redis's output bytes per reliable message when the room's members are on
# 1, 2 and 3 of 3 nodes (issue 14: it must grow with the nodes that hold members of the room,
# not with the number of nodes). Bounded: 3 nodes, 3 `livepush tail` subscribers, MSGS
# publishes per step; loopback only.
#
#   REDIS_PORT=6390 MSGS=500 bench/redis-bytes.sh      # a Redis you may write to
#
# Output: one line per step (0: nobody subscribed), `members_on_nodes=K bytes_per_msg=B`. Redis's
# total_net_output_bytes also counts the answers to the publishing node's script and the
# nodes' upkeep (once a second each), so B has a constant part; the per-node part is the
# difference between steps.
set -euo pipefail
BIN=${BIN:-target/release/livepush}
PORT=${REDIS_PORT:-6390}
MSGS=${MSGS:-500}
KEY=bench-key
SECRET=bench-secret-0123456789abcdef
PREFIX=bytes$$
ROOM=bytes
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

redis-cli -p "$PORT" ping >/dev/null
urls=()
for i in 1 2 3; do
  "$BIN" serve --redis "redis://127.0.0.1:$PORT/" --redis-prefix "$PREFIX" \
    --listen 127.0.0.1:0 --wake-listen off --api-key "$KEY" --token-secret "$SECRET" \
    >"$work/node$i.out" 2>/dev/null &
  pids+=($!)
  for _ in $(seq 100); do grep -q "listening on" "$work/node$i.out" 2>/dev/null && break; sleep 0.05; done
  urls+=("$(sed -n 's/^livepush listening on //p' "$work/node$i.out" | head -1)")
done
token=$("$BIN" token --sub watcher --rooms "$ROOM" --token-secret "$SECRET")
out_bytes() { redis-cli -p "$PORT" info stats | sed -n 's/^total_net_output_bytes:\([0-9]*\).*/\1/p'; }
publish() {
  local n
  for n in $(seq "$MSGS"); do
    curl -sf -o /dev/null -H "authorization: Bearer $KEY" -H 'content-type: application/json' \
      -d "{\"type\":\"gift\",\"data\":{\"k\":$n,\"pad\":\"0123456789012345678901234567890123456789\"}}" \
      "${urls[0]}/v1/rooms/$ROOM/messages"
  done
}
for k in 0 1 2 3; do
  if [ "$k" -gt 0 ]; then
    # One more subscriber, on node k (the publisher always uses node 1).
    "$BIN" tail --server "${urls[$((k - 1))]}" --room "$ROOM" --token "$token" >"$work/tail$k.out" 2>/dev/null &
    pids+=($!)
    for _ in $(seq 100); do grep -q joined "$work/tail$k.out" 2>/dev/null && break; sleep 0.05; done
  fi
  sleep 1
  before=$(out_bytes)
  publish
  after=$(out_bytes)
  echo "members_on_nodes=$k bytes_per_msg=$(((after - before) / MSGS))"
done
