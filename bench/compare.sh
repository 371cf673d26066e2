#!/usr/bin/env bash
# bench/compare.sh — livepush side by side with a plain Node `ws` broadcast server, a
# Socket.IO server and nginx + nchan, under the same loads, in one run.
#
#   bench/compare.sh                 # small defaults, ~10 minutes on a 2-core machine
#   bench/compare.sh --full          # the issue's full-size targets (see below)
#   TARGETS="livepush ws" IDLE_CONNS=5000 bench/compare.sh
#
# What it does:
#   1. `cargo build --release -p livepush` (skip with NO_BUILD=1).
#   2. Installs the peers into a scratch directory ($SCRATCH, default a fresh mktemp dir):
#      ws + socket.io with `npm install --prefix $SCRATCH/node` (never into the repo), and
#      nginx + nchan from Debian (`apt-get install nginx-light libnginx-mod-nchan`) if nginx
#      or the nchan module is missing. A peer that cannot be set up is skipped, and said so.
#   3. For every target and every load, starts a fresh server pinned to core $SERVER_CPU
#      (`taskset -c`), runs `target/release/livepush bench …` pinned to core $BENCH_CPU with
#      `--server-pid` so that the server's memory and CPU are read from /proc, and stops the
#      server (by PID). nginx runs in the foreground with its own config, pid and temp paths
#      in $SCRATCH, not as the system service.
#   4. Writes a markdown table per load (absolute figures and ratios to livepush), the exact
#      commands, and the machine to bench/results/compare-DATE.md (+ the raw JSON next to it)
#      and prints it. Each load's runs are also drawn on one SVG beside it,
#      compare-DATE-LOAD.svg (`livepush bench plot`: latency distribution and rate over time).
#
# Loads (every payload $SIZE = 64 bytes; env variables override, flags below):
#   idle     IDLE_CONNS connections held HOLD          (issue: 19,000; one process < ~19k fds)
#   burst    BURST_SUBS subscribers × BURST_MSGS msgs (issue: 10,000 × 1,000), unpaced
#   paced    PACED_SUBS subscribers, PACED_RATE msg/s for PACED_SECS s (issue: 10,000 × 10/s)
#   resume   RESUME_TERMINALS drop, RESUME_BEHIND later resume (issue: 10,000 × 100),
#            livepush only (the peers have no resume)
#   lp-idle / sse-idle    HTTP_IDLE_CONNS parked long-polls / open SSE streams held HOLD
#            (issue 18: 10,000), livepush and nchan only (nchan: /lp/ROOM, /es/ROOM)
#   lp-paced / sse-paced  LP_SUBS long-poll / SSE_SUBS SSE subscribers, PACED_RATE msg/s for
#            PACED_SECS s (issue 18: 5,000 long-poll × 10/s; 10,000 SSE), livepush and nchan
#   LOADS="lp-idle lp-paced" runs only those loads (default: all of them).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# ---- parameters -------------------------------------------------------------------------
FULL=${FULL:-0}
usage() {
    sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'
Flags:  --full            issue-size loads (19k idle, 10k×1000 burst, 10k×10/s paced, 10k×100 resume,
                          10k parked polls / SSE streams, 5k long-poll / 10k SSE × 10/s)
        --targets "A B"   subset of: livepush ws socketio nchan
        --scratch DIR     scratch directory (npm packages, nginx config, logs, JSON)
        --no-build        do not run cargo build
        --no-install      do not run npm/apt-get; skip peers that are not installed
        -h, --help
Env:    IDLE_CONNS HOLD BURST_SUBS BURST_MSGS PACED_SUBS PACED_RATE PACED_SECS
        RESUME_TERMINALS RESUME_BEHIND SIZE SERVER_CPU BENCH_CPU CONCURRENCY PUBLISHERS
        HTTP_IDLE_CONNS LP_SUBS SSE_SUBS LOADS TARGETS SCRATCH NO_BUILD NO_INSTALL OUT
EOF
}
while [[ $# -gt 0 ]]; do
    case $1 in
        --full) FULL=1 ;;
        --targets) TARGETS=$2; shift ;;
        --scratch) SCRATCH=$2; shift ;;
        --no-build) NO_BUILD=1 ;;
        --no-install) NO_INSTALL=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "compare.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ $FULL == 1 ]]; then
    : "${IDLE_CONNS:=19000}" "${BURST_SUBS:=10000}" "${BURST_MSGS:=1000}"
    : "${PACED_SUBS:=10000}" "${PACED_RATE:=10}" "${PACED_SECS:=60}"
    : "${RESUME_TERMINALS:=10000}" "${RESUME_BEHIND:=100}" "${HOLD:=10s}"
    : "${HTTP_IDLE_CONNS:=10000}" "${LP_SUBS:=5000}" "${SSE_SUBS:=10000}"
