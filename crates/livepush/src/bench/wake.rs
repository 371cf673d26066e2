//! `livepush bench wake`: N idle terminals that hold no connection, only a UDP socket each
//! ([`livepush_client::WakeAgent`]); one inbox message is posted to each through the HTTP
//! API; how long until every one was woken, connected, received and acknowledged its message.
//!
//! Phases:
//! 1. start (or target) a server;
//! 2. register: each terminal connects once (to learn its wake key), disconnects, and keeps
//!    only its UDP socket (bound to 127.0.0.2, 127.0.0.3, … on a loopback server), sending a
//!    keepalive; at most `--concurrency` first connects are in flight;
//! 3. idle: wait until the server has recorded every keepalive and holds no terminal
//!    connection, then count the server's TCP connections (ESTABLISHED sockets on its port
//!    in /proc/net/tcp and tcp6, and the `livepush_connections_open` metric): must be 0;
//! 4. post one inbox message to each terminal (`POST /v1/terminals/{id}/messages`);
//! 5. deliver: wait until every terminal has acknowledged its message; the latency of each
//!    is from just before its post was sent to the agent's acknowledgement.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use futures_util::StreamExt;
use livepush_client::{
    AgentEvent, AgentState, ClientConfig, TransportMode, WakeAgent, WakeAgentConfig,
};
use livepush_server::auth::{Claims, TokenKeys, now_secs};
use serde_json::json;
use tokio::process::Child;
use tokio::sync::Semaphore;
use tokio::time::Instant;

#[derive(Debug, Args)]
pub struct WakeBench {
    /// Idle terminals to register and wake.
    #[arg(long, default_value_t = 1000)]
    terminals: u64,
    /// Base URL of the server under test. Without it, `livepush serve --data-dir :memory:`
    /// is started on a free loopback port and stopped at the end.
    #[arg(long)]
    server: Option<String>,
    /// The server's API key (with --server).
    #[arg(long, env = "LIVEPUSH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The server's token secret, to mint terminal tokens (with --server).
    #[arg(long, env = "LIVEPUSH_TOKEN_SECRET", hide_env_values = true)]
    token_secret: Option<String>,
    /// The server's UDP wake listener (default: the server's host and port, on UDP).
    #[arg(long)]
    wake_addr: Option<SocketAddr>,
    /// The livepush binary to start (default: this one; use the release build).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Extra argument for the started `livepush serve` (repeatable), e.g.
    /// `--server-arg=--wake-retry-first=500ms`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Loopback source addresses to spread the UDP sockets over: 127.0.0.2, 127.0.0.3, …
    /// (only for a loopback server). 0: any address.
    #[arg(long, default_value_t = 16)]
    source_ips: u32,
    /// First connects (registration) in flight at once.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Posts in flight at once.
    #[arg(long, default_value_t = 64)]
    post_concurrency: usize,
    /// How long each woken terminal stays connected after taking its inbox.
    #[arg(long, default_value = "0s", value_parser = duration)]
    linger: Duration,
    /// Transport of the terminals' sessions: ws, longpoll, auto.
    #[arg(long, default_value = "ws", value_parser = transport_mode)]
    transport: TransportMode,
    /// Give up on a phase after this long.
    #[arg(long, default_value = "120s", value_parser = duration)]
    timeout: Duration,
    /// Print one JSON object instead of a markdown table.
    #[arg(long)]
    json: bool,
}

fn duration(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 2m)"))
}

fn transport_mode(s: &str) -> Result<TransportMode, String> {
    match s {
        "auto" => Ok(TransportMode::Auto),
        "ws" | "websocket" => Ok(TransportMode::WebSocket),
        "longpoll" | "long-polling" => Ok(TransportMode::LongPoll),
        other => Err(format!("unknown transport {other:?} (ws, longpoll, auto)")),
    }
}

const SPAWN_KEY: &str = "bench-wake-api-key-0123456789";
const SPAWN_SECRET: &str = "bench-wake-token-secret-0123456789";

/// What every terminal's driver task records.
#[derive(Debug)]
struct Shared {
    start: Instant,
    /// µs since `start` + 1 (0: not yet), per terminal.
    posted: Vec<AtomicU64>,
    delivered: Vec<AtomicU64>,
    registered: AtomicU64,
    delivered_count: AtomicU64,
    errors: AtomicU64,
}

impl Shared {
    fn stamp(&self) -> u64 {
        self.start.elapsed().as_micros() as u64 + 1
    }
}

