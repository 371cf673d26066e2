//! `livepush bench floor`: the floor under any server's paced fan-out on this machine, with
//! no server at all.
//!
//! A paced fan-out (10k subscribers × 10 msg/s) has nothing to coalesce: every message is one
//! write to every subscriber's socket, and a message has reached its last subscriber only when
//! the round of writes is done. So the round's length bounds the latency p99 from below,
//! whoever writes. This measures it: the bench accepts `--conns` loopback connections and
//! writes `--size` bytes to each with a blocking `write`, `--rounds` times at `--rate` rounds
//! a second. A reader process (pinned with `--reader-cpus`) holds the other ends and reads
//! them by busy polling: it never sleeps, so the writer never pays for waking a sleeping
//! reader, the most favourable case for the writer.
//!
//! Figures: the writer's CPU per write (its thread's `schedstat`) and the round's length.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;

use super::proc::parse_schedstat;
use super::report::{Table, emit, ms, percentile_ms};
use super::{bar, note};

#[derive(Debug, Clone, Args)]
pub struct FloorBench {
    /// Loopback connections to write to. The bench and the reader each hold one end: one
    /// process holds at most ~20k open files here.
    #[arg(long, default_value_t = 9000, value_parser = clap::value_parser!(u32).range(1..))]
    conns: u32,
    /// Rounds: one write to every connection each.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Rounds per second (the paced load's message rate).
    #[arg(long, default_value_t = 10.0, value_parser = positive_rate)]
    rate: f64,
    /// Bytes per write.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    size: u32,
    /// Pin the reader process to these CPUs (`taskset -c LIST`), e.g. `1`; pin the bench itself
    /// with `taskset` to another.
    #[arg(long)]
    reader_cpus: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Internal: run as the reader, connecting to this port of 127.0.0.1.
    #[arg(long, hide = true)]
    reader_port: Option<u16>,
}

fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a positive number of rounds per second"
        )),
    }
}

#[derive(Debug, Serialize)]
struct Report {
    connections: u32,
    rounds: u32,
    rate: f64,
    size: u32,
    writer_cpu_per_write_us: f64,
    round_ms_p50: f64,
    round_ms_p99: f64,
    round_ms_max: f64,
    /// The p50 round scaled to 10,000 connections.
    round_ms_p50_at_10k: f64,
}

pub async fn run(a: FloorBench) -> anyhow::Result<()> {
    // Blocking sockets, one thread: the point is to measure nothing but the writes.
    tokio::task::spawn_blocking(move || match a.reader_port {
        Some(port) => read(port, &a),
        None => write(&a),
    })
    .await?
}

/// Bytes the reader waits for before it exits.
fn total_bytes(a: &FloorBench) -> u64 {
    u64::from(a.conns) * u64::from(a.rounds) * u64::from(a.size)
}