fi
IDLE_CONNS=${IDLE_CONNS:-2000}
HOLD=${HOLD:-3s}
BURST_SUBS=${BURST_SUBS:-2000}
BURST_MSGS=${BURST_MSGS:-200}
PACED_SUBS=${PACED_SUBS:-2000}
PACED_RATE=${PACED_RATE:-10}
PACED_SECS=${PACED_SECS:-10}
RESUME_TERMINALS=${RESUME_TERMINALS:-1000}
RESUME_BEHIND=${RESUME_BEHIND:-100}
HTTP_IDLE_CONNS=${HTTP_IDLE_CONNS:-1000}
LP_SUBS=${LP_SUBS:-1000}
SSE_SUBS=${SSE_SUBS:-1000}
LOADS=${LOADS:-idle burst paced resume lp-idle lp-paced sse-idle sse-paced}
SIZE=${SIZE:-64}
SERVER_CPU=${SERVER_CPU:-0}
BENCH_CPU=${BENCH_CPU:-1}
CONCURRENCY=${CONCURRENCY:-64}
PUBLISHERS=${PUBLISHERS:-8}
TARGETS=${TARGETS:-livepush ws socketio nchan}
NO_BUILD=${NO_BUILD:-0}
NO_INSTALL=${NO_INSTALL:-0}
WS_VERSION=${WS_VERSION:-8.23.0}
SOCKETIO_VERSION=${SOCKETIO_VERSION:-4.8.4}
SCRATCH=${SCRATCH:-$(mktemp -d /tmp/livepush-compare.XXXXXX)}
mkdir -p "$SCRATCH"/{node,nginx,json,logs}
STAMP=$(date -u +%Y-%m-%d-%H%M%S)
OUT=${OUT:-$ROOT/bench/results/compare-$STAMP.md}
mkdir -p "$(dirname "$OUT")"
B=$ROOT/target/release/livepush
PACED_MSGS=$(( PACED_RATE * PACED_SECS ))
API_KEY=compare-api-key-0123456789
TOKEN_SECRET=compare-token-secret-0123456789
T0=$(date +%s)

