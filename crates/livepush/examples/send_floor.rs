//! The floor under any server's paced fan-out on this machine: what one 64-byte `send` to
//! each of N loopback TCP sockets costs, with nothing else going on.
//!
//! The issue's paced target (10k subscribers × 10 msg/s, p99 ≤ 40 ms) asks for one message
//! written to 10,000 sockets within 40 ms: at most 4 µs per write, kernel included. This
//! measures that cost without a server: the parent accepts N connections and writes 64 bytes
//! to each, round after round at `RATE` rounds a second (one round = one message fanned out);
//! a child process (pinned elsewhere) holds the other ends and reads them by busy polling, so
//! it never sleeps and the writer pays no wake-ups of a sleeping reader: the most favourable
//! case for the writer.
//!
//! ```sh
//! cargo build --release --example send_floor
//! taskset -c 0 target/release/examples/send_floor 9000 100 10
//! ```
//!
//! Arguments: connections (default 9,000: the writer and the reader each hold one end, and a
//! process may hold ~20k files here), rounds (100), rounds per second (10). The reader is
//! started as `taskset -c 1 <this program> --read PORT N BYTES`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--read") {
        let port: u16 = parse(&args, 2, 0);
        let conns: usize = parse(&args, 3, 0);
        let bytes: u64 = parse(&args, 4, 0);
        return read(port, conns, bytes);
    }
    let conns: usize = parse(&args, 1, 9000);
    let rounds: usize = parse(&args, 2, 100);
    let rate: f64 = parse(&args, 3, 10.0);
    let payload = [b'x'; 64];

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let total = (conns * rounds * payload.len()) as u64;
    let mut reader = std::process::Command::new("taskset")
        .args(["-c", "1"])
        .arg(std::env::current_exe()?)
        .args([
            "--read",
            &port.to_string(),
            &conns.to_string(),
            &total.to_string(),
        ])
        .spawn()?;
    let mut socks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        socks.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));

    let period = Duration::from_secs_f64(1.0 / rate);
    let cpu_before = cpu_ns()?;
    let started = Instant::now();
    let mut round_ms = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let t0 = Instant::now();
        for s in &mut socks {
            s.write_all(&payload)?;
        }
        round_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let next = started + period * (r as u32 + 1);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let cpu = cpu_ns()? - cpu_before;
    let status = reader.wait()?;
    round_ms.sort_by(f64::total_cmp);
    let q = |p: f64| round_ms[((round_ms.len() - 1) as f64 * p).round() as usize];
    println!("connections {conns}, rounds {rounds} at {rate}/s, 64-byte writes");
    println!(
        "writer CPU per write: {:.2} µs",
        cpu as f64 / 1e3 / (conns * rounds) as f64
    );
    println!(
        "one round (a message to every socket), ms: p50 {:.1}, p99 {:.1}, max {:.1}",
        q(0.5),
        q(0.99),
        q(1.0)
    );
    println!(
        "at 10,000 sockets that is ~{:.0} ms per message before the last socket has it",
        q(0.5) * 10_000.0 / conns as f64
    );
    println!("reader: {status}");
    Ok(())
}

/// The reader: connect, then read every socket round-robin until all bytes are in.
fn read(port: u16, conns: usize, bytes: u64) -> std::io::Result<()> {
    let mut socks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nonblocking(true)?;
        socks.push(s);
    }
    let mut got = 0u64;
    let mut buf = [0u8; 4096];
    while got < bytes {
        for s in &mut socks {
            match s.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => got += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// CPU time of this thread so far, from the scheduler's own accounting (ns).
fn cpu_ns() -> std::io::Result<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    Ok(stat
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

fn parse<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|v| v.parse().ok()).unwrap_or(default)
}