/// The server's metrics that the bench reads.
#[derive(Debug, Default, Clone, Copy)]
struct ServerFigures {
    connections_open: u64,
    keepalives_accepted: u64,
    wakes_sent: u64,
    wakes_not_sent: u64,
}

fn metric_sum(text: &str, name: &str, label: Option<&str>) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| label.is_none_or(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

struct Target {
    base: String,
    port: u16,
    wake_addr: SocketAddr,
    api_key: String,
    keys: TokenKeys,
    child: Option<Child>,
    /// Whether /proc/net/tcp shows the server's sockets (a local server).
    local: bool,
}

impl Target {
    async fn figures(&self, http: &reqwest::Client) -> anyhow::Result<ServerFigures> {
        let text = http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(&self.api_key)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(ServerFigures {
            connections_open: metric_sum(&text, "livepush_connections_open", None),
            keepalives_accepted: metric_sum(
                &text,
                "livepush_wake_keepalives_total",
                Some("reason=\"accepted\""),
            ),
            wakes_sent: metric_sum(
                &text,
                "livepush_wake_datagrams_total",
                Some("reason=\"sent\""),
            ),
            wakes_not_sent: metric_sum(&text, "livepush_wake_datagrams_total", None)
                .saturating_sub(metric_sum(
                    &text,
                    "livepush_wake_datagrams_total",
                    Some("reason=\"sent\""),
                )),
        })
    }

    async fn stop(mut self) {
        if let Some(child) = self.child.take() {
            super::server::stop_child(child).await;
        }
    }
}

/// ESTABLISHED TCP sockets whose local port is `port` (the server's ends).
fn established_on(port: u16) -> usize {
    let mut n = 0;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[3] != "01" {
                continue;
            }
            let local = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local == Some(port) {
                n += 1;
            }
        }
    }
    n
}

async fn start_target(a: &WakeBench) -> anyhow::Result<Target> {
    let (base, child, api_key, secret) = match &a.server {
        Some(url) => (
            url.trim_end_matches('/').to_owned(),
            None,
            a.api_key
                .clone()
                .context("--server needs --api-key (or LIVEPUSH_API_KEY)")?,
            a.token_secret
                .clone()
                .context("--server needs --token-secret (or LIVEPUSH_TOKEN_SECRET)")?,
        ),
        None => {
            let (child, url) = spawn(a).await?;
            (
                url,
                Some(child),
                SPAWN_KEY.to_owned(),
                SPAWN_SECRET.to_owned(),
            )
        }
    };
    let url = url::Url::parse(&base).with_context(|| format!("server URL {base}"))?;
    let host = url
        .host_str()
        .context("the server URL has no host")?
        .trim_matches(['[', ']'])
        .to_owned();
    let port = url.port_or_known_default().unwrap_or(80);
    let addr: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))?;
    let local = addr.ip().is_loopback() || child.is_some();
    Ok(Target {
        base,
        port,
        wake_addr: a.wake_addr.unwrap_or(addr),
        api_key,
        keys: TokenKeys::new(&secret),
        child,
        local,
    })
}

/// Start `livepush serve` on a free loopback port and wait for its "listening on" line.
async fn spawn(a: &WakeBench) -> anyhow::Result<(Child, String)> {
    let bin = match &a.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("locating this binary")?,
    };
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        ":memory:",
        "--api-key",
        SPAWN_KEY,
        "--token-secret",
        SPAWN_SECRET,
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(a.server_args.iter().cloned());
    let (child, url, log) = super::server::start_serve(&bin, None, &args, "wake-server").await?;
    eprintln!(
        "started {} serve (pid {}) on {url}; log in {}",
        bin.display(),
        child.id().unwrap_or(0),
        log.display()
    );
    Ok((child, url))
}

/// Wait until `check` holds, polling every 100 ms, for at most `limit`.
async fn wait_for<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn percentiles(mut v: Vec<Duration>) -> [f64; 5] {
    v.sort();
    [
        super::percentile_ms(&v, 50.0),
        super::percentile_ms(&v, 90.0),
        super::percentile_ms(&v, 99.0),
        super::percentile_ms(&v, 99.9),
        v.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
    ]
}

