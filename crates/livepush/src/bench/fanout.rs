//! `livepush bench fanout`: N subscribers in one room, M messages published through the HTTP
//! API (as fast as possible, or paced); deliveries per second, publish→receive latency from
//! the time stamped into each payload, loss and duplicates per subscriber, and the server's
//! CPU time per delivery.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{MultiProgress, ProgressDrawTarget};
use serde::Serialize;
use tokio::sync::watch;

use super::client::{FirstError, Tracker, key_of, staggered};
use super::plot::PlotArg;
use super::proc::{Probe, ProcessUse, Sample};
use super::report::{self, Histogram, Latency, Rates, Table, Timeline, bytes, count, per};
use super::server::{ServerOpts, Sut};
use super::targets::{Class, Event, Target, now_micros, payload};
use super::transport::{Sub, Transport};
use super::{bar, duration, follow, nofile_limit, note};

#[derive(Debug, Args)]
pub struct FanoutBench {
    #[command(flatten)]
    server: ServerOpts,
    /// Subscribers in the room (over all shards).
    #[arg(long, default_value_t = 1000)]
    subs: u64,
    /// Messages to publish.
    #[arg(long, default_value_t = 200)]
    msgs: u64,
    /// Publishes per second (default: as fast as the publishers go).
    #[arg(long)]
    rate: Option<f64>,
    /// Size of each payload in bytes (`{"t":…,"n":…,"pad":"…"}`).
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Delivery class of the messages (livepush; peers have only one).
    #[arg(long, value_enum, default_value_t = Class::Reliable)]
    class: Class,
    /// Concurrent HTTP publishers (one alone waits for each answer before the next publish,
    /// which measures round trips more than the server).
    #[arg(long, default_value_t = 8)]
    publishers: usize,
    /// The room (default: a fresh one per run; give every shard the same).
    #[arg(long)]
    room: Option<String>,
    /// After the last publish, stop once nothing has arrived for this long.
    #[arg(long, default_value = "5s", value_parser = duration)]
    drain: Duration,
    /// Only subscribe; another process publishes (implied by --shard I/K with I > 0).
    #[arg(long)]
    no_publish: bool,
    /// How long a subscribe-only process waits for the first message.
    #[arg(long, default_value = "5m", value_parser = duration)]
    wait: Duration,
    /// Give up on a subscriber whose handshake takes longer.
    #[arg(long, default_value = "30s", value_parser = duration)]
    timeout: Duration,
    /// How subscribers receive: WebSocket, long-poll (one parked poll each) or SSE
    /// (livepush and nchan only for the last two).
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
    class: &'static str,
    shard: String,
    room: String,
    subscribers: u64,
    connected: u64,
    failed: u64,
    first_error: Option<String>,
    messages: u64,
    size_bytes: usize,
    rate: Option<f64>,
    publishers: usize,
    published: u64,
    publish_errors: u64,
    first_publish_error: Option<String>,
    publish_seconds: f64,
    publishes_per_second: f64,
    /// From sending a publish request to its answer.
    publish_latency: Latency,
    /// From sending a publish request to the first subscriber's receipt of it, one sample
    /// per message: with `publish_latency`, the store's share of the delivery latency.
    first_delivery_latency: Latency,
    expected_deliveries: u64,
    deliveries: u64,
    duplicates: u64,
    /// Deliveries that were no message of this run (a seq out of range).
    stray: u64,
    /// Expected deliveries that never came (reliable: lost; transient: dropped).
    missing: u64,
    missing_fraction: f64,
    subscribers_missing_some: u64,
    /// From the first publish to the last delivery.
    window_seconds: f64,
    deliveries_per_second: f64,
    latency: Latency,
    /// The latency distribution: `[ms, fraction at or below]`.
    latency_cdf: Vec<[f64; 2]>,
    /// Deliveries per 10 ms from the first publish.
    deliveries_over_time: Rates,
    connections_dropped: u64,
    /// Long-poll connections or SSE streams opened again after the server ended one.
    reconnects: u64,
    error_frames: u64,
    server: Option<ProcessUse>,
    server_cpu_per_delivery_us: Option<f64>,
    /// The bench process itself over the same phase: it must not be the bottleneck.
    bench_process: Option<ProcessUse>,
}

