//! `livepush bench chaos`: a soak of the whole resume path. Terminals of the project's Rust
//! SDK (WebSocket, long-poll and SSE, a third each) follow a few rooms through a TCP proxy
//! that cuts their connections at random (after a random number of bytes either way, or
//! after a random time) while reliable messages are published through the HTTP API; in the
//! middle, the server (on its durable store, in a data directory of the run) is killed
//! (`kill -9`) or stopped (SIGTERM) and started again on the same port.
//!
//! Invariant checked, per terminal and room: every message whose publish was answered is
//! handed to the application exactly once and in seq order, unless the SDK said it is gone
//! (`recovered:false`, [`Event::Lost`]), which is counted apart. Loss, duplicates and
//! reordering are reported per transport and make the command fail.

mod check;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use livepush_client::{Client, ClientConfig, DisconnectReason, Event, Transport, TransportMode};
use livepush_server::auth::{Claims, TokenKeys, now_secs};
use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::check::{Figures, Ledger, RoomSeen};
use super::client::{FirstError, staggered};
use super::report::{self, Table, count};
use super::server::{SPAWN_KEY, SPAWN_SECRET, serve_args, start_serve, stop_child};
use super::targets::{Class, Target, publish_request};
use super::{duration, note};
use crate::proxy::{Cut, Cuts, Direction, Proxy};

#[derive(Debug, Args)]
pub struct ChaosBench {
    /// Terminals, a third each on WebSocket (the SDK's automatic mode, which may move a
    /// flapping terminal to long-polling for a while), long-polling and SSE.
    #[arg(long, default_value_t = 300)]
    terminals: u64,
    /// Rooms; terminal i follows rooms i and i+1 (mod the count).
    #[arg(long, default_value_t = 4)]
    rooms: u64,
    /// Reliable messages to publish (message n to room n mod --rooms).
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Connections to cut while they flow (the proxy keeps cutting until this many).
    #[arg(long, default_value_t = 1_000)]
    cuts: u64,
    /// Publishes per second; the cuts are spread over the same time.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Concurrent HTTP publishers.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Restart the server once half the messages are answered: `kill` (-9), `term`
    /// (SIGTERM, a graceful stop), or `none`.
    #[arg(long, value_enum, default_value_t = Restart::Kill)]
    restart: Restart,
    /// How long a SIGTERM'd server may take to exit before it is killed (and reported).
    #[arg(long, default_value = "15s", value_parser = duration)]
    stop_timeout: Duration,
    /// After the last answered publish, how long terminals may take to see everything.
    #[arg(long, default_value = "60s", value_parser = duration)]
    timeout: Duration,
    /// The server's data directory (default: a fresh one in the temp directory, removed at
    /// the end).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The livepush binary to run as the server (default: this one; use the release build).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Pin the server to these CPUs (`taskset -c LIST`).
    #[arg(long)]
    server_cpus: Option<String>,
    /// Extra argument for `livepush serve` (repeatable).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Print one JSON object instead of a markdown table.
    #[arg(long)]
    json: bool,
    /// Test the check: once half the messages are answered, the proxy silently throws away
    /// what the server sends. The run must then report loss and fail.
    #[arg(long, hide = true)]
    fault_discard: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Restart {
    Kill,
    Term,
    None,
}

/// The three kinds of terminal, by the transport they are configured with.
const KINDS: [(&str, TransportMode); 3] = [
    ("websocket", TransportMode::Auto),
    ("longpoll", TransportMode::LongPoll),
    ("sse", TransportMode::Sse),
];

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    terminals: u64,
    rooms: u64,
    messages: u64,
    answered: u64,
    /// Publishes that failed and were tried again (during the restart, mostly).
    publish_retries: u64,
    first_publish_error: Option<String>,
    /// Publishes given up (never answered) when the run's time was up.
    publish_given_up: u64,
    /// Seqs terminals received that no answered publish had: a publish whose answer was
    /// lost (the server died after storing it) and that was then tried again.
    unanswered_seqs: u64,
    cuts_target: u64,
    cuts: Cuts,
    cuts_total: u64,
    /// Cuts done while publishing went on.
    cuts_while_publishing: u64,
    proxy_connections: u64,
    restart: Option<Restarted>,
    seconds: f64,
    per_transport: Vec<Figures>,
    total: Figures,
}

