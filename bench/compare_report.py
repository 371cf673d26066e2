#!/usr/bin/env python3
"""Markdown tables for bench/compare.sh: one table per load, every target's absolute figures
and, in parentheses, the ratio to livepush (target / livepush), and the load's plot under it
if compare.sh drew one. Reads the `livepush bench --json` objects in
$SCRATCH/json/TARGET-LOAD.json and the environment compare.sh exports ($PLOTS: LOAD=FILE.svg
pairs, the files next to the report)."""
import json
import os

env = os.environ
scratch = env["SCRATCH"]
targets = env["TARGETS"].split()
loaded = {}
for t in targets:
    for load in ("idle", "burst", "paced", "resume", "lp-idle", "lp-paced", "sse-idle", "sse-paced"):
        p = os.path.join(scratch, "json", f"{t}-{load}.json")
        if os.path.exists(p):
            with open(p) as f:
                loaded[(t, load)] = json.load(f)

plots = dict(p.split("=", 1) for p in env.get("PLOTS", "").split() if "=" in p)

problems = {}
if os.path.exists(env["SKIPS"]):
    for line in open(env["SKIPS"]):
        k, _, v = line.rstrip("\n").partition("\t")
        problems[k] = v


def get(d, path):
    for k in path.split("."):
        if d is None:
            return None
        d = d.get(k)
    return d


def fmt(v, unit=""):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    a = abs(v)
    if a >= 100_000:
        s = f"{v:,.0f}"
    elif a >= 100:
        s = f"{v:,.0f}"
    elif a >= 10:
        s = f"{v:.1f}"
    elif a >= 1:
        s = f"{v:.2f}"
    elif a == 0:
        s = "0"
    else:
        s = f"{v:.3f}"
    return s + unit


def ratio(v, base):
    if v is None or base is None or isinstance(v, str) or isinstance(base, str):
        return ""
    if base == 0:
        return "" if v == 0 else " (—)"
    return f" ({v / base:.2f}×)"


def kib(b):
    return None if b is None else b / 1024


# Rows: (label, function of the report -> number or string, show ratio?)
def cores(key):
    def f(r):
        u = r.get(key)
        if not u:
            return None
        w = u.get("cpu_wait_fraction")
        return f"{u['cpu_cores']:.2f}" + (f" (waited {w * 100:.0f} %)" if w is not None else "")
    return f


def rss_delta_mib(key):
    def f(r):
        u = r.get(key)
        if not u:
            return None
        return (u["rss_after_kib"] - u["rss_before_kib"]) / 1024
    return f


def anon_per_conn(r):
    v = r.get("server_anon_per_connection_bytes")
    return kib(v)


LOADS = {
    "idle": (
        lambda: f"Idle connections: {int(env['IDLE_CONNS']):,} held for {env['HOLD']}",
        [
            ("connected", lambda r: f"{r['connected']:,} / {r['requested']:,}", False),
            ("server RSS per connection, KiB", lambda r: kib(r.get("server_rss_per_connection_bytes")), True),
            ("server anonymous memory per connection, KiB", anon_per_conn, True),
            ("server RSS before → after, MiB", lambda r: f"{r['server']['rss_before_kib'] / 1024:.1f} → {r['server']['rss_after_kib'] / 1024:.1f}" if r.get("server") else None, False),
            ("connects/s", lambda r: r.get("connects_per_second"), True),
            ("handshake p50, ms", lambda r: get(r, "handshake.p50_ms"), True),
            ("handshake p99, ms", lambda r: get(r, "handshake.p99_ms"), True),
            ("server CPU per connect, µs", lambda r: r.get("server_cpu_per_connect_us"), True),
            ("server cores while connecting", cores("server_connecting"), False),
            ("bench cores while connecting", cores("bench_connecting"), False),
        ],
    ),
    "burst": (
        lambda: f"Burst fan-out: {int(env['BURST_SUBS']):,} subscribers × {int(env['BURST_MSGS']):,} messages of {env['SIZE']} B, unpaced",
        [
            ("delivered / expected", lambda r: f"{r['deliveries']:,} / {r['expected_deliveries']:,}", False),
            ("missing (lost)", lambda r: r.get("missing"), False),
            ("duplicates", lambda r: r.get("duplicates"), False),
            ("deliveries/s", lambda r: r.get("deliveries_per_second"), True),
            ("latency p50, ms", lambda r: get(r, "latency.p50_ms"), True),
            ("latency p99, ms", lambda r: get(r, "latency.p99_ms"), True),
            ("latency max, ms", lambda r: get(r, "latency.max_ms"), True),
            ("server CPU per delivery, µs", lambda r: r.get("server_cpu_per_delivery_us"), True),
            ("server cores", cores("server"), False),
            ("bench cores", cores("bench_process"), False),
            ("server RSS growth, MiB", rss_delta_mib("server"), True),
        ],
    ),
    "paced": (
        lambda: f"Paced fan-out: {int(env['PACED_SUBS']):,} subscribers, {env['PACED_RATE']} msg/s for {env['PACED_SECS']} s ({int(env['PACED_MSGS']):,} messages of {env['SIZE']} B)",
        [
            ("delivered / expected", lambda r: f"{r['deliveries']:,} / {r['expected_deliveries']:,}", False),
            ("missing (lost)", lambda r: r.get("missing"), False),
            ("latency p50, ms", lambda r: get(r, "latency.p50_ms"), True),
            ("latency p99, ms", lambda r: get(r, "latency.p99_ms"), True),
            ("latency p99.9, ms", lambda r: get(r, "latency.p999_ms"), True),
            ("latency max, ms", lambda r: get(r, "latency.max_ms"), True),
            ("server CPU per delivery, µs", lambda r: r.get("server_cpu_per_delivery_us"), True),
            ("server cores", cores("server"), False),
            ("bench cores", cores("bench_process"), False),
        ],
    ),
    "resume": (
        lambda: f"Resume storm (livepush only): {int(env['RESUME_TERMINALS']):,} terminals × {int(env['RESUME_BEHIND']):,} messages behind",
        [
            ("recovered", lambda r: f"{r['recovered']:,} / {r['terminals']:,}", False),
            ("missing / duplicates", lambda r: f"{r['missing']:,} / {r['duplicates']:,}", False),
            ("all recovered after, ms", lambda r: r.get("all_recovered_ms"), False),
            ("per-terminal recovery p50 / p99, ms", lambda r: f"{fmt(get(r, 'recovery.p50_ms'))} / {fmt(get(r, 'recovery.p99_ms'))}", False),
            ("replayed messages/s", lambda r: r.get("replayed_per_second"), False),
            ("server CPU per replayed message, µs", lambda r: r.get("server_cpu_per_replayed_us"), False),
            ("server cores", cores("server"), False),
        ],
    ),
}

