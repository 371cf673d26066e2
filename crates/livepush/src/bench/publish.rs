//! `livepush bench publish`: how fast reliable publishes are answered under each durability
//! policy. One in-process server per policy, each on a fresh data directory, driven by the
//! same HTTP load; the table gives absolute rates and ratios to `none`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use livepush_server::Config;
use livepush_server::store::{DurabilityPolicy, MemoryStore, RedbStore, Store, StoreOptions};
use serde_json::json;

use super::percentile_ms;
use super::plot::{Figure, PlotArg, Series};
use super::report::{Histogram, Rates, Timeline};
use super::targets::now_micros;

#[derive(Debug, Args)]
pub struct PublishBench {
    /// Publishes per policy.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Concurrent publishers (HTTP connections).
    #[arg(long, default_value_t = 64)]
    concurrency: u64,
    /// Rooms the publishes are spread over.
    #[arg(long, default_value_t = 16)]
    rooms: u64,
    /// Payload size in bytes (the `data` object's string).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Where the data directories go (a fresh one per policy, removed afterwards).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    scratch: std::path::PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    plot: PlotArg,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    policy: String,
    publishes: u64,
    seconds: f64,
    per_second: f64,
    ratio_to_none: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// The answer time's distribution: `[ms, fraction at or below]`.
    latency_cdf: Vec<[f64; 2]>,
    /// Answered publishes per 10 ms from the policy's first publish.
    publishes_over_time: Rates,
}

const KEY: &str = "bench-api-key-0123456789";

/// What one policy's run gave: seconds, publishes answered, their answer times (sorted),
/// errors, and the answers per time bucket.
type Outcome = (f64, u64, Vec<Duration>, u64, Rates);

async fn one(a: &PublishBench, name: &str, store: Arc<dyn Store>) -> anyhow::Result<Outcome> {
    let running = livepush_server::start_with(
        Config::for_tests(KEY, "bench-token-secret-0123456789"),
        store.clone(),
    )
    .await?;
    let url = running.url();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(a.concurrency as usize)
        .build()?;
    let data = "x".repeat(a.size);
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let answers = Arc::new(Timeline::default());
    answers.start(now_micros());
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency {
        let (http, url, data, next, errors, answers) = (
            http.clone(),
            url.clone(),
            data.clone(),
            next.clone(),
            errors.clone(),
            answers.clone(),
        );
        let (total, rooms) = (a.messages, a.rooms);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return lat;
                }
                let t = Instant::now();
                let ok = http
                    .post(format!("{url}/v1/rooms/bench:{}/messages", n % rooms))
                    .bearer_auth(KEY)
                    .json(&json!({"type":"gift","data":{"n":n,"pad":data}}))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    lat.push(t.elapsed());
                    answers.add(now_micros(), 1);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut latencies = Vec::with_capacity(a.messages as usize);
    for t in tasks {
        latencies.extend(t.await.context("publisher")?);
    }
    let seconds = started.elapsed().as_secs_f64();
    running.shutdown().await;
    store.flush().await.ok();
    latencies.sort();
    let done = latencies.len() as u64;
    eprintln!("  {name}: {done} publishes in {seconds:.2}s");
    Ok((
        seconds,
        done,
        latencies,
        errors.load(Ordering::Relaxed),
        answers.rates(),
    ))
}

pub async fn run(a: PublishBench) -> anyhow::Result<()> {
    let mut rows: Vec<Row> = Vec::new();
    let batch_window = |ms: u64| {
        let mut o = StoreOptions::new(DurabilityPolicy::Batch);
        o.batch_window = Duration::from_millis(ms);
        o
    };
    let policies = [
        ("memory", None),
        ("none", Some(StoreOptions::new(DurabilityPolicy::None))),
        ("batch", Some(batch_window(0))),
        ("batch, 2 ms window", Some(batch_window(2))),
        ("sync", Some(StoreOptions::new(DurabilityPolicy::Sync))),
    ];
    eprintln!(
        "livepush bench publish: {} reliable publishes of {} B per policy, {} publishers, {} rooms",
        a.messages, a.size, a.concurrency, a.rooms
    );
    for (name, policy) in policies {
        let dir = a.scratch.join(format!(
            "livepush-bench-{}-{}",
            std::process::id(),
            rows.len()
        ));
        let (store, redb): (Arc<dyn Store>, Option<Arc<RedbStore>>) = match policy {
            None => (Arc::new(MemoryStore::default()), None),
            Some(p) => {
                let _ = std::fs::remove_dir_all(&dir);
                let s = Arc::new(RedbStore::open_with(&dir, p)?);
                (s.clone(), Some(s))
            }
        };
        let (seconds, done, lat, errors, over_time) = one(&a, name, store).await?;
        let h = Histogram::default();
        for d in &lat {
            h.record(d.as_micros() as u64);
        }
        if let Some(s) = redb {
            s.close().ok();
        }
        let _ = std::fs::remove_dir_all(&dir);
        rows.push(Row {
            policy: name.to_owned(),
            publishes: done,
            seconds,
            per_second: done as f64 / seconds,
            ratio_to_none: 0.0,
            p50_ms: percentile_ms(&lat, 50.0),
            p99_ms: percentile_ms(&lat, 99.0),
            errors,
            latency_cdf: h.cdf_ms(),
            publishes_over_time: over_time,
        });
    }
    let none = rows
        .iter()
        .find(|r| r.policy == "none")
        .map_or(1.0, |r| r.per_second);
    for r in &mut rows {
        r.ratio_to_none = r.per_second / none;
    }
    a.plot.draw_figure(|| Figure {
        title: format!(
            "bench publish: {} reliable publishes of {} B per policy, {} publishers",
            a.messages, a.size, a.concurrency
        ),
        latency: "publish answer time".into(),
        rate: "publishes/s since the policy's first publish".into(),
        runs: rows
            .iter()
            .map(|r| Series {
                label: r.policy.clone(),
                cdf: r.latency_cdf.clone(),
                p50_ms: r.p50_ms,
                p99_ms: r.p99_ms,
                rates: Some(r.publishes_over_time.clone()),
                coarse: false,
            })
            .collect(),
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("| durability | publishes/s | ratio to none | p50 ms | p99 ms | errors |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
            r.policy, r.per_second, r.ratio_to_none, r.p50_ms, r.p99_ms, r.errors
        );
    }
    Ok(())
}