/// What a restart looked like.
#[derive(Debug, Clone, Serialize)]
struct Restarted {
    mode: Restart,
    /// After how many answered publishes.
    at_answered: u64,
    /// From the signal to the old process's exit.
    exit_ms: f64,
    /// How it exited (`signal 9`, `exit 0`, …).
    exit: String,
    /// SIGTERM: it did not exit within --stop-timeout and was killed.
    killed_after_timeout: bool,
    /// From the signal until the new process listened.
    down_ms: f64,
}

/// What one terminal saw, and how its connection fared.
#[derive(Debug, Default)]
struct Seen {
    rooms: HashMap<String, RoomSeen>,
    disconnects: u64,
    watchdog: u64,
    sessions: [u64; 3],
}

impl Seen {
    fn record(&mut self, ev: Event) {
        match ev {
            Event::Joined {
                room,
                epoch,
                seq,
                recovered,
                ..
            } => self
                .rooms
                .entry(room)
                .or_default()
                .joined(&epoch, seq, recovered),
            Event::Message(m) => self
                .rooms
                .entry(m.room)
                .or_default()
                .message(&m.epoch, m.seq),
            Event::Lost { room, first, last } => {
                self.rooms.entry(room).or_default().lost(first, last)
            }
            Event::Disconnected { reason, .. } => {
                self.disconnects += 1;
                if reason == DisconnectReason::HeartbeatTimeout {
                    self.watchdog += 1;
                }
            }
            Event::Connected { transport, .. } => {
                let i = match transport {
                    Transport::Ws => 0,
                    Transport::Longpoll => 1,
                    Transport::Sse => 2,
                };
                self.sessions[i] += 1;
            }
            _ => {}
        }
    }
}

/// A terminal: its SDK client, and the task that records its events.
struct Terminal {
    kind: usize,
    rooms: Vec<String>,
    client: Client,
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl Terminal {
    /// Whether it has received the newest answered message of each of its rooms.
    fn caught_up(&self, ledger: &Ledger) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        self.rooms.iter().all(|r| match ledger.last(r) {
            None => true,
            Some((epoch, seq)) => seen
                .rooms
                .get(r)
                .and_then(RoomSeen::last)
                .is_some_and(|(e, s)| e == epoch && s >= seq),
        })
    }

    fn joined_all(&self) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        self.rooms
            .iter()
            .all(|r| seen.rooms.get(r).is_some_and(|s| !s.base.is_empty()))
    }
}

/// The server process, restartable on the same port and data directory.
struct Server {
    bin: PathBuf,
    cpus: Option<String>,
    args: Vec<String>,
    child: Child,
    addr: SocketAddr,
    url: String,
}

