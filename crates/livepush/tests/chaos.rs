//! `livepush bench chaos` in small: SDK terminals on every transport through a proxy that
//! cuts at random, a server restart in the middle; nothing lost, doubled or reordered. And
//! the same bench fails when the proxy silently throws bytes away.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::process::livepush;

/// Runs `livepush bench chaos` with `args` (20-odd terminals, 500 messages, 100 cuts);
/// returns whether it succeeded and its JSON report.
async fn chaos(args: &[&str]) -> (bool, Value) {
    let mut cmd = livepush();
    cmd.args([
        "bench",
        "chaos",
        "--json",
        "--terminals",
        "21",
        "--rooms",
        "3",
    ])
    .args(["--messages", "500", "--rate", "250", "--cuts", "100"])
    .args(args)
    .env("LIVEPUSH_LOG", "error");
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the chaos bench ends within 120 s")
        .expect("run livepush bench chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "one JSON report ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

/// The counts every transport must have at 0.
fn violations(f: &Value) -> [u64; 4] {
    ["lost", "duplicates", "reordered", "unfinished"].map(|k| f[k].as_u64().expect(k))
}

async fn survives(restart: &str, exit: &str) {
    let (ok, r) = chaos(&["--restart", restart]).await;
    assert_eq!(r["answered"], 500, "{r:#}");
    assert!(r["cuts_total"].as_u64().expect("cuts") >= 100, "{r:#}");
    assert!(
        r["cuts_while_publishing"].as_u64().expect("cuts") >= 20,
        "{r:#}"
    );
    assert_eq!(r["restart"]["exit"], exit, "{r:#}");
    let kinds = r["per_transport"].as_array().expect("per transport");
    assert_eq!(kinds.len(), 3);
    for f in kinds {
        assert_eq!(f["terminals"], 7, "{f:#}");
        assert!(f["expected"].as_u64().expect("expected") > 0, "{f:#}");
        assert_eq!(violations(f), [0; 4], "{f:#}");
        assert!(f["disconnects"].as_u64().expect("disconnects") > 0, "{f:#}");
    }
    assert!(ok, "the bench succeeds: {r:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_cuts_and_a_kill_9_lose_no_answered_message_on_any_transport() {
    survives("kill", "signal 9").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_cuts_and_a_graceful_restart_lose_no_answered_message_on_any_transport() {
    survives("term", "exit 0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soak_fails_when_the_proxy_silently_discards_what_the_server_sends() {
    let (ok, r) = chaos(&["--restart", "none", "--fault-discard", "--timeout", "2s"]).await;
    assert!(!ok, "the bench fails: {r:#}");
    for f in r["per_transport"].as_array().expect("per transport") {
        assert!(f["lost"].as_u64().expect("lost") > 0, "{f:#}");
        assert!(f["unfinished"].as_u64().expect("unfinished") > 0, "{f:#}");
    }
}