log() { printf '[compare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---- cleanup: every server this script started, by PID ------------------------------------
declare -a PIDS=()
stop_pid() {
    local pid=$1
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    # nginx's worker is the master's child; the master's SIGTERM stops it, this is a backstop.
    for pid in "${NGINX_WORKERS[@]:-}"; do stop_pid "$pid"; done
    exit $rc
}
declare -a NGINX_WORKERS=()
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- checks ---------------------------------------------------------------------------------
command -v taskset >/dev/null || die "taskset not found (apt-get install util-linux)"
command -v python3 >/dev/null || die "python3 is needed to write the tables"
NCPU=$(nproc)
(( NCPU >= 2 )) || log "warning: $NCPU CPU(s): server and load generator will share a core"
HARD_NOFILE=$(ulimit -Hn)
ulimit -n "$HARD_NOFILE" 2>/dev/null || true
for n in "$IDLE_CONNS" "$BURST_SUBS" "$PACED_SUBS" "$HTTP_IDLE_CONNS" "$LP_SUBS" "$SSE_SUBS"; do
    if [[ $HARD_NOFILE != unlimited ]] && (( n + 100 > HARD_NOFILE )); then
        die "$n connections need more open files than the hard limit ($HARD_NOFILE); lower the load"
    fi
done

# ---- build ----------------------------------------------------------------------------------
if [[ $NO_BUILD != 1 ]]; then
    log "cargo build --release -p livepush"
    cargo build --release -p livepush >&2 || die "cargo build failed"
fi
[[ -x $B ]] || die "$B missing (build it, or drop NO_BUILD)"

# ---- peers: install into the scratch directory ---------------------------------------------
declare -A SKIP=()
want() { [[ " $TARGETS " == *" $1 "* ]]; }

if want ws || want socketio; then
    if ! command -v node >/dev/null; then
        for t in ws socketio; do SKIP[$t]="node is not installed (apt-get install nodejs npm)"; done
    elif [[ $NO_INSTALL == 1 ]] && [[ ! -d $SCRATCH/node/node_modules/ws ]]; then
        for t in ws socketio; do SKIP[$t]="--no-install and no packages in $SCRATCH/node"; done
    else
        cp bench/peers/ws-server.js bench/peers/socketio-server.js "$SCRATCH/node/"
        if [[ ! -d $SCRATCH/node/node_modules/socket.io ]]; then
            log "npm install --prefix $SCRATCH/node ws@$WS_VERSION socket.io@$SOCKETIO_VERSION"
            if ! npm install --prefix "$SCRATCH/node" --no-audit --no-fund --no-save \
                "ws@$WS_VERSION" "socket.io@$SOCKETIO_VERSION" >"$SCRATCH/logs/npm.log" 2>&1; then
                tail -5 "$SCRATCH/logs/npm.log" >&2
                for t in ws socketio; do SKIP[$t]="npm install failed (see $SCRATCH/logs/npm.log)"; done
            fi
        fi
    fi
fi

NCHAN_SO=/usr/lib/nginx/modules/ngx_nchan_module.so
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if want nchan; then
    if [[ ! -x $NGINX || ! -f $NCHAN_SO ]]; then
        if [[ $NO_INSTALL == 1 ]]; then
            SKIP[nchan]="nginx or the nchan module is not installed (--no-install)"
        elif ! command -v apt-get >/dev/null; then
            SKIP[nchan]="no apt-get: install nginx with the nchan module yourself"
        else
            log "apt-get install -y nginx-light libnginx-mod-nchan"
            if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
                nginx-light libnginx-mod-nchan >"$SCRATCH/logs/apt.log" 2>&1; then
                tail -5 "$SCRATCH/logs/apt.log" >&2
                SKIP[nchan]="apt-get install nginx-light libnginx-mod-nchan failed (see $SCRATCH/logs/apt.log; apt-cache policy libnginx-mod-nchan)"
            fi
            NGINX=$(command -v nginx || echo /usr/sbin/nginx)
            [[ -x $NGINX && -f $NCHAN_SO ]] || SKIP[nchan]=${SKIP[nchan]:-"nginx/nchan still missing after apt-get"}
        fi
    fi
fi

# ---- starting and stopping servers ----------------------------------------------------------
free_port() {
    local p
    for p in $(seq "${1:-18090}" 18999); do
        ss -Htln "sport = :$p" | grep -q . || { echo "$p"; return; }
    done
    die "no free port in 18090..18999"
}
wait_port() { # port pid name
    for _ in $(seq 100); do
        kill -0 "$2" 2>/dev/null || { log "$3 exited at start (log: $SCRATCH/logs/$3.log)"; return 1; }
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    log "$3 did not listen on :$1 within 10 s"; return 1
}

SERVER_PID=""   # the PID whose /proc the bench reads
SERVER_MAIN=""  # the PID we started (nginx: the master)
SERVER_URL=""
declare -a SERVER_CMD=()

start_server() { # target history
    local t=$1 history=$2 port
    port=$(free_port)
    SERVER_URL=http://127.0.0.1:$port
    case $t in
        livepush)
            SERVER_CMD=(taskset -c "$SERVER_CPU" "$B" serve --listen "127.0.0.1:$port"
                --data-dir :memory: --api-key "$API_KEY" --token-secret "$TOKEN_SECRET"
                --history-size "$history")
            LIVEPUSH_LOG=warn "${SERVER_CMD[@]}" >"$SCRATCH/logs/$t.log" 2>&1 &
            ;;
        ws|socketio)
            local js=ws-server.js; [[ $t == socketio ]] && js=socketio-server.js
            SERVER_CMD=(env PORT=$port HOST=127.0.0.1 taskset -c "$SERVER_CPU" node "$SCRATCH/node/$js")
            "${SERVER_CMD[@]}" >"$SCRATCH/logs/$t.log" 2>&1 &
            ;;
        nchan)
            local dir=$SCRATCH/nginx nofile=$HARD_NOFILE
            [[ $nofile == unlimited ]] && nofile=65536
            mkdir -p "$dir/logs" "$dir/body"
            # bench/peers/nchan.conf with this run's port and scratch paths; master + one
            # worker (nginx's usual shape), the worker is measured.
            cat >"$dir/nginx.conf" <<EOF
