//! The merge window (`--merge-ms`): a busy room's messages reach each member several to a
//! WebSocket message, with order and exactly-once unchanged; off, each goes out on its own.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use livepush_proto::{Message as Msg, ServerFrame, split_frames};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

fn merging(window_ms: u64) -> livepush_server::Config {
    let mut c = config();
    c.limits.merge_window = Duration::from_millis(window_ms);
    c
}

/// Read raw WebSocket messages until `n` room messages (reliable or transient) have arrived;
/// returns them grouped by the WebSocket message that carried them. Reads `ws.inner` directly
/// to see the grouping, so call it only when nothing but `online` frames can be pending in
/// `ws` (e.g. right after a fresh `join`).
async fn by_ws_message(ws: &mut Ws, n: usize) -> Vec<Vec<Msg>> {
    let mut out = Vec::new();
    let mut total = 0;
    while total < n {
        let m = tokio::time::timeout(WAIT, ws.inner.next())
            .await
            .expect("timed out waiting for a WebSocket message")
            .expect("connection ended")
            .expect("WebSocket error");
        let Message::Text(text) = m else { continue };
        let msgs: Vec<Msg> = split_frames(text.as_str())
            .filter_map(|line| match ServerFrame::parse(line) {
                Ok(ServerFrame::Msg(m)) => Some(m),
                Ok(_) => None,
                Err(e) => panic!("bad server frame {line}: {e}"),
            })
            .collect();
        if !msgs.is_empty() {
            total += msgs.len();
            out.push(msgs);
        }
    }
    out
}

fn seqs(groups: &[Vec<Msg>]) -> Vec<Vec<u64>> {
    groups
        .iter()
        .map(|g| g.iter().map(|m| m.seq.unwrap_or(0)).collect())
        .collect()
}

#[tokio::test]
async fn a_burst_is_merged_and_arrives_once_in_order() {
    let s = TestServer::with(merging(50)).await;
    let mut a = s.terminal("viewer", &["live:*"], false).await;
    a.join("live:m", None).await;
    // Gifts (reliable) and chat (transient), interleaved, as fast as the API answers.
    const N: u64 = 20;
    for n in 1..=N {
        s.publish("live:m", "gift", json!({ "n": n })).await;
        if n % 5 == 0 {
            s.publish("live:m", "chat", json!({ "after": n })).await;
        }
    }
    let groups = by_ws_message(&mut a, N as usize + 4).await;
    // Everything, once, in publish order: seq n, and each chat right after gift 5k.
    let mut want = Vec::new();
    for n in 1..=N {
        want.push((Some(n), json!({ "n": n })));
        if n % 5 == 0 {
            want.push((None, json!({ "after": n })));
        }
    }
    let got: Vec<_> = groups
        .iter()
        .flatten()
        .map(|m| (m.seq, m.data.clone()))
        .collect();
    assert_eq!(got, want);
    // Merged: several messages per WebSocket message, far fewer messages than publishes.
    assert!(
        groups.len() <= N as usize / 2,
        "{} WebSocket messages for {} room messages: {:?}",
        groups.len(),
        N + 4,
        seqs(&groups)
    );
    // Nothing doubled: the next message is the next publish.
    s.publish("live:m", "gift", json!({ "n": N + 1 })).await;
    assert_eq!(seqs(&by_ws_message(&mut a, 1).await), vec![vec![N + 1]]);

    let text = s
        .http
        .get(format!("{}/metrics", s.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let flushes = text
        .lines()
        .find_map(|l| l.strip_prefix("livepush_merge_flushes_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no merge_flushes metric in {text}"));
    assert!((1..N).contains(&flushes), "{text}");
    assert!(
        text.contains(&format!("livepush_merged_frames_total {}", N + 5)),
        "{text}"
    );
}

#[tokio::test]
async fn a_join_with_since_mid_window_gets_nothing_twice() {
    // A long window, so that the join surely lands inside it.
    const WINDOW_MS: u64 = 400;
    let s = TestServer::with(merging(WINDOW_MS)).await;
    let mut a = s.terminal("early", &["r"], false).await;
    let (epoch, _, _) = joined(&a.join("r", None).await);
    let mut b = s.terminal("late", &["r"], false).await;

    let started = Instant::now();
    for n in 1..=3 {
        s.publish("r", "gift", json!({ "n": n })).await;
    }
    // 1..3 are delivered (in history) but still gathered for `a` when `b` resumes from 0.
    let (_, latest, recovered) = joined(&b.join("r", Some((&epoch, 0))).await);
    assert!(
        started.elapsed() < Duration::from_millis(WINDOW_MS),
        "too slow to join within the window; the test proves nothing"
    );
    assert_eq!((latest, recovered), (3, true));
    assert_eq!(b.reliable(3).await, vec![1, 2, 3], "the replay");
    assert_eq!(a.reliable(3).await, vec![1, 2, 3]);

    // The window's flush must not bring 1..3 to `b` again: its next message is 4.
    s.publish("r", "gift", json!({ "n": 4 })).await;
    for t in [&mut a, &mut b] {
        match t.next_significant().await {
            ServerFrame::Msg(m) => assert_eq!(m.seq, Some(4)),
            other => panic!("expected message 4, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn without_a_window_each_publish_goes_out_on_its_own() {
    assert_eq!(
        config().limits.merge_window,
        Duration::ZERO,
        "off by default"
    );
    let s = TestServer::start().await;
    let mut a = s.terminal("viewer", &["r"], false).await;
    a.join("r", None).await;
    // Slowly, and without reading in between: each message is pushed and written at once,
    // so none shares a WebSocket message with the next one 30 ms later.
    for n in 1..=5 {
        s.publish("r", "gift", json!({ "n": n })).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(
        seqs(&by_ws_message(&mut a, 5).await),
        vec![vec![1], vec![2], vec![3], vec![4], vec![5]]
    );
}

/// A merged chunk is several frames in one outbox entry; a long-poll answer must still list
/// each frame as its own JSON array element (and SSE ids must still advance).
#[tokio::test]
async fn long_poll_answers_split_merged_chunks() {
    let s = TestServer::with(merging(200)).await;
    let token = s.token("poller", &["lp:m"], false);
    let hello = s
        .poll(
            "/v1/poll",
            json!({"token":token,"hello":true,"rooms":{"lp:m":{}},"wait_ms":5000}),
        )
        .await;
    let Some(ServerFrame::Joined { epoch, seq, .. }) = hello.get(1) else {
        panic!("expected joined, got {hello:?}");
    };
    let (epoch, since) = (epoch.clone(), *seq);
    // Park a poll, then publish a burst inside one window.
    let parked = {
        let token = token.clone();
        let epoch = epoch.clone();
        let s2 = s.http.clone();
        let url = format!("{}/v1/poll", s.url());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let body =
                json!({"token":token,"rooms":{"lp:m":{"epoch":epoch,"seq":since}},"wait_ms":5000});
            s2.post(url).json(&body).send().await.expect("poll")
        })
    };
    // Publish once the poll is parked (a poll's join would replay history instead).
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..5 {
        s.publish("lp:m", "gift", json!({"n": i})).await;
    }
    let r = parked.await.expect("poll task");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("a long-poll answer is valid JSON");
    let got: Vec<u64> = v["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .filter_map(|f| ServerFrame::parse(&f.to_string()).ok())
        .filter_map(|f| match f {
            ServerFrame::Msg(m) => m.seq,
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![1, 2, 3, 4, 5], "{v}");
}