pub async fn run(a: WakeBench) -> anyhow::Result<()> {
    if a.terminals == 0 {
        bail!("--terminals must be at least 1");
    }
    let nofile = super::raise_nofile();
    // One UDP socket per terminal, plus the TCP connections of the sessions in flight.
    let need = a.terminals + a.concurrency as u64 + 256;
    if nofile < need {
        eprintln!(
            "warning: the open-files limit is {nofile}; {} terminals need about {need} \
             (plus one per concurrent wake)",
            a.terminals
        );
    }
    let target = start_target(&a).await?;
    let result = bench(&a, &target).await;
    target.stop().await;
    result
}

async fn bench(a: &WakeBench, target: &Target) -> anyhow::Result<()> {
    let n = a.terminals as usize;
    let run_id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    // No idle connections kept: the idle count must only see terminal connections.
    let probe_http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let post_http = reqwest::Client::builder()
        .pool_max_idle_per_host(a.post_concurrency)
        .tcp_nodelay(true)
        .build()?;
    let before = target
        .figures(&probe_http)
        .await
        .context("reading /metrics")?;
    let spread = a.source_ips > 0 && target.wake_addr.ip().is_loopback();
    let shared = Arc::new(Shared {
        start: Instant::now(),
        posted: (0..n).map(|_| AtomicU64::new(0)).collect(),
        delivered: (0..n).map(|_| AtomicU64::new(0)).collect(),
        registered: AtomicU64::new(0),
        delivered_count: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let ids: Vec<String> = (0..n).map(|i| format!("wake-{run_id}-{i}")).collect();

    // Register.
    let reg_started = Instant::now();
    let pb = super::bar(n as u64, "register");
    let permits = Arc::new(Semaphore::new(a.concurrency.max(1)));
    let mut agents = Vec::with_capacity(n);
    for (i, id) in ids.iter().enumerate() {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .context("semaphore closed")?;
        let token = target.keys.mint(&Claims {
            sub: id.clone(),
            exp: now_secs() + 6 * 3600,
            rooms: vec![],
            send: false,
        })?;
        let udp_bind = spread.then(|| {
            let k = (i as u32 % a.source_ips) + 2;
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(127, 0, (k >> 8) as u8, (k & 0xff) as u8)),
                0,
            )
        });
        let (agent, mut events) = WakeAgent::start(WakeAgentConfig {
            client: ClientConfig {
                server: target.base.clone(),
                token: Some(token),
                transport: a.transport,
                backoff_base: Duration::from_millis(100),
                backoff_max: Duration::from_secs(2),
                event_capacity: 16,
                ..ClientConfig::default()
            },
            linger: a.linger,
            safety_net: None,
            wake_addr: Some(target.wake_addr),
            udp_bind,
            connect_timeout: a.timeout,
            event_capacity: 16,
            ..WakeAgentConfig::default()
        })
        .await
        .with_context(|| format!("starting terminal {i} (UDP bind {udp_bind:?})"))?;
        let sh = shared.clone();
        let pb2 = pb.clone();
        tokio::spawn(async move {
            let mut permit = Some(permit);
            while let Some(e) = events.recv().await {
                match e {
                    // The first idle: registered (frees a slot for the next first connect).
                    AgentEvent::State(AgentState::Idle) if permit.take().is_some() => {
                        sh.registered.fetch_add(1, Ordering::Relaxed);
                        pb2.inc(1);
                    }
                    // The first ack: delivered.
                    AgentEvent::Acked { seq }
                        if seq >= 1
                            && sh.delivered[i]
                                .compare_exchange(
                                    0,
                                    sh.stamp(),
                                    Ordering::Relaxed,
                                    Ordering::Relaxed,
                                )
                                .is_ok() =>
                    {
                        sh.delivered_count.fetch_add(1, Ordering::Relaxed);
                    }
                    AgentEvent::Error { .. } => {
                        sh.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        });
        agents.push(agent);
    }
    let all_registered = wait_for(a.timeout, || async {
        shared.registered.load(Ordering::Relaxed) >= n as u64
    })
    .await;
    pb.finish_and_clear();
    let registered = shared.registered.load(Ordering::Relaxed);
    if !all_registered {
        bail!(
            "only {registered} of {n} terminals registered within {:?}",
            a.timeout
        );
    }
    let reg_time = reg_started.elapsed();
    eprintln!(
        "registered {n} terminals in {:.1} s ({:.0}/s)",
        reg_time.as_secs_f64(),
        n as f64 / reg_time.as_secs_f64()
    );

    // Idle: every keepalive recorded, no terminal connection left.
    let mut idle_figures = ServerFigures::default();
    let deadline = Instant::now() + a.timeout;
    let settled = loop {
        if let Ok(f) = target.figures(&probe_http).await {
            idle_figures = f;
            if f.keepalives_accepted >= before.keepalives_accepted + n as u64
                && f.connections_open == 0
            {
                break true;
            }
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if !settled {
        eprintln!(
            "warning: not settled within {:?}: {} of {n} keepalives recorded, {} connections open",
            a.timeout,
            idle_figures
                .keepalives_accepted
                .saturating_sub(before.keepalives_accepted),
            idle_figures.connections_open
        );
    }
    // The bench's own metrics request may still be closing: give it a moment.
    let idle_tcp = if target.local {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut last = established_on(target.port);
        while last > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            last = established_on(target.port);
        }
        Some(last)
    } else {
        None
    };
    eprintln!(
        "idle: server TCP connections {} (/proc), livepush_connections_open {}",
        idle_tcp.map_or("n/a (remote server)".to_owned(), |t| t.to_string()),
        idle_figures.connections_open
    );

    // Post.
    let post_started = Instant::now();
    let pb = super::bar(n as u64, "post");
    let answers: Vec<anyhow::Result<String>> = futures_util::stream::iter(0..n)
        .map(|i| {
            let (http, sh, pb) = (&post_http, &shared, &pb);
            let url = format!("{}/v1/terminals/{}/messages", target.base, ids[i]);
            async move {
                sh.posted[i].store(sh.stamp(), Ordering::Relaxed);
                let r = http
                    .post(url)
                    .bearer_auth(&target.api_key)
                    .json(&json!({"type":"bench","data":{"i":i}}))
                    .send()
                    .await?
                    .error_for_status()?;
                let v: serde_json::Value = r.json().await?;
                pb.inc(1);
                Ok(v["wake"].as_str().unwrap_or("?").to_owned())
            }
        })
        .buffer_unordered(a.post_concurrency.max(1))
        .collect()
        .await;
    pb.finish_and_clear();
    let post_time = post_started.elapsed();
    let mut wake_sent = 0u64;
    let mut wake_none = 0u64;
    let mut post_errors = 0u64;
    for r in &answers {
        match r.as_deref() {
            Ok("sent") => wake_sent += 1,
            Ok(_) => wake_none += 1,
            Err(e) => {
                post_errors += 1;
                if post_errors == 1 {
                    eprintln!("post failed: {e:#}");
                }
            }
        }
    }

    // Deliver.
    let pb = super::bar(n as u64, "deliver");
    let expected = n as u64 - post_errors;
    let all_delivered = {
        let (sh, pb) = (&shared, &pb);
        wait_for(a.timeout, || async move {
            let d = sh.delivered_count.load(Ordering::Relaxed);
            pb.set_position(d);
            d >= expected
        })
        .await
    };
    pb.finish_and_clear();
    let delivered = shared.delivered_count.load(Ordering::Relaxed);
    let mut latencies = Vec::with_capacity(n);
    let mut last_delivery = 0u64;
    for i in 0..n {
        let (p, d) = (
            shared.posted[i].load(Ordering::Relaxed),
            shared.delivered[i].load(Ordering::Relaxed),
        );
        if p > 0 && d > 0 {
            latencies.push(Duration::from_micros(d.saturating_sub(p)));
            last_delivery = last_delivery.max(d);
        }
    }
    let first_post = shared
        .posted
        .iter()
        .map(|p| p.load(Ordering::Relaxed))
        .filter(|p| *p > 0)
        .min()
        .unwrap_or(0);
    let all_after = Duration::from_micros(last_delivery.saturating_sub(first_post));
    let [p50, p90, p99, p999, max] = percentiles(latencies);

    // Back to idle?
    let mut after = ServerFigures::default();
    let deadline = Instant::now() + Duration::from_secs(10) + a.linger;
    loop {
        if let Ok(f) = target.figures(&probe_http).await {
            after = f;
            if f.connections_open == 0 {
                break;
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut stats = livepush_client::AgentStats::default();
    for agent in &agents {
        let s = agent.stats();
        stats.wakes += s.wakes;
        stats.wakes_ignored += s.wakes_ignored;
        stats.forged += s.forged + s.wrong_terminal;
        stats.failed_sessions += s.failed_sessions;
        stats.sessions += s.sessions;
    }
    let pb = super::bar(n as u64, "stop");
    futures_util::stream::iter(agents)
        .map(|agent| {
            let pb = pb.clone();
            async move {
                agent.shutdown().await;
                pb.inc(1);
            }
        })
        .buffer_unordered(256)
        .collect::<Vec<()>>()
        .await;
    pb.finish_and_clear();

    let wakes_sent = after.wakes_sent.saturating_sub(before.wakes_sent);
    let wakes_not_sent = after.wakes_not_sent.saturating_sub(before.wakes_not_sent);
    if a.json {
        println!(
            "{}",
            json!({
                "bench": "wake",
                "terminals": n,
                "transport": format!("{:?}", a.transport),
                "linger_ms": a.linger.as_millis() as u64,
                "register_s": reg_time.as_secs_f64(),
                "register_per_s": n as f64 / reg_time.as_secs_f64(),
                "idle_server_tcp_established": idle_tcp,
                "idle_connections_open": idle_figures.connections_open,
                "idle_keepalives_recorded": idle_figures.keepalives_accepted.saturating_sub(before.keepalives_accepted),
                "post_s": post_time.as_secs_f64(),
                "posts_wake_sent": wake_sent,
                "posts_wake_none": wake_none,
                "post_errors": post_errors,
                "delivered": delivered,
                "all_delivered": all_delivered,
                "all_delivered_after_first_post_s": all_after.as_secs_f64(),
                "latency_ms": {"p50": p50, "p90": p90, "p99": p99, "p999": p999, "max": max},
                "server_wake_datagrams_sent": wakes_sent,
                "server_wake_datagrams_not_sent": wakes_not_sent,
                "connections_open_after": after.connections_open,
                "agent_sessions": stats.sessions,
                "agent_failed_sessions": stats.failed_sessions,
                "agent_wakes": stats.wakes,
                "agent_wakes_ignored": stats.wakes_ignored,
                "agent_forged": stats.forged,
                "agent_errors": shared.errors.load(Ordering::Relaxed),
            })
        );
    } else {
        println!("## livepush bench wake: {n} idle terminals, one inbox message each\n");
        println!("| figure | value |");
        println!("|---|---|");
        println!(
            "| registered (one connect, then UDP only) | {n} in {:.2} s ({:.0}/s) |",
            reg_time.as_secs_f64(),
            n as f64 / reg_time.as_secs_f64()
        );
        println!(
            "| server TCP connections while idle (ESTABLISHED on :{}) | {} |",
            target.port,
            idle_tcp.map_or("n/a".to_owned(), |t| t.to_string())
        );
        println!(
            "| `livepush_connections_open` while idle | {} |",
            idle_figures.connections_open
        );
        println!(
            "| posts | {n} in {:.2} s (wake sent {wake_sent}, none {wake_none}, failed {post_errors}) |",
            post_time.as_secs_f64()
        );
        println!(
            "| delivered (woken, connected, received, acked) | {delivered} / {expected}{} |",
            if all_delivered { "" } else { " (timed out)" }
        );
        println!(
            "| all delivered, from the first post | {:.2} s |",
            all_after.as_secs_f64()
        );
        println!(
            "| post → delivered p50 / p90 / p99 / p99.9 / max | {p50:.1} / {p90:.1} / {p99:.1} / {p999:.1} / {max:.1} ms |"
        );
        println!("| wake datagrams sent (server) | {wakes_sent} (not sent: {wakes_not_sent}) |");
        println!(
            "| sessions (agents) | {} ({} failed); wakes acted on {}, ignored {}, forged {} |",
            stats.sessions, stats.failed_sessions, stats.wakes, stats.wakes_ignored, stats.forged
        );
        println!(
            "| `livepush_connections_open` after delivery | {} |",
            after.connections_open
        );
    }
    if !all_delivered {
        bail!(
            "{delivered} of {expected} messages delivered within {:?}",
            a.timeout
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums() {
        let text = "# HELP x\n\
            livepush_connections_open{transport=\"ws\"} 3\n\
            livepush_connections_open{transport=\"longpoll\"} 1\n\
            livepush_connections_total{transport=\"ws\"} 9\n\
            livepush_wake_keepalives_total{reason=\"accepted\"} 12\n\
            livepush_wake_keepalives_total{reason=\"bad_mac\"} 2\n";
        assert_eq!(metric_sum(text, "livepush_connections_open", None), 4);
        assert_eq!(
            metric_sum(
                text,
                "livepush_wake_keepalives_total",
                Some("reason=\"accepted\"")
            ),
            12
        );
        assert_eq!(metric_sum(text, "livepush_nothing", None), 0);
    }
}