impl Server {
    async fn start(a: &ChaosBench, data_dir: &Path) -> anyhow::Result<Server> {
        let bin = match &a.server_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe().context("locating this binary")?,
        };
        let mut args = serve_args("127.0.0.1:0", a.messages as usize);
        args.extend(
            [
                "--data-dir",
                &data_dir.display().to_string(),
                "--wake-listen",
                "off",
                // A terminal moved to long-polling for flapping comes back to WebSocket
                // within the run.
                "--flap-retry-ws-after",
                "3s",
                // Traffic every second on a quiet path, so that the terminals' 3 s watchdog
                // fires only on the proxy's stalls.
                "--heartbeat-ms",
                "1000",
            ]
            .map(str::to_owned),
        );
        args.extend(a.server_args.iter().cloned());
        let (child, url, log) = start_serve(&bin, a.server_cpus.as_deref(), &args, "chaos").await?;
        let addr: SocketAddr = url
            .trim_start_matches("http://")
            .parse()
            .with_context(|| format!("the server's address {url}"))?;
        note(format!(
            "spawned {} (pid {}) on {url}, data in {}; log in {}",
            bin.display(),
            child.id().unwrap_or(0),
            data_dir.display(),
            log.display()
        ));
        // Restarts listen where the first one did, so that the proxy and the publishers
        // find it again.
        let listen = args
            .iter()
            .position(|a| a == "--listen")
            .map_or(2, |i| i + 1);
        args[listen] = addr.to_string();
        Ok(Server {
            bin,
            cpus: a.server_cpus.clone(),
            args,
            child,
            addr,
            url,
        })
    }

    /// Stop the process as `mode` says, then start it again on the same port and data.
    async fn restart(
        &mut self,
        mode: Restart,
        stop_timeout: Duration,
    ) -> anyhow::Result<Restarted> {
        let t0 = Instant::now();
        let mut killed_after_timeout = false;
        let status = match mode {
            Restart::Kill | Restart::None => {
                self.child.start_kill()?;
                self.child.wait().await?
            }
            Restart::Term => {
                let pid = self.child.id().context("server already gone")?;
                Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await?;
                match tokio::time::timeout(stop_timeout, self.child.wait()).await {
                    Ok(s) => s?,
                    Err(_) => {
                        killed_after_timeout = true;
                        self.child.start_kill()?;
                        self.child.wait().await?
                    }
                }
            }
        };
        let exit_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let exit = match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(s)) => format!("signal {s}"),
            _ => "unknown".to_owned(),
        };
        let (child, url, log) = start_serve(
            &self.bin,
            self.cpus.as_deref(),
            &self.args,
            "chaos-restarted",
        )
        .await?;
        if url != self.url {
            bail!("the restarted server listens on {url}, not {}", self.url);
        }
        note(format!(
            "restarted (pid {}); log in {}",
            child.id().unwrap_or(0),
            log.display()
        ));
        self.child = child;
        Ok(Restarted {
            mode,
            at_answered: 0,
            exit_ms,
            exit,
            killed_after_timeout,
            down_ms: t0.elapsed().as_secs_f64() * 1000.0,
        })
    }
}

/// Figures the publishers add to.
#[derive(Debug, Default)]
struct Publishing {
    next: AtomicU64,
    answered: AtomicU64,
    retries: AtomicU64,
    given_up: AtomicU64,
    first_error: FirstError,
    ledger: Mutex<Ledger>,
}

pub async fn run(a: ChaosBench) -> anyhow::Result<()> {
    if a.terminals == 0 || a.rooms == 0 || a.rate <= 0.0 {
        bail!("--terminals, --rooms and --rate must be above 0");
    }
    let run_id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let (data_dir, remove_data) = match &a.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("livepush-chaos-{}-{run_id}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {data_dir:?}"))?;
    let result = soak(&a, &run_id, &data_dir).await;
    if remove_data {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    let r = result?;
    report::emit(a.json, &r, &table(&r))?;
    let bad = r.total.violations();
    if bad > 0 || r.answered < r.messages {
        bail!(
            "chaos: {} lost, {} duplicated, {} reordered, {} terminals unfinished, {} of {} messages answered",
            r.total.lost,
            r.total.duplicates,
            r.total.reordered,
            r.total.unfinished,
            r.answered,
            r.messages
        );
    }
    Ok(())
}