/// Figures all subscriber tasks add to.
#[derive(Debug, Default)]
struct Shared {
    ready: AtomicU64,
    failed: AtomicU64,
    first_error: FirstError,
    distinct: Arc<AtomicU64>,
    duplicates: AtomicU64,
    stray: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
    reconnects: AtomicU64,
    /// Set just before the stop signal: subscriber loops check it after every read.
    stopping: AtomicBool,
    /// Time of the latest delivery, µs since the epoch.
    last_us: AtomicU64,
    latency: Histogram,
    deliveries: Timeline,
    /// Per message (by its index `n`): the earliest delivery's latency, µs (`u64::MAX` until
    /// one came). Publish → first delivery, beside publish → answer, shows the store's share.
    first: Vec<AtomicU64>,
}

impl Shared {
    /// A delivery of message `n` took `micros`: keep it if it is the message's first.
    fn first_delivery(&self, n: u64, micros: u64) {
        if let Some(slot) = self.first.get(n as usize) {
            // A load first: most deliveries are not the first, and need no write.
            if micros < slot.load(Ordering::Relaxed) {
                slot.fetch_min(micros, Ordering::Relaxed);
            }
        }
    }

    /// Publish → first delivery of every message that reached this shard.
    fn first_deliveries(&self) -> Histogram {
        let h = Histogram::default();
        for slot in &self.first {
            let us = slot.load(Ordering::Relaxed);
            if us != u64::MAX {
                h.record(us);
            }
        }
        h
    }
}

