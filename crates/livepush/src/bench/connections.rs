//! `livepush bench connections`: open N WebSocket connections that each do the real protocol
//! (`connect` with a token, `join` a room) and then idle; report the connect rate and what
//! each held connection costs the server in resident memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::sync::watch;

use super::client::{FirstError, secs_since, staggered};
use super::plot::PlotArg;
use super::proc::{Probe, ProcessUse};
use super::report::{self, Histogram, Latency, Rates, Table, Timeline, bytes, count, per};
use super::server::{ServerOpts, Sut};
use super::targets::{Event, now_micros};
use super::transport::{Sub, Transport};
use super::{bar, duration, nofile_limit, note};

#[derive(Debug, Args)]
pub struct ConnectionsBench {
    #[command(flatten)]
    server: ServerOpts,
    /// Connections to open and hold (over all shards).
    #[arg(long, default_value_t = 1000)]
    conns: u64,
    /// Rooms the connections join, round robin (`bench-RUN-0`, `bench-RUN-1`, …).
    #[arg(long, default_value_t = 1)]
    rooms: u64,
    /// How long to hold every connection open before the memory is read again.
    #[arg(long, default_value = "3s", value_parser = duration)]
    hold: Duration,
    /// Give up on a connection whose handshake takes longer.
    #[arg(long, default_value = "30s", value_parser = duration)]
    timeout: Duration,
    /// What each terminal holds: a WebSocket, a parked long-poll (the next one sent as soon
    /// as one is answered) or an open SSE stream (livepush and nchan only for the last two).
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    transport: Transport,
    #[command(flatten)]
    plot: PlotArg,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    target: &'static str,
    transport: &'static str,
    shard: String,
    requested: u64,
    connected: u64,
    failed: u64,
    first_error: Option<String>,
    /// Connections that ended while held.
    dropped_while_held: u64,
    connect_seconds: f64,
    connects_per_second: f64,
    /// From opening the TCP connection to `joined`.
    handshake: Latency,
    /// The handshake time's distribution: `[ms, fraction at or below]`.
    handshake_cdf: Vec<[f64; 2]>,
    /// Connections joined per 10 ms from the first connect.
    connects_over_time: Rates,
    server: Option<ProcessUse>,
    server_cpu_per_connect_us: Option<f64>,
    /// CPU use while connecting: which side limits the connect rate.
    server_connecting: Option<ProcessUse>,
    bench_connecting: Option<ProcessUse>,
    server_rss_per_connection_bytes: Option<f64>,
    server_anon_per_connection_bytes: Option<f64>,
    bench_rss_per_connection_bytes: Option<f64>,
    nofile_limit: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connected: Arc<AtomicU64>,
    failed: AtomicU64,
    dropped: AtomicU64,
    handshake: Histogram,
    connects: Timeline,
    first_error: FirstError,
}