async fn soak(a: &ChaosBench, run_id: &str, data_dir: &Path) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut server = Server::start(a, data_dir).await?;
    let proxy = Proxy::start(server.addr).await?;
    let rooms: Vec<String> = (0..a.rooms)
        .map(|r| format!("chaos-{run_id}-{r}"))
        .collect();
    note(format!(
        "livepush bench chaos: {} terminals in {} rooms through {}, {} messages at {}/s, {} cuts, restart: {:?}",
        a.terminals,
        a.rooms,
        proxy.url(),
        a.messages,
        a.rate,
        a.cuts,
        a.restart
    ));

    // 1. The terminals join, through the proxy.
    let keys = TokenKeys::new(SPAWN_SECRET);
    let proxy_url = proxy.url();
    let pending: Vec<JoinHandle<anyhow::Result<Terminal>>> = {
        let rooms = Arc::new(rooms.clone());
        let run_id = run_id.to_owned();
        staggered(a.terminals, 64, move |i, permit| {
            let rooms = rooms.clone();
            let (server, sub) = (proxy_url.clone(), format!("chaos-{run_id}-{i}"));
            let keys = keys.clone();
            async move {
                let t = terminal(i, &rooms, server, &sub, &keys).await;
                // Hold the permit until it joined, so that connects come in waves.
                if let Ok(t) = &t {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while !t.joined_all() && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                drop(permit);
                t
            }
        })
        .await
    };
    let mut terminals = Vec::with_capacity(pending.len());
    for p in pending {
        terminals.push(p.await??);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !terminals.iter().all(Terminal::joined_all) {
        if Instant::now() > deadline {
            bail!("not every terminal joined its rooms within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    note(format!(
        "{} terminals joined after {:.1} s; publishing",
        terminals.len(),
        started.elapsed().as_secs_f64()
    ));

    // 2. Publish, cut, restart.
    let soak_started = Instant::now();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let base = format!("http://{}", server.addr);
    let pubs = Arc::new(Publishing::default());
    let give_up_at = soak_started
        + Duration::from_secs_f64(a.messages as f64 / a.rate)
        + a.timeout
        + a.stop_timeout;
    let publishers: Vec<JoinHandle<()>> = (0..a.publishers.max(1))
        .map(|_| {
            let (pubs, http, base, rooms) =
                (pubs.clone(), http.clone(), base.clone(), rooms.clone());
            let (total, rate) = (a.messages, a.rate);
            tokio::spawn(async move {
                publisher(
                    &pubs,
                    &http,
                    &base,
                    &rooms,
                    total,
                    rate,
                    soak_started,
                    give_up_at,
                )
                .await
            })
        })
        .collect();
    let cut_rate = a.cuts as f64 / (a.messages as f64 / a.rate).max(1.0);
    let (stop_tx, stop_rx) = watch::channel(false);
    let cutter = tokio::spawn(cutter(proxy.clone(), a.cuts, cut_rate, stop_rx));

    let mut restarted = None;
    let half = a.messages / 2;
    if a.restart != Restart::None || a.fault_discard {
        while pubs.answered.load(Ordering::Relaxed) < half && Instant::now() < give_up_at {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let at = pubs.answered.load(Ordering::Relaxed);
        if a.fault_discard {
            note("fault: the proxy now discards what the server sends");
            proxy.discard_to_client(true);
        }
        if a.restart != Restart::None {
            note(format!(
                "restart ({:?}) after {at} answered publishes",
                a.restart
            ));
            let mut r = server.restart(a.restart, a.stop_timeout).await?;
            r.at_answered = at;
            note(format!(
                "the server exited after {:.0} ms ({}), listened again after {:.0} ms",
                r.exit_ms, r.exit, r.down_ms
            ));
            restarted = Some(r);
        }
    }
    for p in publishers {
        p.await?;
    }
    let cuts_while_publishing = proxy.cuts().total();
    note(format!(
        "published: {} answered, {} retries, {} cuts so far; waiting for the terminals",
        pubs.answered.load(Ordering::Relaxed),
        pubs.retries.load(Ordering::Relaxed),
        cuts_while_publishing
    ));

    // 3. Until every terminal has the last message of each room (or the time is up), and
    // the cuts are done.
    let deadline = Instant::now() + a.timeout;
    loop {
        let done = {
            let ledger = pubs.ledger.lock().unwrap_or_else(|e| e.into_inner());
            terminals.iter().all(|t| t.caught_up(&ledger))
        };
        if (done && proxy.cuts().total() >= a.cuts) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    let _ = cutter.await;
    let seconds = soak_started.elapsed().as_secs_f64();

    // 4. Check.
    let ledger = std::mem::take(&mut *pubs.ledger.lock().unwrap_or_else(|e| e.into_inner()));
    let mut per_kind: Vec<Figures> = KINDS
        .iter()
        .map(|(name, _)| Figures {
            kind: (*name).to_owned(),
            ..Figures::default()
        })
        .collect();
    let mut unanswered = 0;
    for t in &terminals {
        let f = &mut per_kind[t.kind];
        f.terminals += 1;
        if !t.caught_up(&ledger) {
            f.unfinished += 1;
        }
        let seen = t.seen.lock().unwrap_or_else(|e| e.into_inner());
        f.disconnects += seen.disconnects;
        f.watchdog += seen.watchdog;
        f.sessions_ws += seen.sessions[0];
        f.sessions_longpoll += seen.sessions[1];
        f.sessions_sse += seen.sessions[2];
        for r in &t.rooms {
            let none = RoomSeen::default();
            let rs = seen.rooms.get(r).unwrap_or(&none);
            unanswered += rs.check(ledger.rooms.get(r), f);
        }
    }
    let mut total = Figures {
        kind: "all".to_owned(),
        ..Figures::default()
    };
    for f in &per_kind {
        total.add(f);
    }
    futures_util::future::join_all(terminals.into_iter().map(|t| async move {
        let _ = tokio::time::timeout(Duration::from_secs(3), t.client.close()).await;
        t.task.abort();
    }))
    .await;
    let cuts = proxy.cuts();
    let r = Report {
        bench: "chaos",
        terminals: a.terminals,
        rooms: a.rooms,
        messages: a.messages,
        answered: pubs.answered.load(Ordering::Relaxed),
        publish_retries: pubs.retries.load(Ordering::Relaxed),
        first_publish_error: pubs.first_error.take(),
        publish_given_up: pubs.given_up.load(Ordering::Relaxed),
        unanswered_seqs: unanswered,
        cuts_target: a.cuts,
        cuts,
        cuts_total: cuts.total(),
        cuts_while_publishing,
        proxy_connections: proxy.accepted(),
        restart: restarted,
        seconds,
        per_transport: per_kind,
        total,
    };
    stop_child(server.child).await;
    Ok(r)
}

/// Terminal `i`: an SDK client through the proxy at `server`, following two rooms.
async fn terminal(
    i: u64,
    rooms: &[String],
    server: String,
    sub: &str,
    keys: &TokenKeys,
) -> anyhow::Result<Terminal> {
    let n = rooms.len() as u64;
    let mut mine = vec![rooms[(i % n) as usize].clone()];
    if n > 1 {
        mine.push(rooms[((i + 1) % n) as usize].clone());
    }
    let kind = (i % KINDS.len() as u64) as usize;
    let token = keys.mint(&Claims {
        sub: sub.to_owned(),
        exp: now_secs() + 6 * 3600,
        rooms: mine.clone(),
        send: false,
    })?;
    let (client, mut events) = Client::connect(ClientConfig {
        server,
        token: Some(token),
        transport: KINDS[kind].1,
        connect_timeout: Duration::from_secs(3),
        idle_timeout: Some(Duration::from_secs(3)),
        ping_timeout: Duration::from_secs(2),
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_secs(1),
        poll_wait: Duration::from_secs(5),
        auth_failure_limit: None,
        ..ClientConfig::default()
    })?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let task = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                seen.lock().unwrap_or_else(|e| e.into_inner()).record(ev);
            }
        })
    };
    for r in &mine {
        client.join(r, None).await?;
    }
    Ok(Terminal {
        kind,
        rooms: mine,
        client,
        seen,
        task,
    })
}