pub async fn run(a: FanoutBench) -> anyhow::Result<()> {
    let sut = Arc::new(Sut::start(&a.server, a.msgs as usize).await?);
    let n = a.server.shard.share(a.subs);
    let publishes = !a.no_publish && sut.shard.index == 0;
    let room = a
        .room
        .clone()
        .unwrap_or_else(|| format!("bench-{}", sut.run_id));
    let by_seq = sut.target.has_seq() && a.class == Class::Reliable;
    if n + 64 > nofile_limit() {
        note("warning: more subscribers than open files allow; split with --shard I/K");
    }
    let class = match sut.target {
        Target::Livepush => format!("{} ", a.class.name()),
        _ => String::new(),
    };
    note(format!(
        "livepush bench fanout: {n} {} {} subscribers in {room}{}, {} {class}messages of {} B{}",
        sut.target.name(),
        a.transport.name(),
        match sut.nodes() {
            1 => String::new(),
            k => format!(" spread over {k} nodes"),
        },
        a.msgs,
        a.size,
        a.rate.map(|r| format!(" at {r}/s")).unwrap_or_default()
    ));

    // Subscribe.
    let sh = Arc::new(Shared {
        first: (0..a.msgs).map(|_| AtomicU64::new(u64::MAX)).collect(),
        ..Shared::default()
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let pb = bar(n, "subscribing");
    let subscribers = {
        let (sut, sh, pb, room) = (sut.clone(), sh.clone(), pb.clone(), room.clone());
        let (m, timeout, transport) = (a.msgs, a.timeout, a.transport);
        staggered(n, a.server.concurrency, move |i, permit| {
            let (sut, sh, pb, room, stop) = (
                sut.clone(),
                sh.clone(),
                pb.clone(),
                room.clone(),
                stop_rx.clone(),
            );
            async move {
                let r = subscriber(
                    &sut, &sh, transport, i, &room, m, by_seq, timeout, permit, stop,
                )
                .await;
                pb.inc(1);
                r
            }
        })
        .await
    };
    while sh.ready.load(Ordering::Relaxed) + sh.failed.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pb.finish();
    let connected = sh.ready.load(Ordering::Relaxed);
    if publishes {
        // Let the last joins settle (online counts) before the clock starts.
        tokio::time::sleep(Duration::from_millis(500)).await;
    } else {
        note(format!("ready: {connected} subscribers wait for messages"));
    }

    // Publish, and follow the deliveries.
    let me = Probe::new(std::process::id());
    let before = sut.sample();
    let me_before = me.sample();
    let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
    let pubs = Arc::new(Published::default());
    let started = Instant::now();
    let start_us = now_micros();
    sh.deliveries.start(start_us);
    let publishers = if publishes {
        let pbp = mp.add(bar(a.msgs, "publishing"));
        follow(&pbp, &pubs.ok);
        let plan = Plan {
            msgs: a.msgs,
            rate: a.rate,
            size: a.size,
            class: a.class,
            publishers: a.publishers,
        };
        Some((spawn_publishers(plan, &sut, &room, &pubs, started), pbp))
    } else {
        None
    };
    let expected_each = a.msgs;
    let pbd = mp.add(bar(connected * expected_each, "delivered"));
    follow(&pbd, &sh.distinct);

    let mut publish_seconds = 0.0;
    let mut publishers = publishers;
    let mut last_seen = 0;
    let mut last_change = Instant::now();
    let (mut after, mut me_after) = (before, me_before);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some((handles, pbp)) = &publishers
            && handles.iter().all(|h| h.is_finished())
        {
            publish_seconds = pubs
                .last_us
                .load(Ordering::Relaxed)
                .saturating_sub(start_us) as f64
                / 1e6;
            pbp.finish();
            last_change = Instant::now();
            publishers = None;
        }
        let publishing = publishers.is_some();
        let d = sh.distinct.load(Ordering::Relaxed);
        if d != last_seen {
            last_seen = d;
            last_change = Instant::now();
            after = sut.sample_cpu().or(after);
            me_after = me.sample_cpu().or(me_after);
        }
        if publishing {
            continue;
        }
        let sent = if publishes {
            pubs.ok.load(Ordering::Relaxed)
        } else {
            a.msgs
        };
        if d >= connected * sent {
            break;
        }
        let idle = last_change.elapsed();
        if d == 0 && !publishes {
            if idle >= a.wait {
                break;
            }
        } else if idle >= a.drain {
            break;
        }
    }
    pbd.finish();
    // The CPU time as of the last delivery, the memory as of now.
    if let (Some(a), Some(full)) = (after, sut.sample()) {
        after = Some(a.with_memory_of(&full));
    }
    sh.stopping.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let mut missing = 0;
    let mut short = 0;
    for h in subscribers {
        if let Ok(Some(m)) = h.await {
            missing += m;
            short += u64::from(m > 0);
        }
    }

    let published = if publishes {
        pubs.ok.load(Ordering::Relaxed)
    } else {
        a.msgs
    };
    let publish_errors = pubs.errors.load(Ordering::Relaxed);
    // A failed publish is missing at every subscriber: that is not a delivery loss.
    let missing = missing.saturating_sub(connected * (a.msgs - published.min(a.msgs)));
    let deliveries = sh.distinct.load(Ordering::Relaxed);
    let last_us = sh.last_us.load(Ordering::Relaxed);
    let window_seconds = last_us.saturating_sub(start_us) as f64 / 1e6;
    let server = match (&sut.probe, &before, &after) {
        (Some(p), Some(b), Some(af)) => Some(ProcessUse::between(p, b, af)),
        _ => None,
    };
    let expected = connected * published;
    let r = Report {
        bench: "fanout",
        target: sut.target.name(),
        transport: a.transport.name(),
        class: a.class.name(),
        shard: format!("{}/{}", sut.shard.index, sut.shard.count),
        room,
        subscribers: n,
        connected,
        failed: sh.failed.load(Ordering::Relaxed),
        first_error: sh.first_error.take(),
        messages: a.msgs,
        size_bytes: a.size,
        rate: a.rate,
        publishers: a.publishers,
        published,
        publish_errors,
        first_publish_error: pubs.first_error.take(),
        publish_seconds,
        publishes_per_second: per(published as f64, publish_seconds),
        publish_latency: pubs.latency.summary_ms(),
        expected_deliveries: expected,
        deliveries,
        duplicates: sh.duplicates.load(Ordering::Relaxed),
        stray: sh.stray.load(Ordering::Relaxed),
        missing,
        missing_fraction: per(missing as f64, expected as f64),
        subscribers_missing_some: short,
        window_seconds,
        deliveries_per_second: per(deliveries as f64, window_seconds),
        latency: sh.latency.summary_ms(),
        first_delivery_latency: sh.first_deliveries().summary_ms(),
        latency_cdf: sh.latency.cdf_ms(),
        deliveries_over_time: sh.deliveries.rates(),
        connections_dropped: sh.dropped.load(Ordering::Relaxed),
        reconnects: sh.reconnects.load(Ordering::Relaxed),
        error_frames: sh.errors.load(Ordering::Relaxed),
        server_cpu_per_delivery_us: server.map(|s| per(s.cpu_s() * 1e6, deliveries as f64)),
        server,
        bench_process: usage(&me, me_before.as_ref(), me_after.as_ref()),
    };
    report::emit(sut.json, &r, &table(&r))?;
    a.plot.draw(&r)?;
    if let Some(sut) = Arc::into_inner(sut) {
        sut.stop().await;
    }
    Ok(())
}

/// What a process used between two samples, if both were taken.
pub(super) fn usage(p: &Probe, a: Option<&Sample>, b: Option<&Sample>) -> Option<ProcessUse> {
    Some(ProcessUse::between(p, a?, b?))
}

/// One subscriber: join, then count every message until told to stop. Returns how many of
/// the `m` messages it missed, or `None` if it never got in.
#[allow(clippy::too_many_arguments)]
async fn subscriber(
    sut: &Sut,
    sh: &Shared,
    transport: Transport,
    i: u64,
    room: &str,
    m: u64,
    by_seq: bool,
    timeout: Duration,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) -> Option<u64> {
    let opened = async {
        let token = sut.token(i, room)?;
        let mut s = Sub::open(transport, sut.dialer(i), i, room, token).await?;
        let (joined, early) = s.until_ready(timeout).await?;
        anyhow::Ok((s, joined, early))
    };
    let (mut s, joined, early) = match tokio::time::timeout(timeout, opened).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            sh.first_error.set(&e);
            sh.failed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Err(_) => {
            sh.first_error.set(&anyhow::anyhow!("handshake timed out"));
            sh.failed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    drop(permit);
    sh.ready.fetch_add(1, Ordering::Relaxed);
    let base = joined.seq;
    let mut t = Tracker::new(m);
    let take = |t: &mut Tracker, d: &super::targets::Delivery, now: u64| -> u64 {
        if t.record(key_of(d, by_seq, base)) {
            let micros = now.saturating_sub(d.stamp.t);
            sh.latency.record(micros);
            sh.first_delivery(d.stamp.n, micros);
            1
        } else {
            0
        }
    };
    let now = now_micros();
    for d in &early {
        take(&mut t, d, now);
    }
    {
        // One wait for the stop signal for the whole loop (not a new one per message); the
        // socket goes first, and the flag ends the loop even if messages keep coming.
        let stopped = stop.changed();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                biased;
                step = s.step() => match step {
                    Ok(true) => {
                        let now = now_micros();
                        let mut new = 0;
                        for e in s.events() {
                            match e {
                                Event::Msg(d) => new += take(&mut t, d, now),
                                Event::Error(_) => {
                                    sh.errors.fetch_add(1, Ordering::Relaxed);
                                }
                                Event::Ready { .. } => {}
                            }
                        }
                        if new > 0 {
                            sh.distinct.fetch_add(new, Ordering::Relaxed);
                            sh.last_us.fetch_max(now, Ordering::Relaxed);
                            sh.deliveries.add(now, new);
                        }
                    }
                    _ => {
                        sh.dropped.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                },
                _ = &mut stopped => break,
            }
            if sh.stopping.load(Ordering::Relaxed) {
                break;
            }
        }
    }
    sh.duplicates.fetch_add(t.duplicates, Ordering::Relaxed);
    sh.stray.fetch_add(t.stray, Ordering::Relaxed);
    sh.reconnects.fetch_add(s.reconnects(), Ordering::Relaxed);
    if !*stop.borrow() {
        // Dropped early: wait for the end so that the close below does not race the run.
        let _ = stop.changed().await;
    }
    s.close().await;
    Some(t.missing())
}

/// What to publish: `msgs` payloads of `size` bytes by `publishers` concurrent publishers,
/// paced at `rate` per second if given.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    pub msgs: u64,
    pub rate: Option<f64>,
    pub size: usize,
    pub class: Class,
    pub publishers: usize,
}