pub async fn run(a: ConnectionsBench) -> anyhow::Result<()> {
    let sut = Arc::new(Sut::start(&a.server, 1000).await?);
    let n = a.server.shard.share(a.conns);
    let limit = nofile_limit();
    if n + 64 > limit {
        note(format!(
            "warning: {n} connections need more open files than the limit ({limit}); \
             split the run over processes with --shard I/K"
        ));
    }
    let rooms: Vec<String> = (0..a.rooms.max(1))
        .map(|r| format!("bench-{}-{r}", sut.run_id))
        .collect();
    let me = Probe::new(std::process::id());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = sut.sample();
    let me_before = me.sample();
    note(format!(
        "livepush bench connections: {n} {} {} connections to {} ({} node(s)) over {} room(s)",
        sut.target.name(),
        a.transport.name(),
        sut.base,
        sut.nodes(),
        rooms.len()
    ));

    let c = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let pb = bar(n, "connecting");
    let started = Instant::now();
    c.connects.start(now_micros());
    let handles = {
        let (sut, c, pb, rooms) = (sut.clone(), c.clone(), pb.clone(), Arc::new(rooms));
        let (timeout, transport) = (a.timeout, a.transport);
        staggered(n, a.server.concurrency, move |i, permit| {
            let (sut, c, pb, rooms, mut stop) = (
                sut.clone(),
                c.clone(),
                pb.clone(),
                rooms.clone(),
                stop_rx.clone(),
            );
            async move {
                let room = &rooms[(i % rooms.len() as u64) as usize];
                let t0 = Instant::now();
                let opened = async {
                    let token = sut.token(i, room)?;
                    let mut s = Sub::open(transport, sut.dialer(i), i, room, token).await?;
                    s.until_ready(timeout).await?;
                    anyhow::Ok(s)
                };
                let mut s = match tokio::time::timeout(timeout, opened).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return fail(&c, &pb, e),
                    Err(_) => return fail(&c, &pb, anyhow::anyhow!("handshake timed out")),
                };
                c.handshake.record(t0.elapsed().as_micros() as u64);
                c.connected.fetch_add(1, Ordering::Relaxed);
                c.connects.add(now_micros(), 1);
                pb.inc(1);
                drop(permit);
                // Idle: answer pings, read `online` counts, until told to stop.
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        step = s.step() => match step {
                            Ok(true) => {
                                if s.events().iter().any(|e| matches!(e, Event::Error(_))) {
                                    tracing::debug!("error frame on an idle connection");
                                }
                            }
                            _ => {
                                c.dropped.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                        },
                    }
                }
                s.close().await;
            }
        })
        .await
    };
    while c.connected.load(Ordering::Relaxed) + c.failed.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_seconds = secs_since(started);
    pb.finish();
    let connected_sample = sut.sample();
    let me_connected = me.sample();
    tokio::time::sleep(a.hold).await;
    let after = sut.sample();
    let me_after = me.sample();

    let closing = bar(n, "closing");
    let _ = stop_tx.send(true);
    for h in handles {
        let _ = h.await;
        closing.inc(1);
    }
    closing.finish_and_clear();

    let connected = c.connected.load(Ordering::Relaxed);
    let server = match (&sut.probe, &before, &after) {
        (Some(p), Some(b), Some(af)) => Some(ProcessUse::between(p, b, af)),
        _ => None,
    };
    let connect_use = match (&sut.probe, &before, &connected_sample) {
        (Some(p), Some(b), Some(m)) => Some(ProcessUse::between(p, b, m)),
        _ => None,
    };
    let conns = connected as f64;
    let r = Report {
        bench: "connections",
        target: sut.target.name(),
        transport: a.transport.name(),
        shard: format!("{}/{}", sut.shard.index, sut.shard.count),
        requested: n,
        connected,
        failed: c.failed.load(Ordering::Relaxed),
        first_error: c.first_error.take(),
        dropped_while_held: c.dropped.load(Ordering::Relaxed),
        connect_seconds,
        connects_per_second: per(conns, connect_seconds),
        handshake: c.handshake.summary_ms(),
        handshake_cdf: c.handshake.cdf_ms(),
        connects_over_time: c.connects.rates(),
        server_cpu_per_connect_us: connect_use.map(|s| per(s.cpu_s() * 1e6, conns)),
        server_connecting: connect_use,
        bench_connecting: super::fanout::usage(&me, me_before.as_ref(), me_connected.as_ref()),
        server_rss_per_connection_bytes: server.map(|s| per(s.rss_delta_bytes(), conns)),
        server_anon_per_connection_bytes: server.and_then(|s| {
            Some(per(
                (s.anon_after_kib? as f64 - s.anon_before_kib? as f64) * 1024.0,
                conns,
            ))
        }),
        server,
        bench_rss_per_connection_bytes: me_before.zip(me_after).map(|(b, af)| {
            per(
                (af.memory.rss_kib as f64 - b.memory.rss_kib as f64) * 1024.0,
                conns,
            )
        }),
        nofile_limit: limit,
    };
    report::emit(sut.json, &r, &table(&r))?;
    a.plot.draw(&r)?;
    if let Some(sut) = Arc::into_inner(sut) {
        sut.stop().await;
    }
    Ok(())
}

fn fail(c: &Counters, pb: &indicatif::ProgressBar, e: anyhow::Error) {
    c.failed.fetch_add(1, Ordering::Relaxed);
    c.first_error.set(&e);
    pb.inc(1);
}

fn table(r: &Report) -> Table {
    let mut t = Table::new(format!(
        "bench connections: {} × {} {} (shard {})",
        count(r.requested),
        r.target,
        r.transport,
        r.shard
    ));
    t.row(
        "connected / failed",
        format!("{} / {}", count(r.connected), count(r.failed)),
    );
    if let Some(e) = &r.first_error {
        t.row("first error", e.replace('|', "\\|"));
    }
    t.row("dropped while held", count(r.dropped_while_held));
    t.row("time to connect all", format!("{:.2} s", r.connect_seconds));
    t.row("connects/s", format!("{:.0}", r.connects_per_second));
    t.row(
        "handshake ms p50 / p90 / p99 / p99.9 / max",
        r.handshake.cell(),
    );
    if let Some(s) = &r.server {
        t.row(
            "server RSS before → after",
            format!(
                "{} → {}",
                bytes(s.rss_before_kib as f64 * 1024.0),
                bytes(s.rss_after_kib as f64 * 1024.0)
            ),
        );
    }
    if let Some(v) = r.server_rss_per_connection_bytes {
        t.row("**server RSS per connection**", format!("**{}**", bytes(v)));
    }
    if let Some(v) = r.server_anon_per_connection_bytes {
        t.row("server anonymous memory per connection", bytes(v));
    }
    if let Some(v) = r.server_cpu_per_connect_us {
        t.row("server CPU per connect", format!("{v:.0} µs"));
    }
    if let Some(s) = &r.server_connecting {
        t.row("server CPU while connecting", s.cores_cell());
    }
    if let Some(b) = &r.bench_connecting {
        t.row("bench CPU while connecting", b.cores_cell());
    }
    if let Some(v) = r.bench_rss_per_connection_bytes {
        t.row("bench (client) RSS per connection", bytes(v));
    }
    t.row("open-files limit", count(r.nofile_limit));
    t
}