/// Publish messages `next..total` (shared with the other publishers), message n due at
/// `start + n / rate`, each tried until answered or `give_up_at`.
#[allow(clippy::too_many_arguments)]
async fn publisher(
    pubs: &Publishing,
    http: &reqwest::Client,
    base: &str,
    rooms: &[String],
    total: u64,
    rate: f64,
    start: Instant,
    give_up_at: Instant,
) {
    loop {
        let n = pubs.next.fetch_add(1, Ordering::Relaxed);
        if n >= total {
            return;
        }
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let room = &rooms[(n % rooms.len() as u64) as usize];
        let (path, body) = publish_request(
            Target::Livepush,
            room,
            Class::Reliable,
            &format!(r#"{{"n":{n}}}"#),
        );
        loop {
            match publish_once(http, &format!("{base}{path}"), body.clone()).await {
                Ok((epoch, seq)) => {
                    pubs.ledger
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .answer(room, &epoch, seq);
                    pubs.answered.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    pubs.first_error.set(&e);
                    if Instant::now() > give_up_at {
                        pubs.given_up.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    pubs.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// One publish; the answer's epoch and seq.
async fn publish_once(
    http: &reqwest::Client,
    url: &str,
    body: String,
) -> anyhow::Result<(String, u64)> {
    let resp = http
        .post(url)
        .bearer_auth(SPAWN_KEY)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        bail!("publish answered {status}: {text}");
    }
    let v: serde_json::Value = resp.json().await?;
    match (v["epoch"].as_str(), v["seq"].as_u64()) {
        (Some(e), Some(s)) => Ok((e.to_owned(), s)),
        _ => bail!("publish answer without epoch and seq: {v}"),
    }
}

/// Arm cuts at `rate` per second until `target` are done and `stop` says so.
async fn cutter(proxy: Proxy, target: u64, rate: f64, mut stop: watch::Receiver<bool>) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        // Armed cuts that have not fired yet count against what is due; at most a few per
        // tick.
        let done = proxy.cuts().total() + proxy.armed();
        let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(target);
        for _ in 0..due.saturating_sub(done).min(4) {
            if !proxy.cut_one(random_cut()) {
                break;
            }
        }
    }
}

/// A cut at random: after up to 16 KiB to the client (mid-frame, mid-answer, 40 %), up to
/// 1 KiB to the server (mid-request, 20 %), up to 1 s (35 %), or a stall: a dead path that
/// only the client's watchdog notices (5 %; cut after 20 s).
fn random_cut() -> Cut {
    use rand::Rng;
    let mut rng = rand::rng();
    match rng.random_range(0..20) {
        0..8 => Cut::AfterBytes(Direction::ToClient, rng.random_range(0..16 * 1024)),
        8..12 => Cut::AfterBytes(Direction::ToServer, rng.random_range(0..1024)),
        12..19 => Cut::After(Duration::from_millis(rng.random_range(0..1000))),
        _ => Cut::Stall(STALL_CAP),
    }
}

/// How long a stalled connection is kept before the proxy cuts it (far above every watchdog
/// of the terminals: theirs must notice first).
const STALL_CAP: Duration = Duration::from_secs(20);

fn table(r: &Report) -> Table {
    let mut t = Table::new(format!(
        "bench chaos: {} terminals, {} rooms, {} messages, {} cuts, restart {}",
        count(r.terminals),
        r.rooms,
        count(r.messages),
        count(r.cuts_total),
        r.restart
            .as_ref()
            .map_or("none".to_owned(), |x| format!("{:?}", x.mode)
                .to_lowercase())
    ));
    t.row(
        "answered / retries / given up",
        format!(
            "{} / {} / {}",
            count(r.answered),
            count(r.publish_retries),
            count(r.publish_given_up)
        ),
    );
    t.row(
        "cuts: to client / to server / timed / stalled / total (while publishing)",
        format!(
            "{} / {} / {} / {} / {} ({})",
            count(r.cuts.after_bytes_to_client),
            count(r.cuts.after_bytes_to_server),
            count(r.cuts.after_time),
            count(r.cuts.stalled),
            count(r.cuts_total),
            count(r.cuts_while_publishing)
        ),
    );
    t.row("proxied connections", count(r.proxy_connections));
    if let Some(x) = &r.restart {
        t.row(
            "restart: exit / down",
            format!(
                "{} after {:.0} ms{} / {:.0} ms",
                x.exit,
                x.exit_ms,
                if x.killed_after_timeout {
                    " (killed: no exit in time)"
                } else {
                    ""
                },
                x.down_ms
            ),
        );
    }
    for f in r.per_transport.iter().chain(std::iter::once(&r.total)) {
        t.row(
            format!(
                "**{}** ({} terminals): lost / dup / reordered / unfinished",
                f.kind, f.terminals
            ),
            format!(
                "**{} / {} / {} / {}**",
                count(f.lost),
                count(f.duplicates),
                count(f.reordered),
                count(f.unfinished)
            ),
        );
        t.row(
            format!(
                "{}: delivered / expected, reported lost, recovered:false",
                f.kind
            ),
            format!(
                "{} / {}, {}, {}",
                count(f.delivered),
                count(f.expected),
                count(f.reported_lost),
                count(f.not_recovered)
            ),
        );
        t.row(
            format!(
                "{}: disconnects (by the watchdog), sessions ws / longpoll / sse",
                f.kind
            ),
            format!(
                "{} ({}), {} / {} / {}",
                count(f.disconnects),
                count(f.watchdog),
                count(f.sessions_ws),
                count(f.sessions_longpoll),
                count(f.sessions_sse)
            ),
        );
    }
    if let Some(e) = &r.first_publish_error {
        t.row("first publish error", e.replace('|', "\\|"));
    }
    t.row("unanswered seqs received", count(r.unanswered_seqs));
    t.row("soak time", format!("{:.1} s", r.seconds));
    t
}
