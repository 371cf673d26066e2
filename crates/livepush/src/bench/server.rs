//! The server under test: where it is, which protocol it speaks, how to publish to it, and
//! (when it runs on this machine) how to measure it. `--spawn` starts `livepush serve` as a
//! child process, optionally pinned to CPUs with `taskset`, and stops it at the end.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use livepush_server::auth::{Claims, TokenKeys, now_secs};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::client::Dialer;
use super::proc::{Probe, Sample};
use super::targets::{Class, Target, publish_request};

/// This process's part of a run split over several processes: `I/K`, 0 ≤ I < K.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (i, k) = s.split_once('/').ok_or("expected I/K, e.g. 0/2")?;
        let index: u32 = i.trim().parse().map_err(|_| "I must be a number")?;
        let count: u32 = k.trim().parse().map_err(|_| "K must be a number")?;
        if count == 0 || index >= count {
            return Err(format!("need 0 <= I < K, got {index}/{count}"));
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// This shard's part of `total`: the first `total % K` shards take one more.
    pub fn share(&self, total: u64) -> u64 {
        let (k, i) = (self.count as u64, self.index as u64);
        total / k + u64::from(i < total % k)
    }
}

/// Options every bench that drives a server shares.
#[derive(Debug, Args)]
pub struct ServerOpts {
    /// Base URL of the server under test; several nodes of one deployment comma-separated
    /// (connection i goes to node i mod N, publishes to the first). Ignored with --spawn.
    #[arg(long, env = "LIVEPUSH_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// The kind of server: livepush, or a peer for comparison (see bench/README.md).
    #[arg(long, value_enum, default_value_t = Target::Livepush)]
    pub target: Target,
    /// Start `livepush serve --data-dir :memory:` as a child process on a free port, measure
    /// it, and stop it at the end.
    #[arg(long)]
    pub spawn: bool,
    /// The livepush binary --spawn runs (default: this one; use the release build).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Pin the spawned server to these CPUs (`taskset -c LIST`), e.g. `0`.
    #[arg(long)]
    pub server_cpus: Option<String>,
    /// Extra argument for the spawned `livepush serve` (repeatable), e.g.
    /// `--server-arg=--heartbeat-ms=60000`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// PID of the (local) server, to read its memory and CPU time from /proc. Implied by
    /// --spawn.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The server's API key (livepush publishes through its HTTP API).
    #[arg(long, env = "LIVEPUSH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The server's token secret, to mint terminal tokens.
    #[arg(long, env = "LIVEPUSH_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,
    /// Loopback source addresses to spread connections over: 127.0.0.2, 127.0.0.3, … (each
    /// has ~28k ephemeral ports). 0 lets the kernel choose.
    #[arg(long, default_value_t = 16)]
    pub source_ips: u32,
    /// This process's part of a run spread over K processes (I/K): it opens its share of
    /// the connections, from its own source addresses, with its own terminal ids.
    #[arg(long, default_value = "0/1")]
    pub shard: Shard,
    /// WebSocket handshakes in flight at once. Keep it below the server's listen backlog
    /// (livepush: 128), or SYNs are dropped and retried after 1 s.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Print one JSON object instead of a markdown table.
    #[arg(long)]
    pub json: bool,
    /// With --spawn: the spawned server keeps its state in this Redis (`redis://HOST:PORT/`,
    /// which must not evict keys) under a prefix of its own, instead of `:memory:`.
    #[arg(long)]
    pub redis: Option<String>,
    /// With --spawn and --redis: start this many nodes on the Redis and spread the
    /// connections over them (connection i on node i mod N); publishes go to the first node.
    /// The server's CPU and memory are then not reported (they are several processes').
    #[arg(long, default_value_t = 1)]
    pub spawn_nodes: u32,
}

/// A resolved server under test.
#[derive(Debug)]
pub struct Sut {
    pub target: Target,
    /// `http://HOST:PORT` without a trailing slash (the first node, with several).
    pub base: String,
    /// How to reach each node (one, unless --spawn-nodes).
    dialers: Vec<Dialer>,
    pub probe: Option<Probe>,
    api_key: Option<String>,
    keys: Option<TokenKeys>,
    children: Vec<Child>,
    http: reqwest::Client,
    /// A short random id of this run, in terminal ids and room names.
    pub run_id: String,
    pub shard: Shard,
    pub json: bool,
}

/// The API key and token secret of a server the bench spawns.
pub const SPAWN_KEY: &str = "bench-api-key-0123456789";
pub const SPAWN_SECRET: &str = "bench-token-secret-0123456789";

