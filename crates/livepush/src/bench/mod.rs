//! `livepush bench`: the project's load generator. Every figure livepush claims comes from
//! here, printed as ratios measured in one run.
//!
//! - `publish`: reliable publishes per second under each durability policy (in-process).
//! - `connections`: hold N WebSocket connections (or parked long-polls, or SSE streams:
//!   `--transport`); connect rate and server memory per connection.
//! - `fanout`: N subscribers in one room (over WebSocket, long-poll or SSE), M messages;
//!   deliveries per second, latency, loss, server CPU per delivery.
//! - `resume`: N terminals drop at once, K messages later they all resume; time to recover.
//! - `wake`: N idle terminals without a connection, woken over UDP; time until delivered.
//! - `floor`: no server: what a round of one write per loopback connection costs on this
//!   machine, the floor under any server's paced fan-out.
//! - `chaos`: SDK terminals on every transport through a proxy that cuts at random, a
//!   server restart on the durable store: every answered message exactly once, in order.
//! - `plot`: several runs' `--json` reports on one SVG (`fanout` and `connections` draw their
//!   own run with `--plot FILE.svg`).
//!
//! The last three speak to livepush or to a peer server (`--target ws|socketio|nchan`) and
//! measure a local server from /proc. See `bench/README.md` for how to run them.

mod chaos;
mod client;
mod connections;
mod fanout;
mod floor;
mod http_client;
mod longpoll;
mod plot;
mod proc;
mod publish;
mod report;
mod resume;
mod server;
mod sse;
mod targets;
mod transport;
mod wake;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub use report::percentile_ms;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Reliable publishes per second under each durability policy, side by side.
    Publish(publish::PublishBench),
    /// Open and hold N WebSocket connections: connect rate, server memory per connection.
    Connections(connections::ConnectionsBench),
    /// N subscribers in one room, M messages: deliveries/s, latency, loss, CPU per delivery.
    Fanout(fanout::FanoutBench),
    /// N terminals drop at once, K messages are published, all resume: time to recover.
    Resume(resume::ResumeBench),
    /// N idle terminals registered over UDP, a message to each: time until all delivered,
    /// and the server's open TCP connections while they sleep (should be 0).
    Wake(wake::WakeBench),
    /// No server: N loopback connections written to round after round (blocking writes, a
    /// busy-polling reader on another core). The floor under any server's paced fan-out here.
    Floor(floor::FloorBench),
    /// WebSocket, long-poll and SSE terminals of the Rust SDK through a proxy that cuts their
    /// connections at random, reliable messages, a server restart in the middle: loss,
    /// duplicates and reordering per transport (must all be 0).
    Chaos(chaos::ChaosBench),
    /// Draw `--json` reports of several runs on one SVG: latency distributions (log scale)
    /// and rates over time, side by side.
    Plot(plot::PlotBench),
}

pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.command {
        BenchCommand::Publish(p) => publish::run(p).await,
        BenchCommand::Connections(c) => {
            raise_nofile();
            connections::run(c).await
        }
        BenchCommand::Fanout(f) => {
            raise_nofile();
            fanout::run(f).await
        }
        BenchCommand::Resume(r) => {
            raise_nofile();
            resume::run(r).await
        }
        BenchCommand::Wake(w) => wake::run(w).await,
        BenchCommand::Floor(f) => {
            raise_nofile();
            floor::run(f).await
        }
        BenchCommand::Chaos(c) => {
            raise_nofile();
            chaos::run(c).await
        }
        BenchCommand::Plot(p) => plot::run(p),
    }
}

/// Raise the soft limit of open files to the hard limit: every connection is a file, and the
/// default soft limit (often 1024) is far below what a bench holds. A spawned server
/// inherits the raised limit.
fn raise_nofile() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("warning: cannot raise the open-files limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft)
        }
    }
}

/// The current soft limit of open files.
fn nofile_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft)
}

/// A progress bar for one phase, drawn on stderr (hidden when stderr is not a terminal).
fn bar(len: u64, phase: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(4));
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:32}] {human_pos}/{human_len} {per_sec:>12} {elapsed_precise} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(phase.to_owned());
    pb
}

/// Keep `pb` at the value of `counter` until the bar is finished (for counters bumped far
/// too often to touch the bar each time).
fn follow(pb: &ProgressBar, counter: &Arc<AtomicU64>) {
    let (pb, counter) = (pb.clone(), counter.clone());
    tokio::spawn(async move {
        while !pb.is_finished() {
            pb.set_position(counter.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// Print a phase's one-line note on stderr (not for `--json` readers of stdout).
fn note(msg: impl AsRef<str>) {
    eprintln!("{}", msg.as_ref());
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 2m)"))
}