# Long-poll and SSE (issue 18): livepush against nchan's long-poll (`/lp/ROOM`) and
# EventSource (`/es/ROOM`) subscribers on the same room size.
def http_idle(kind, name):
    return (
        lambda: f"{kind} (issue 18): {int(env['HTTP_IDLE_CONNS']):,} {name} held for {env['HOLD']}; nchan column: nchan's {'long-poll' if kind == 'Long-poll' else 'EventSource'} subscriber",
        [row for row in LOADS["idle"][1] if row[0] != "connects/s"],
    )


def http_paced(kind, subs):
    return (
        lambda: f"{kind} fan-out (issue 18): {int(env[subs]):,} subscribers, {env['PACED_RATE']} msg/s for {env['PACED_SECS']} s ({int(env['PACED_MSGS']):,} messages of {env['SIZE']} B); nchan column: nchan's {'long-poll' if kind == 'Long-poll' else 'EventSource'} subscriber",
        LOADS["paced"][1] + [("polls / streams reconnected", lambda r: r.get("reconnects"), False)],
    )


LOADS["lp-idle"] = http_idle("Long-poll", "parked polls")
LOADS["lp-paced"] = http_paced("Long-poll", "LP_SUBS")
LOADS["sse-idle"] = http_idle("SSE", "open streams")
LOADS["sse-paced"] = http_paced("SSE", "SSE_SUBS")
# The targets: livepush at most half of nchan's figure, i.e. a ratio nchan / livepush
# of at least 2 in these rows.
TARGET_ROWS = {
    "lp-idle": "server RSS per connection, KiB",
    "sse-idle": "server RSS per connection, KiB",
    "lp-paced": "server CPU per delivery, µs",
    "sse-paced": "server CPU per delivery, µs",
}

out = []
w = out.append
w(f"# livepush side by side — {env.get('STAMP_HUMAN', '')}".rstrip(" —"))
w("")
w("Generated by `bench/compare.sh`. Each cell: the absolute figure and, in parentheses, the ratio")
w("target / livepush (memory, latency, CPU: lower is better; rates: higher is better). Every")
w(f"server pinned to core {env['SERVER_CPU']}, the load generator to core {env['BENCH_CPU']}; a fresh server per load.")
w("")
for load, (title, rows) in LOADS.items():
    cols = [t for t in targets if (t, load) in loaded]
    if load == "resume":
        cols = [t for t in cols if t == "livepush"]
    if not cols:
        continue
    w(f"## {title()}")
    w("")
    w("| | " + " | ".join(cols) + " |")
    w("| --- | " + " | ".join("---:" for _ in cols) + " |")
    base = loaded.get(("livepush", load))
    for label, fn, want_ratio in rows:
        cells = []
        for t in cols:
            try:
                v = fn(loaded[(t, load)])
            except (KeyError, TypeError):
                v = None
            try:
                b = fn(base) if base is not None else None
            except (KeyError, TypeError):
                b = None
            c = fmt(v)
            if want_ratio and t != "livepush":
                c += ratio(v, b)
            cells.append(c)
        w(f"| {label} | " + " | ".join(cells) + " |")
    if load in TARGET_ROWS and "livepush" in cols and "nchan" in cols:
        fn = next(f for label, f, _ in rows if label == TARGET_ROWS[load])
        try:
            lp, nc = fn(loaded[("livepush", load)]), fn(loaded[("nchan", load)])
        except (KeyError, TypeError):
            lp = nc = None
        if lp is None or nc is None or isinstance(lp, str) or isinstance(nc, str):
            verdict = "not measured"
        elif lp <= 0.5 * nc:
            verdict = f"yes ({lp / nc:.2f}× nchan)" if nc else "not measured"
        else:
            verdict = f"no ({lp / nc:.2f}× nchan)" if nc else "not measured"
        w("")
        w(f"Issue 18 target, {TARGET_ROWS[load]} ≤ 0.5× nchan: **{verdict}**")
    errs = [(t, loaded[(t, load)].get("first_error")) for t in cols]
    errs = [(t, e) for t, e in errs if e]
    for t, e in errs:
        w(f"\n{t}: first error: `{e}`")
    w("")
    if load in plots:
        w(f"![{load}: latency distribution and rate over time, every target]({plots[load]})")
        w("")

if problems:
    w("## Skipped or failed")
    w("")
    for k, v in sorted(problems.items()):
        w(f"- **{k}**: {v}")
    w("")

w("## Machine")
w("")
w("```")
w(open(env["MACHINE"]).read().rstrip())
w(f"script wall time: {env['ELAPSED']} s")
w("```")
w("")
w("## Commands run")
w("")
w("```sh")
w(open(env["COMMANDS"]).read().rstrip())
w("```")
print("\n".join(out))