/// `serve` on `listen` with [`SPAWN_KEY`] and [`SPAWN_SECRET`] and a history that keeps a
/// run's `history` messages (at least the default 1000): the arguments every spawned server
/// starts with.
pub fn serve_args(listen: &str, history: usize) -> Vec<String> {
    vec![
        "serve".into(),
        "--listen".into(),
        listen.into(),
        "--api-key".into(),
        SPAWN_KEY.into(),
        "--token-secret".into(),
        SPAWN_SECRET.into(),
        "--history-size".into(),
        history.max(1000).to_string(),
    ]
}

impl Sut {
    /// Resolve the options: spawn the server if asked, find its address, set up tokens.
    /// `history` raises a spawned server's `--history-size` so that a run's messages fit.
    pub async fn start(o: &ServerOpts, history: usize) -> anyhow::Result<Sut> {
        if o.spawn_nodes != 1 && (o.redis.is_none() || !o.spawn) {
            bail!("--spawn-nodes needs --spawn and --redis (the nodes share the Redis)");
        }
        if o.redis.is_some() && !o.spawn {
            bail!("--redis configures the spawned server; use it with --spawn");
        }
        let (mut bases, children, api_key, secret) = if o.spawn {
            if o.target != Target::Livepush {
                bail!(
                    "--spawn starts livepush; start {} yourself",
                    o.target.name()
                );
            }
            let prefix = format!("bench-{:06x}", rand::random::<u32>() & 0xff_ffff);
            let mut bases = Vec::new();
            let mut children = Vec::new();
            for node in 0..o.spawn_nodes.max(1) {
                let (child, url) = spawn(o, history, &prefix, node).await?;
                bases.push(url);
                children.push(child);
            }
            (
                bases,
                children,
                Some(SPAWN_KEY.to_owned()),
                Some(SPAWN_SECRET.to_owned()),
            )
        } else {
            (
                o.server
                    .split(',')
                    .map(|u| u.trim().trim_end_matches('/').to_owned())
                    .collect(),
                Vec::new(),
                o.api_key.clone(),
                o.token_secret.clone(),
            )
        };
        if o.target == Target::Livepush && secret.is_none() {
            bail!("livepush needs --token-secret (or LIVEPUSH_TOKEN_SECRET) to mint tokens");
        }
        let mut dialers = Vec::new();
        for base in &bases {
            dialers.push(dialer(o, base).await?);
        }
        let pid = match children.as_slice() {
            [one] => one.id(),
            [] => o.server_pid,
            _ => None,
        };
        let probe = pid.map(Probe::new);
        if let Some(p) = &probe
            && p.sample().is_none()
        {
            bail!("cannot read /proc/{} (is the server local?)", p.pid);
        }
        let run_id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        Ok(Sut {
            target: o.target,
            dialers,
            base: bases.swap_remove(0),
            probe,
            api_key,
            keys: secret.map(|s| TokenKeys::new(&s)),
            children,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .tcp_nodelay(true)
                .build()?,
            run_id,
            shard: o.shard,
            json: o.json,
        })
    }

    /// How connection `i` reaches the server: its node, with several.
    pub fn dialer(&self, i: u64) -> &Dialer {
        &self.dialers[(i % self.dialers.len() as u64) as usize]
    }

    /// How many nodes the connections are spread over.
    pub fn nodes(&self) -> usize {
        self.dialers.len()
    }

    /// The token of terminal `i` of this run, allowed into `room` (livepush only).
    pub fn token(&self, i: u64, room: &str) -> anyhow::Result<Option<String>> {
        let Some(keys) = &self.keys else {
            return Ok(None);
        };
        if self.target != Target::Livepush {
            return Ok(None);
        }
        let claims = Claims {
            sub: format!("bench-{}-{}-{i}", self.run_id, self.shard.index),
            exp: now_secs() + 6 * 3600,
            rooms: vec![room.to_owned()],
            send: false,
        };
        Ok(Some(keys.mint(&claims)?))
    }

    /// Publish one payload to `room`; the livepush answer's seq, if any.
    pub async fn publish(
        &self,
        room: &str,
        class: Class,
        payload: &str,
    ) -> anyhow::Result<Option<u64>> {
        let (path, body) = publish_request(self.target, room, class, payload);
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            bail!("publish answered {status}: {text}");
        }
        if self.target != Target::Livepush {
            return Ok(None);
        }
        let v: serde_json::Value = resp.json().await?;
        Ok(v["seq"].as_u64())
    }

    /// livepush's `GET /v1/rooms/{room}` `online` count.
    pub async fn online(&self, room: &str) -> Option<u64> {
        if self.target != Target::Livepush {
            return None;
        }
        let mut req = self.http.get(format!("{}/v1/rooms/{room}", self.base));
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let v: serde_json::Value = req.send().await.ok()?.json().await.ok()?;
        v["online"].as_u64()
    }

    /// The server's memory and CPU time (see [`Probe::sample`]).
    pub fn sample(&self) -> Option<Sample> {
        self.probe.as_ref().and_then(Probe::sample)
    }

    /// The server's CPU time only (cheap).
    pub fn sample_cpu(&self) -> Option<Sample> {
        self.probe.as_ref().and_then(Probe::sample_cpu)
    }

    /// Stop the spawned servers (SIGTERM, then SIGKILL after 5 s).
    pub async fn stop(mut self) {
        for child in self.children.drain(..) {
            stop_child(child).await;
        }
    }
}