load_module $NCHAN_SO;
worker_processes 1;
worker_rlimit_nofile $nofile;
error_log stderr warn;
pid $dir/nginx.pid;
events { worker_connections $(( nofile - 100 )); }
http {
    access_log off;
    client_body_temp_path $dir/body;
    server {
        listen 127.0.0.1:$port backlog=4096;
        location ~ ^/pub/(.+)\$ {
            nchan_publisher http;
            nchan_channel_id \$1;
            nchan_message_buffer_length $(( BURST_MSGS > 1000 ? BURST_MSGS : 1000 ));
            nchan_message_timeout 1h;
        }
        location ~ ^/sub/(.+)\$ {
            nchan_subscriber websocket;
            nchan_channel_id \$1;
            nchan_websocket_ping_interval 25;
        }
        location ~ ^/lp/(.+)\$ {
            nchan_subscriber longpoll;
            nchan_channel_id \$1;
        }
        location ~ ^/es/(.+)\$ {
            nchan_subscriber eventsource;
            nchan_channel_id \$1;
        }
    }
}
EOF
            SERVER_CMD=(taskset -c "$SERVER_CPU" "$NGINX" -e stderr -p "$dir/" -c "$dir/nginx.conf" -g 'daemon off;')
            "${SERVER_CMD[@]}" >"$SCRATCH/logs/$t.log" 2>&1 &
            ;;
    esac
    SERVER_MAIN=$!
    PIDS+=("$SERVER_MAIN")
    # `taskset -c N cmd` execs cmd, so $! is the server itself (env execs too).
    wait_port "$port" "$SERVER_MAIN" "$t" || return 1
    SERVER_PID=$SERVER_MAIN
    if [[ $t == nchan ]]; then
        local w=""
        for _ in $(seq 50); do
            w=$(ps -o pid= --ppid "$SERVER_MAIN" | head -1 | tr -d ' ')
            [[ -n $w ]] && break; sleep 0.1
        done
        [[ -n $w ]] || { log "nginx has no worker process"; return 1; }
        NGINX_WORKERS+=("$w")
        SERVER_PID=$w
    fi
}

stop_server() {
    stop_pid "$SERVER_MAIN"
    SERVER_MAIN=""; SERVER_PID=""
}

# ---- the loads ------------------------------------------------------------------------------
COMMANDS=$SCRATCH/commands.txt
: >"$COMMANDS"
declare -A RESULT=()

run_load() { # target load
    local t=$1 load=$2 history=1000 json=$SCRATCH/json/$1-$2.json
    local -a args
    case $load in
        idle)   args=(connections --conns "$IDLE_CONNS" --hold "$HOLD") ;;
        burst)  args=(fanout --subs "$BURST_SUBS" --msgs "$BURST_MSGS" --size "$SIZE" --publishers "$PUBLISHERS")
                (( BURST_MSGS > history )) && history=$BURST_MSGS ;;
        paced)  args=(fanout --subs "$PACED_SUBS" --msgs "$PACED_MSGS" --rate "$PACED_RATE" --size "$SIZE" --publishers "$PUBLISHERS") ;;
        resume) args=(resume --terminals "$RESUME_TERMINALS" --behind "$RESUME_BEHIND" --size "$SIZE") ;;
        lp-idle|sse-idle)
                local tr=longpoll; [[ $load == sse-* ]] && tr=sse
                args=(connections --transport "$tr" --conns "$HTTP_IDLE_CONNS" --hold "$HOLD") ;;
        lp-paced|sse-paced)
                local tr=longpoll subs=$LP_SUBS; [[ $load == sse-* ]] && tr=sse subs=$SSE_SUBS
                args=(fanout --transport "$tr" --subs "$subs" --msgs "$PACED_MSGS" --rate "$PACED_RATE" --size "$SIZE" --publishers "$PUBLISHERS") ;;
        *)      die "unknown load $load (see --help)" ;;
    esac
    if ! start_server "$t" "$history"; then
        RESULT[$t-$load]="server did not start (log: $SCRATCH/logs/$t.log)"
        stop_server; return 0
    fi
    local -a cmd=(taskset -c "$BENCH_CPU" "$B" bench "${args[@]}" --target "$t"
        --server "$SERVER_URL" --server-pid "$SERVER_PID" --concurrency "$CONCURRENCY" --json)
    [[ $t == livepush ]] && cmd+=(--api-key "$API_KEY" --token-secret "$TOKEN_SECRET")
    {
        echo "# $t / $load"
        printf '%q ' "${SERVER_CMD[@]}"; echo '&'
        printf '%q ' "${cmd[@]}"; echo
    } >>"$COMMANDS"
    log "$t $load: ${args[*]}"
    local rc=0
    "${cmd[@]}" >"$json" 2>"$SCRATCH/logs/bench-$t-$load.log" || rc=$?
    if (( rc != 0 )) || ! python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$json" 2>/dev/null; then
        RESULT[$t-$load]="bench failed (rc $rc): $(grep -v '^\s*$' "$SCRATCH/logs/bench-$t-$load.log" | tail -1 | cut -c1-200)"
        log "${RESULT[$t-$load]}"
        rm -f "$json"
    fi
    if ! kill -0 "$SERVER_MAIN" 2>/dev/null; then
        log "$t exited during $load (log: $SCRATCH/logs/$t.log)"
        RESULT[$t-$load]=${RESULT[$t-$load]:-"server exited during the run"}
    fi
    stop_server
    sleep 1 # let TIME_WAIT sockets and the CPU settle between runs
}