/// What the publishers did.
#[derive(Debug, Default)]
pub(super) struct Published {
    pub ok: Arc<AtomicU64>,
    pub errors: AtomicU64,
    pub first_error: FirstError,
    /// Time from sending a publish to its answer.
    pub latency: Histogram,
    /// When the last answer came, µs since the epoch.
    pub last_us: AtomicU64,
}

/// Start the publishers: they share one counter of messages, each stamping its payload with
/// the time just before the request; with a rate, message i is due at start + i/rate.
pub(super) fn spawn_publishers(
    plan: Plan,
    sut: &Arc<Sut>,
    room: &str,
    pubs: &Arc<Published>,
    started: Instant,
) -> Vec<tokio::task::JoinHandle<()>> {
    let next = Arc::new(AtomicU64::new(0));
    (0..plan.publishers.max(1))
        .map(|_| {
            let (sut, pubs, next, room) =
                (sut.clone(), pubs.clone(), next.clone(), room.to_owned());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= plan.msgs {
                        return;
                    }
                    if let Some(r) = plan.rate.filter(|r| *r > 0.0) {
                        let due = started + Duration::from_secs_f64(i as f64 / r);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let t0 = now_micros();
                    let body = payload(t0, i, plan.size);
                    match sut.publish(&room, plan.class, &body).await {
                        Ok(_) => {
                            let now = now_micros();
                            pubs.latency.record(now.saturating_sub(t0));
                            pubs.last_us.fetch_max(now, Ordering::Relaxed);
                            pubs.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            pubs.errors.fetch_add(1, Ordering::Relaxed);
                            pubs.first_error.set(&e);
                        }
                    }
                }
            })
        })
        .collect()
}