/// Stop a server started by [`start_serve`]: SIGTERM, then SIGKILL after 5 s.
pub async fn stop_child(mut child: Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// Run `BIN serve ARGS` (pinned with taskset to `cpus` if given), its stderr to a log file in
/// the temp directory, and wait for its `livepush listening on URL` line. Returns the child,
/// the URL and the log's path. The child is killed when dropped.
pub async fn start_serve(
    bin: &std::path::Path,
    cpus: Option<&str>,
    args: &[String],
    name: &str,
) -> anyhow::Result<(Child, String, std::path::PathBuf)> {
    let mut cmd = match cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let log =
        std::env::temp_dir().join(format!("livepush-bench-{name}-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log).with_context(|| format!("creating {log:?}"))?;
    cmd.args(args)
        .env_remove("LIVEPUSH_API_KEY")
        .env_remove("LIVEPUSH_TOKEN_SECRET")
        .env("LIVEPUSH_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} serve", bin.display()))?;
    let stdout = child.stdout.take().context("server stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = line.strip_prefix("livepush listening on ") {
                return Ok(url.trim().to_owned());
            }
        }
        bail!(
            "the server exited before listening (log: {})",
            log.display()
        )
    })
    .await
    .context("the server did not start listening within 20 s")??;
    // Keep reading stdout so that the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, url, log))
}

/// How to reach the server at `base` (`http://HOST:PORT`).
async fn dialer(o: &ServerOpts, base: &str) -> anyhow::Result<Dialer> {
    let url = url::Url::parse(base).with_context(|| format!("--server {base}"))?;
    let host = url
        .host_str()
        .context("--server has no host")?
        .trim_matches(['[', ']']);
    let port = url.port_or_known_default().unwrap_or(80);
    let addr: SocketAddr = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))?;
    Ok(Dialer {
        target: o.target,
        host: url[url::Position::BeforeHost..url::Position::AfterPort].to_owned(),
        addr,
        source_ips: o.source_ips,
        source_offset: o.shard.index * o.source_ips,
    })
}

/// Start `livepush serve` on a free loopback port and wait for its "listening on" line. With
/// --redis, on the Redis under `prefix` (every node of the run shares it).
async fn spawn(
    o: &ServerOpts,
    history: usize,
    prefix: &str,
    node: u32,
) -> anyhow::Result<(Child, String)> {
    let bin = match &o.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("locating this binary")?,
    };
    let mut args = serve_args("127.0.0.1:0", history);
    match &o.redis {
        Some(redis) => args.extend([
            "--redis".into(),
            redis.clone(),
            "--redis-prefix".into(),
            prefix.to_owned(),
            // No bench uses wake-ups; spare the nodes their UDP listeners.
            "--wake-listen".into(),
            "off".into(),
        ]),
        None => args.extend(["--data-dir".into(), ":memory:".into()]),
    }
    // Parked long-polls and SSE streams count against the per-address cap (4096, or a
    // quarter of the open files): lift it, unless asked otherwise, so that a run from few
    // source addresses is not refused with 429 by the protection rather than the load.
    if !o
        .server_args
        .iter()
        .any(|a| a.starts_with("--max-connections-per-address"))
    {
        args.push("--max-connections-per-address=1000000".into());
    }
    args.extend(o.server_args.iter().cloned());
    let name = match node {
        0 => "server".to_owned(),
        n => format!("server{n}"),
    };
    let (child, url, log) = start_serve(&bin, o.server_cpus.as_deref(), &args, &name).await?;
    eprintln!(
        "spawned {} (pid {}){} on {url}; log in {}",
        bin.display(),
        child.id().unwrap_or(0),
        o.server_cpus
            .as_ref()
            .map(|c| format!(" on CPU {c}"))
            .unwrap_or_default(),
        log.display()
    );
    Ok((child, url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards() {
        let s: Shard = "1/3".parse().unwrap();
        assert_eq!((s.index, s.count), (1, 3));
        assert!("3/3".parse::<Shard>().is_err());
        assert!("1".parse::<Shard>().is_err());
        assert!("0/0".parse::<Shard>().is_err());
        let total: u64 = (0..3).map(|i| Shard { index: i, count: 3 }.share(10)).sum();
        assert_eq!(total, 10);
        assert_eq!(Shard { index: 0, count: 3 }.share(10), 4);
        assert_eq!(Shard { index: 2, count: 3 }.share(10), 3);
    }
}
