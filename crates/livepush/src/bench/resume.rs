//! `livepush bench resume`: N terminals join a room and all drop at once (TCP reset, no close
//! frame); K reliable messages are published while they are away; then all reconnect at once
//! with `since` = their last position. Reports how long until every terminal has every missed
//! seq, and any loss.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::sync::watch;

use super::client::{FirstError, Joined, Session, Tracker, key_of, staggered};
use super::fanout::{Plan, Published, spawn_publishers, usage};
use super::proc::{Probe, ProcessUse};
use super::report::{self, Histogram, Latency, Table, count, per};
use super::server::{ServerOpts, Sut};
use super::targets::{Class, Event, Since, Target};
use super::{bar, duration, follow, nofile_limit, note};

#[derive(Debug, Args)]
pub struct ResumeBench {
    #[command(flatten)]
    server: ServerOpts,
    /// Terminals (over all shards).
    #[arg(long, default_value_t = 1000)]
    terminals: u64,
    /// Reliable messages published while they are away.
    #[arg(long, default_value_t = 100)]
    behind: u64,
    /// Size of each payload in bytes.
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Concurrent HTTP publishers.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// The room (default: a fresh one per run).
    #[arg(long)]
    room: Option<String>,
    /// Give up on terminals that have not recovered this long after the reconnect.
    #[arg(long, default_value = "60s", value_parser = duration)]
    timeout: Duration,
    /// Targets without replay (ws, socketio, nchan): how long to wait for messages after
    /// reconnecting before counting them lost.
    #[arg(long, default_value = "2s", value_parser = duration)]
    grace: Duration,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    target: &'static str,
    shard: String,
    room: String,
    terminals: u64,
    joined: u64,
    behind: u64,
    published: u64,
    publish_errors: u64,
    /// How long the server took to see every terminal gone (livepush `online` = 0).
    server_noticed_ms: Option<f64>,
    reconnected: u64,
    reconnect_failed: u64,
    first_error: Option<String>,
    /// `joined` answered `recovered:false`.
    not_recovered_flag: u64,
    /// Terminals that got every missed message.
    recovered: u64,
    /// Time from the reconnect until the last terminal had every missed message (or gave up).
    all_recovered_ms: f64,
    /// Per terminal: time from the reconnect until it had every missed message.
    recovery: Latency,
    replayed: u64,
    missing: u64,
    duplicates: u64,
    replayed_per_second: f64,
    server: Option<ProcessUse>,
    server_cpu_per_replayed_us: Option<f64>,
    bench_process: Option<ProcessUse>,
}

#[derive(Debug, Default)]
struct Shared {
    joined: AtomicU64,
    failed: AtomicU64,
    reconnected: AtomicU64,
    reconnect_failed: AtomicU64,
    not_recovered_flag: AtomicU64,
    /// Terminals done: recovered, failed, or given up.
    done: Arc<AtomicU64>,
    recovered: AtomicU64,
    replayed: AtomicU64,
    missing: AtomicU64,
    duplicates: AtomicU64,
    recovery: Histogram,
    first_error: FirstError,
}