fn table(r: &Report) -> Table {
    let mut t = Table::new(format!(
        "bench fanout: {} subscribers × {} messages of {} B, {} {} {} (shard {})",
        count(r.subscribers),
        count(r.messages),
        r.size_bytes,
        r.target,
        r.transport,
        r.class,
        r.shard
    ));
    t.row(
        "subscribers connected / failed",
        format!("{} / {}", count(r.connected), count(r.failed)),
    );
    if let Some(e) = &r.first_error {
        t.row("first error", e.replace('|', "\\|"));
    }
    t.row(
        "published / errors",
        format!("{} / {}", count(r.published), count(r.publish_errors)),
    );
    if let Some(e) = &r.first_publish_error {
        t.row("first publish error", e.replace('|', "\\|"));
    }
    if r.publish_seconds > 0.0 {
        t.row(
            "publishing",
            format!(
                "{:.2} s ({:.0}/s{})",
                r.publish_seconds,
                r.publishes_per_second,
                r.rate.map(|x| format!(", asked {x}/s")).unwrap_or_default()
            ),
        );
    }
    if r.publish_latency.samples > 0 {
        t.row(
            "publish answer ms p50 / p90 / p99 / p99.9 / max",
            r.publish_latency.cell(),
        );
    }
    if r.first_delivery_latency.samples > 0 {
        t.row(
            "publish → first delivery ms p50 / p90 / p99 / p99.9 / max",
            r.first_delivery_latency.cell(),
        );
    }
    t.row(
        "deliveries / expected",
        format!("{} / {}", count(r.deliveries), count(r.expected_deliveries)),
    );
    t.row(
        "**deliveries/s** (first publish → last delivery)",
        format!(
            "**{:.0}** ({:.2} s)",
            r.deliveries_per_second, r.window_seconds
        ),
    );
    t.row(
        "**latency ms** p50 / p90 / p99 / p99.9 / max",
        format!("**{}**", r.latency.cell()),
    );
    t.row(
        if r.class == "reliable" && r.target == "livepush" {
            "lost (reliable)"
        } else {
            "missing (dropped or lost)"
        },
        format!(
            "{} ({:.3} %, {} subscribers short)",
            count(r.missing),
            r.missing_fraction * 100.0,
            count(r.subscribers_missing_some)
        ),
    );
    t.row("duplicates", count(r.duplicates));
    if r.stray > 0 {
        t.row("stray (out-of-range seq)", count(r.stray));
    }
    t.row("connections dropped", count(r.connections_dropped));
    if r.transport != "ws" {
        t.row("polls / streams reconnected", count(r.reconnects));
    }
    if r.error_frames > 0 {
        t.row("error frames", count(r.error_frames));
    }
    if let Some(s) = &r.server {
        t.row(
            "server CPU (user + system)",
            format!(
                "{:.2} s + {:.2} s = {}",
                s.cpu_user_s,
                s.cpu_system_s,
                s.cores_cell()
            ),
        );
        t.row(
            "server RSS before → after",
            format!(
                "{} → {}",
                bytes(s.rss_before_kib as f64 * 1024.0),
                bytes(s.rss_after_kib as f64 * 1024.0)
            ),
        );
    }
    if let Some(v) = r.server_cpu_per_delivery_us {
        t.row("**server CPU per delivery**", format!("**{v:.2} µs**"));
    }
    if let Some(b) = &r.bench_process {
        t.row("bench (client) CPU", b.cores_cell());
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_message_keeps_its_earliest_delivery() {
        let sh = Shared {
            first: (0..3).map(|_| AtomicU64::new(u64::MAX)).collect(),
            ..Shared::default()
        };
        sh.first_delivery(0, 5_000);
        sh.first_delivery(0, 3_000);
        sh.first_delivery(0, 9_000);
        sh.first_delivery(2, 1_000);
        // Not a message of the run: ignored.
        sh.first_delivery(7, 1);
        let l = sh.first_deliveries().summary_ms();
        assert_eq!(l.samples, 2, "message 1 never arrived");
        assert!((2.9..=3.1).contains(&l.max_ms), "{l:?}");
    }
}