for t in $TARGETS; do
    case $t in livepush|ws|socketio|nchan) ;; *) die "unknown target $t" ;; esac
    if [[ -n ${SKIP[$t]:-} ]]; then log "skipping $t: ${SKIP[$t]}"; continue; fi
    for load in $LOADS; do
        [[ $load == resume && $t != livepush ]] && continue
        # Long-poll and SSE: livepush against nchan's long-poll and EventSource subscribers.
        [[ $load == lp-* || $load == sse-* ]] && [[ $t != livepush && $t != nchan ]] && continue
        run_load "$t" "$load"
    done
done

# ---- plots: every target of a load on one SVG next to the report ----------------------------
PLOTS=""
for load in idle burst paced; do
    inputs=()
    for t in $TARGETS; do
        [[ -f $SCRATCH/json/$t-$load.json ]] && inputs+=("$t=$SCRATCH/json/$t-$load.json")
    done
    (( ${#inputs[@]} )) || continue
    svg=${OUT%.md}-$load.svg
    if "$B" bench plot --out "$svg" "${inputs[@]}" 2>>"$SCRATCH/logs/plot.log"; then
        PLOTS+="$load=$(basename "$svg") "
    else
        log "the $load plot failed (see $SCRATCH/logs/plot.log)"
    fi
done
export PLOTS

# ---- report ---------------------------------------------------------------------------------
ELAPSED=$(( $(date +%s) - T0 ))
export SCRATCH TARGETS IDLE_CONNS HOLD BURST_SUBS BURST_MSGS PACED_SUBS PACED_RATE PACED_SECS \
    PACED_MSGS RESUME_TERMINALS RESUME_BEHIND SIZE SERVER_CPU BENCH_CPU ELAPSED COMMANDS FULL \
    HTTP_IDLE_CONNS LP_SUBS SSE_SUBS
SKIPS=$SCRATCH/skips.txt
: >"$SKIPS"
for t in "${!SKIP[@]}"; do want "$t" && printf '%s\t%s\n' "$t" "${SKIP[$t]}" >>"$SKIPS"; done
for k in "${!RESULT[@]}"; do printf '%s\t%s\n' "$k" "${RESULT[$k]}" >>"$SKIPS"; done
export SKIPS
{
    echo "uname: $(uname -srm)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "nproc: $NCPU"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "open files (hard): $HARD_NOFILE"
    echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "livepush: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo ?)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "node: $(node --version 2>/dev/null || echo -) ws $WS_VERSION socket.io $SOCKETIO_VERSION"
    echo "nginx: $("$NGINX" -v 2>&1 | sed 's/.*: //') nchan $(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null || echo -)"
} >"$SCRATCH/machine.txt"
export MACHINE=$SCRATCH/machine.txt STAMP_HUMAN="$(date -u "+%Y-%m-%d %H:%M UTC")"
python3 "$ROOT/bench/compare_report.py" >"$OUT"
# The raw JSON of every run, one object per target/load.
python3 - "$SCRATCH/json" >"${OUT%.md}.json" <<'EOF'
import json, os, sys
d = sys.argv[1]
out = {f[:-5]: json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d)) if f.endswith('.json')}
json.dump(out, sys.stdout, indent=1)
EOF
cat "$OUT"
log "wrote $OUT and ${OUT%.md}.json${PLOTS:+ and the plots ${PLOTS}}in ${ELAPSED}s (scratch: $SCRATCH)"