pub async fn run(a: ResumeBench) -> anyhow::Result<()> {
    let sut = Arc::new(Sut::start(&a.server, a.behind as usize).await?);
    let n = a.server.shard.share(a.terminals);
    let room = a
        .room
        .clone()
        .unwrap_or_else(|| format!("bench-{}", sut.run_id));
    if n + 64 > nofile_limit() {
        note("warning: more terminals than open files allow; split with --shard I/K");
    }
    note(format!(
        "livepush bench resume: {n} {} terminals in {room}, {} messages behind",
        sut.target.name(),
        a.behind
    ));
    let sh = Arc::new(Shared::default());
    let tokens: Arc<Vec<Option<String>>> = Arc::new(
        (0..n)
            .map(|i| sut.token(i, &room))
            .collect::<anyhow::Result<_>>()?,
    );

    // 1. Join, hold, then drop all at once.
    let (drop_tx, drop_rx) = watch::channel(false);
    let pb = bar(n, "joining");
    let holders = {
        let (sut, sh, pb, room, tokens) = (
            sut.clone(),
            sh.clone(),
            pb.clone(),
            room.clone(),
            tokens.clone(),
        );
        let timeout = a.timeout;
        staggered(n, a.server.concurrency, move |i, permit| {
            let (sut, sh, pb, room, tokens, mut drop_rx) = (
                sut.clone(),
                sh.clone(),
                pb.clone(),
                room.clone(),
                tokens.clone(),
                drop_rx.clone(),
            );
            async move {
                let opened = async {
                    let mut s =
                        Session::open(sut.dialer(i), i, &room, tokens[i as usize].clone(), None)
                            .await?;
                    let (j, _) = s.until_ready(timeout).await?;
                    anyhow::Ok((s, j))
                };
                let r = tokio::time::timeout(timeout, opened).await;
                pb.inc(1);
                let (mut s, joined) = match r {
                    Ok(Ok(x)) => x,
                    Ok(Err(e)) => {
                        sh.first_error.set(&e);
                        sh.failed.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                    Err(_) => {
                        sh.failed.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                };
                sh.joined.fetch_add(1, Ordering::Relaxed);
                drop(permit);
                loop {
                    tokio::select! {
                        _ = drop_rx.changed() => break,
                        step = s.step() => if !matches!(step, Ok(true)) { return None },
                    }
                }
                s.abort();
                Some(joined)
            }
        })
        .await
    };
    while sh.joined.load(Ordering::Relaxed) + sh.failed.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pb.finish();
    let _ = drop_tx.send(true);
    let mut positions: Vec<Option<Joined>> = Vec::with_capacity(n as usize);
    for h in holders {
        positions.push(h.await.ok().flatten());
    }
    let dropped_at = Instant::now();
    let server_noticed_ms = if sut.target == Target::Livepush {
        let mut noticed = None;
        while dropped_at.elapsed() < Duration::from_secs(15) {
            if sut.online(&room).await == Some(0) {
                noticed = Some(dropped_at.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if noticed.is_none() {
            note("warning: the server still counts terminals online 15 s after the drop");
        }
        noticed
    } else {
        tokio::time::sleep(Duration::from_secs(1)).await;
        None
    };
    note(format!(
        "dropped {} terminals; publishing {} messages",
        positions.iter().flatten().count(),
        a.behind
    ));

    // 2. Publish while they are away.
    let pubs = Arc::new(Published::default());
    let plan = Plan {
        msgs: a.behind,
        rate: None,
        size: a.size,
        class: Class::Reliable,
        publishers: a.publishers,
    };
    for h in spawn_publishers(plan, &sut, &room, &pubs, Instant::now()) {
        let _ = h.await;
    }
    let published = pubs.ok.load(Ordering::Relaxed);

    // 3. Everyone reconnects at once.
    let positions = Arc::new(positions);
    let (go_tx, go_rx) = watch::channel(None::<Instant>);
    let (stop_tx, stop_rx) = watch::channel(false);
    let returning = positions.iter().flatten().count() as u64;
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let Some(joined) = positions[i as usize].clone() else {
            continue;
        };
        let (sut, sh, room, tokens) = (sut.clone(), sh.clone(), room.clone(), tokens.clone());
        let (mut go, stop) = (go_rx.clone(), stop_rx.clone());
        let (timeout, grace, behind) = (a.timeout, a.grace, a.behind);
        tasks.push(tokio::spawn(async move {
            let Ok(go) = go
                .wait_for(Option::is_some)
                .await
                .map(|g| g.unwrap_or_else(Instant::now))
            else {
                return;
            };
            let term = Terminal {
                sut: &sut,
                sh: &sh,
                i,
                room: &room,
                token: tokens[i as usize].clone(),
                joined,
                behind,
            };
            term.resume(go, timeout, grace, stop).await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let me = Probe::new(std::process::id());
    let before = sut.sample();
    let me_before = me.sample();
    let pb = bar(returning, "recovered");
    follow(&pb, &sh.done);
    let go = Instant::now();
    let _ = go_tx.send(Some(go));
    let deadline = go + a.timeout + Duration::from_secs(5);
    while sh.done.load(Ordering::Relaxed) < returning && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all_recovered_ms = go.elapsed().as_secs_f64() * 1000.0;
    let after = sut.sample();
    let me_after = me.sample();
    pb.finish();
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }

    let replayed = sh.replayed.load(Ordering::Relaxed);
    let server = match (&sut.probe, &before, &after) {
        (Some(p), Some(b), Some(af)) => Some(ProcessUse::between(p, b, af)),
        _ => None,
    };
    let r = Report {
        bench: "resume",
        target: sut.target.name(),
        shard: format!("{}/{}", sut.shard.index, sut.shard.count),
        room,
        terminals: n,
        joined: sh.joined.load(Ordering::Relaxed),
        behind: a.behind,
        published,
        publish_errors: pubs.errors.load(Ordering::Relaxed),
        server_noticed_ms,
        reconnected: sh.reconnected.load(Ordering::Relaxed),
        reconnect_failed: sh.reconnect_failed.load(Ordering::Relaxed),
        first_error: sh.first_error.take().or_else(|| pubs.first_error.take()),
        not_recovered_flag: sh.not_recovered_flag.load(Ordering::Relaxed),
        recovered: sh.recovered.load(Ordering::Relaxed),
        all_recovered_ms,
        recovery: sh.recovery.summary_ms(),
        replayed,
        missing: sh.missing.load(Ordering::Relaxed),
        duplicates: sh.duplicates.load(Ordering::Relaxed),
        replayed_per_second: per(replayed as f64, all_recovered_ms / 1000.0),
        server_cpu_per_replayed_us: server.map(|s| per(s.cpu_s() * 1e6, replayed as f64)),
        server,
        bench_process: usage(&me, me_before.as_ref(), me_after.as_ref()),
    };
    report::emit(sut.json, &r, &table(&r))?;
    if let Some(sut) = Arc::into_inner(sut) {
        sut.stop().await;
    }
    Ok(())
}

/// One returning terminal.
struct Terminal<'a> {
    sut: &'a Sut,
    sh: &'a Shared,
    i: u64,
    room: &'a str,
    token: Option<String>,
    /// Its position when it dropped.
    joined: Joined,
    behind: u64,
}

impl Terminal<'_> {
    /// Reconnect with `since`, read until every missed message is in (or the time is up),
    /// then hold the connection until `stop`.
    async fn resume(
        self,
        go: Instant,
        timeout: Duration,
        grace: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let sh = self.sh;
        let replay = self.sut.target.has_seq();
        let since = match (&self.joined.epoch, replay) {
            (Some(epoch), true) => Some(Since {
                epoch: epoch.clone(),
                seq: self.joined.seq,
            }),
            _ => None,
        };
        let deadline = tokio::time::Instant::from_std(go) + timeout;
        let opened = async {
            let mut s = Session::open(
                self.sut.dialer(self.i),
                self.i,
                self.room,
                self.token,
                since,
            )
            .await?;
            let (j, early) = s.until_ready(timeout).await?;
            anyhow::Ok((s, j, early))
        };
        let (mut s, j, early) = match tokio::time::timeout_at(deadline, opened).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                sh.first_error.set(&e);
                sh.reconnect_failed.fetch_add(1, Ordering::Relaxed);
                sh.missing.fetch_add(self.behind, Ordering::Relaxed);
                sh.done.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(_) => {
                sh.reconnect_failed.fetch_add(1, Ordering::Relaxed);
                sh.missing.fetch_add(self.behind, Ordering::Relaxed);
                sh.done.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        sh.reconnected.fetch_add(1, Ordering::Relaxed);
        if !j.recovered {
            sh.not_recovered_flag.fetch_add(1, Ordering::Relaxed);
        }
        // Missed seqs are joined.seq+1 ..= joined.seq+behind (the room was quiet otherwise).
        let base = self.joined.seq;
        let mut t = Tracker::new(self.behind);
        for d in &early {
            t.record(key_of(d, replay, base));
        }
        let give_up = if replay {
            deadline
        } else {
            tokio::time::Instant::now() + grace
        };
        while !t.complete() {
            match tokio::time::timeout_at(give_up, s.step()).await {
                Ok(Ok(true)) => {
                    for e in s.events() {
                        if let Event::Msg(d) = e {
                            t.record(key_of(d, replay, base));
                        }
                    }
                }
                Ok(_) => break,
                Err(_) => break,
            }
        }
        if t.complete() {
            sh.recovered.fetch_add(1, Ordering::Relaxed);
            sh.recovery.record(go.elapsed().as_micros() as u64);
        }
        sh.replayed.fetch_add(t.distinct, Ordering::Relaxed);
        sh.missing.fetch_add(t.missing(), Ordering::Relaxed);
        sh.duplicates.fetch_add(t.duplicates, Ordering::Relaxed);
        sh.done.fetch_add(1, Ordering::Relaxed);
        // Hold the connection until everyone is done, so that closes do not mix with the
        // replays of others.
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                step = s.step() => if !matches!(step, Ok(true)) { return },
            }
        }
        s.close().await;
    }
}

fn table(r: &Report) -> Table {
    let mut t = Table::new(format!(
        "bench resume: {} {} terminals, {} messages behind (shard {})",
        count(r.terminals),
        r.target,
        count(r.behind),
        r.shard
    ));
    t.row("joined", count(r.joined));
    t.row(
        "published while away / errors",
        format!("{} / {}", count(r.published), count(r.publish_errors)),
    );
    if let Some(ms) = r.server_noticed_ms {
        t.row("server saw all gone after", format!("{ms:.0} ms"));
    }
    t.row(
        "reconnected / failed",
        format!("{} / {}", count(r.reconnected), count(r.reconnect_failed)),
    );
    if let Some(e) = &r.first_error {
        t.row("first error", e.replace('|', "\\|"));
    }
    t.row("`recovered:false` answers", count(r.not_recovered_flag));
    t.row(
        "terminals with every missed message",
        format!("{} / {}", count(r.recovered), count(r.joined)),
    );
    t.row(
        "**time until all recovered**",
        format!("**{:.0} ms**", r.all_recovered_ms),
    );
    t.row(
        "per-terminal recovery ms p50 / p90 / p99 / p99.9 / max",
        r.recovery.cell(),
    );
    t.row(
        "replayed messages (replayed/s)",
        format!("{} ({:.0}/s)", count(r.replayed), r.replayed_per_second),
    );
    t.row("**lost**", format!("**{}**", count(r.missing)));
    t.row("duplicates", count(r.duplicates));
    if let Some(s) = &r.server {
        t.row(
            "server CPU during the reconnect",
            format!("{:.2} s, {}", s.cpu_s(), s.cores_cell()),
        );
    }
    if let Some(v) = r.server_cpu_per_replayed_us {
        t.row("server CPU per replayed message", format!("{v:.1} µs"));
    }
    if let Some(b) = &r.bench_process {
        t.row("bench (client) CPU", b.cores_cell());
    }
    t
}