/// The writer: start the reader, accept its connections, write round after round, report.
fn write(a: &FloorBench) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let port = listener.local_addr()?.port();
    let mut reader = Reader(spawn_reader(a, port)?);

    // Accept without blocking, so that a reader that fails to connect is noticed.
    listener.set_nonblocking(true)?;
    let mut socks = Vec::with_capacity(a.conns as usize);
    let pb = bar(u64::from(a.conns), "connecting");
    while socks.len() < a.conns as usize {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                socks.push(s);
                pb.inc(1);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if let Some(status) = reader.0.try_wait()? {
                    bail!(
                        "the reader exited ({status}) after {} of {} connections",
                        socks.len(),
                        a.conns
                    );
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => {
                return Err(e).context(format!(
                    "accepting connection {} of {} (open-files limit?)",
                    socks.len() + 1,
                    a.conns
                ));
            }
        }
    }
    pb.finish_and_clear();
    // Let the reader reach its polling loop.
    std::thread::sleep(Duration::from_millis(500));

    let payload = vec![b'x'; a.size as usize];
    let period = Duration::from_secs_f64(1.0 / a.rate);
    let pb = bar(u64::from(a.rounds), "rounds");
    let cpu_before = thread_cpu_ns()?;
    let started = Instant::now();
    let mut rounds = Vec::with_capacity(a.rounds as usize);
    for r in 1..=a.rounds {
        let t0 = Instant::now();
        for s in &mut socks {
            s.write_all(&payload).context("writing to a connection")?;
        }
        rounds.push(t0.elapsed());
        pb.inc(1);
        if let Some(wait) = (started + period * r).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let cpu_ns = thread_cpu_ns()? - cpu_before;
    pb.finish_and_clear();
    let status = reader.0.wait()?;
    if !status.success() {
        bail!("the reader failed: {status}");
    }

    rounds.sort();
    let p50 = percentile_ms(&rounds, 50.0);
    let report = Report {
        connections: a.conns,
        rounds: a.rounds,
        rate: a.rate,
        size: a.size,
        writer_cpu_per_write_us: cpu_ns as f64 / 1e3 / (f64::from(a.conns) * f64::from(a.rounds)),
        round_ms_p50: p50,
        round_ms_p99: percentile_ms(&rounds, 99.0),
        round_ms_max: percentile_ms(&rounds, 100.0),
        round_ms_p50_at_10k: p50 * 10_000.0 / f64::from(a.conns),
    };
    let mut t = Table::new(format!(
        "bench floor: {} loopback connections, {} rounds of {}-byte writes at {}/s, no server",
        a.conns, a.rounds, a.size, a.rate
    ));
    t.row(
        "**writer CPU per write**",
        format!("**{:.2} µs**", report.writer_cpu_per_write_us),
    )
    .row(
        "one round (a write to every connection), ms p50 / p99 / max",
        format!(
            "{} / {} / {}",
            ms(report.round_ms_p50),
            ms(report.round_ms_p99),
            ms(report.round_ms_max)
        ),
    )
    .row(
        "**round p50 scaled to 10,000 connections**",
        format!("**{} ms**", ms(report.round_ms_p50_at_10k)),
    );
    emit(a.json, &report, &t)
}

/// Kills the reader if the writer gives up early.
struct Reader(Child);

impl Drop for Reader {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `[taskset -c CPUS] <this binary> bench floor --reader-port PORT …`.
fn spawn_reader(a: &FloorBench, port: u16) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let mut cmd = match &a.reader_cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args(["bench", "floor", "--reader-port", &port.to_string()])
        .args(["--conns", &a.conns.to_string()])
        .args(["--rounds", &a.rounds.to_string()])
        .args(["--size", &a.size.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    note(format!(
        "bench floor: reader {}",
        a.reader_cpus
            .as_deref()
            .map_or("not pinned".to_owned(), |c| format!("on CPUs {c}"))
    ));
    cmd.spawn().context("starting the reader process")
}

/// The reader: connect every socket, then read them round-robin, never sleeping, until every
/// byte is in or the writer goes away.
fn read(port: u16, a: &FloorBench) -> anyhow::Result<()> {
    let mut socks = Vec::with_capacity(a.conns as usize);
    for i in 0..a.conns {
        let s = TcpStream::connect(("127.0.0.1", port))
            .with_context(|| format!("reader: connection {} of {}", i + 1, a.conns))?;
        s.set_nonblocking(true)?;
        socks.push(s);
    }
    let want = total_bytes(a);
    let mut got = 0u64;
    let mut buf = [0u8; 4096];
    while got < want {
        for s in &mut socks {
            match s.read(&mut buf) {
                Ok(0) => bail!("reader: the writer closed after {got} of {want} bytes"),
                Ok(n) => got += n as u64,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reader"),
            }
        }
    }
    Ok(())
}

/// CPU time of the calling thread so far, from the scheduler's own accounting (ns).
fn thread_cpu_ns() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat")
        .context("reading /proc/thread-self/schedstat")?;
    parse_schedstat(&text)
        .map(|s| s.run_ns)
        .context("unexpected /proc/thread-self/schedstat")
}
