//! `livepush bench floor` end to end: the real binary, its reader child process, real
//! loopback sockets, small numbers.

mod support;

use std::time::Duration;

use support::process::livepush;

/// `livepush bench floor` with `args`, run to the end (60 s at most).
async fn floor(args: &[&str]) -> std::process::Output {
    let out = livepush().args(["bench", "floor"]).args(args).output();
    tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("bench floor finished within 60 s")
        .expect("bench floor ran")
}

#[tokio::test]
async fn reports_every_write_of_every_round() {
    let out = floor(&["--conns", "20", "--rounds", "3", "--rate", "50", "--json"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {}: {stderr}", out.status);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(report["connections"], 20);
    assert_eq!(report["rounds"], 3);
    assert_eq!(report["size"], 64);
    let cpu = report["writer_cpu_per_write_us"].as_f64().unwrap();
    assert!(cpu > 0.0, "no CPU time measured: {report}");
    let (p50, max) = (
        report["round_ms_p50"].as_f64().unwrap(),
        report["round_ms_max"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= max, "{report}");
    // 20 connections scaled to 10,000 is 500 rounds' worth.
    let scaled = report["round_ms_p50_at_10k"].as_f64().unwrap();
    assert!(
        (scaled - p50 * 500.0).abs() < 1e-6 * scaled.max(1.0),
        "{report}"
    );
}

#[tokio::test]
async fn bad_arguments_are_refused_with_a_reason() {
    for (args, says) in [
        (&["--rate", "0"][..], "not a positive number"),
        (&["--conns", "0"][..], "--conns"),
        (&["--size", "100000"][..], "--size"),
    ] {
        let out = floor(args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
