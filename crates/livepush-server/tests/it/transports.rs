//! Long-polling, SSE, and moving a flapping terminal to long-polling.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use livepush_proto::ServerFrame;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

impl TestServer {
    /// One long-poll exchange; returns the parsed frames.
    pub async fn poll(&self, path: &str, body: Value) -> Vec<ServerFrame> {
        let r = self
            .http
            .post(format!("{}{path}", self.url()))
            .json(&body)
            .send()
            .await
            .expect("poll");
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        let v: Value = r.json().await.expect("json");
        v["frames"]
            .as_array()
            .expect("frames")
            .iter()
            .map(|f| ServerFrame::parse(&f.to_string()).expect("frame"))
            .collect()
    }
}

#[tokio::test]
async fn long_poll_join_receive_send_ack() {
    let s = TestServer::start().await;
    let token = s.token("poller", &["lp"], true);
    let hello = s
        .poll(
            "/v1/poll",
            json!({"token":token,"hello":true,"rooms":{"lp":{}},"wait_ms":5000}),
        )
        .await;
    assert!(
        matches!(&hello[0], ServerFrame::Connected { transport: livepush_proto::Transport::Longpoll, terminal, .. } if terminal == "poller"),
        "{hello:?}"
    );
    let (epoch, seq, recovered) = joined(&hello[1]);
    assert_eq!((seq, recovered), (0, true));

    // A parked poll is answered by a publish.
    let s2 = std::sync::Arc::new(s);
    let publisher = {
        let s = s2.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            s.publish("lp", "gift", json!({"n": 1})).await;
        })
    };
    let frames = s2
        .poll(
            "/v1/connect",
            json!({"token":token,"rooms":{"lp":{"epoch":epoch,"seq":0}},"wait_ms":5000}),
        )
        .await;
    publisher.await.unwrap();
    assert_eq!(seqs(&frames), vec![1]);
    assert!(
        !frames
            .iter()
            .any(|f| matches!(f, ServerFrame::Joined { .. })),
        "no joined on a complete resume: {frames:?}"
    );

    // Send and ack ride in `ops`; a WebSocket member sees the chat.
    let mut ws = s2.terminal("watcher", &["lp"], false).await;
    ws.join("lp", None).await;
    let frames = s2
        .poll(
            "/v1/poll",
            json!({"token":token,"rooms":{"lp":{"epoch":epoch,"seq":1}},"wait_ms":2000,
                   "ops":[{"op":"send","room":"lp","type":"chat","data":{"text":"hi"}},{"op":"ack","inbox":0},{"op":"ping","id":4}]}),
        )
        .await;
    assert!(
        frames.contains(&ServerFrame::Pong { id: Some(4) }),
        "{frames:?}"
    );
    assert!(
        !frames
            .iter()
            .any(|f| matches!(f, ServerFrame::Error { .. })),
        "{frames:?}"
    );
    match ws.next_significant().await {
        ServerFrame::Msg(m) => assert_eq!((m.ty.as_str(), m.data), ("chat", json!({"text":"hi"}))),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_lost_poll_answer_loses_nothing() {
    let s = TestServer::start().await;
    let token = s.token("p", &["r"], false);
    for n in 1..=3 {
        s.publish("r", "gift", json!({"n": n})).await;
    }
    let epoch = s.room("r").await["epoch"].as_str().unwrap().to_owned();
    let body = json!({"token":token,"rooms":{"r":{"epoch":epoch,"seq":0}},"wait_ms":1000});
    let first = s.poll("/v1/poll", body.clone()).await;
    assert_eq!(seqs(&first), vec![1, 2, 3]);
    // The answer never reached the client: it polls again with the same positions.
    let again = s.poll("/v1/poll", body).await;
    assert_eq!(again, first);
}

#[tokio::test]
async fn long_poll_epoch_mismatch_transient_and_presence() {
    let mut c = config();
    c.poll_grace = Duration::from_millis(300);
    c.limits.online_interval = Duration::from_millis(50);
    let s = std::sync::Arc::new(TestServer::with(c).await);
    s.publish("r", "gift", json!({})).await;
    let token = s.token("p", &["r"], false);
    let frames = s
        .poll(
            "/v1/poll",
            json!({"token":token,"rooms":{"r":{"epoch":"old","seq":7}},"wait_ms":1000}),
        )
        .await;
    let (epoch, _, recovered) = joined(&frames[0]);
    assert!(!recovered);
    assert_eq!(seqs(&frames), vec![1]);

    // Transient messages published while the poll is parked are included; the parked
    // terminal counts as online.
    let bg = {
        let s = s.clone();
        tokio::spawn(async move {
            s.eventually("the parked poller to be online", || async {
                s.room("r").await["online"] == json!(1)
            })
            .await;
            s.publish("r", "chat", json!({"text":"live"})).await;
        })
    };
    let frames = s
        .poll(
            "/v1/poll",
            json!({"token":token,"rooms":{"r":{"epoch":epoch,"seq":1}},"wait_ms":5000}),
        )
        .await;
    bg.await.unwrap();
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, ServerFrame::Msg(m) if m.seq.is_none())),
        "{frames:?}"
    );
    // Still online within the grace after the poll ended, then not.
    assert_eq!(s.room("r").await["online"], 1);
    let (_, t) = s.get("/v1/terminals/p").await;
    assert_eq!(t["online"], true);
    s.eventually("the grace to end", || async {
        s.room("r").await["online"] == json!(0)
    })
    .await;
}

#[tokio::test]
async fn long_poll_errors_are_json() {
    let s = TestServer::start().await;
    let r = s
        .http
        .post(format!("{}/v1/poll", s.url()))
        .body("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = s
        .http
        .post(format!("{}/v1/poll", s.url()))
        .json(&json!({"token":"bad","rooms":{}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unauthorized");
    // Room-level refusals come back as frames.
    let token = s.token("p", &["r"], false);
    let frames = s
        .poll(
            "/v1/poll",
            json!({"token":token,"rooms":{"other":{},"bad room":{}},"wait_ms":100}),
        )
        .await;
    let codes: Vec<&str> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Error { code, .. } => Some(code.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(codes, vec!["bad_frame", "forbidden"]);
    let rooms: Vec<Option<&str>> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Error { room, .. } => Some(room.as_deref()),
            _ => None,
        })
        .collect();
    assert_eq!(
        rooms,
        vec![Some("bad room"), Some("other")],
        "errors name their room"
    );
}

/// Read SSE events from a streaming response: (id, frames).
async fn sse_events(
    resp: &mut reqwest::Response,
    buf: &mut String,
    want_reliable: usize,
) -> (Option<String>, Vec<ServerFrame>) {
    let mut frames = Vec::new();
    let mut last_id = None;
    let mut reliable = 0;
    while reliable < want_reliable {
        while let Some(i) = buf.find("\n\n") {
            let event: String = buf.drain(..i + 2).collect();
            for line in event.lines() {
                if let Some(id) = line.strip_prefix("id:") {
                    last_id = Some(id.trim().to_owned());
                } else if let Some(d) = line.strip_prefix("data:") {
                    let f = ServerFrame::parse(d.trim()).expect("frame");
                    if matches!(&f, ServerFrame::Msg(m) if m.seq.is_some()) {
                        reliable += 1;
                    }
                    frames.push(f);
                }
            }
        }
        if reliable >= want_reliable {
            break;
        }
        let chunk = tokio::time::timeout(WAIT, resp.chunk())
            .await
            .expect("sse chunk in time")
            .expect("read")
            .expect("stream open");
        buf.push_str(std::str::from_utf8(&chunk).expect("utf8"));
    }
    (last_id, frames)
}

#[tokio::test]
async fn sse_resumes_with_last_event_id() {
    let s = TestServer::start().await;
    let token = s.token("sse", &["a", "b:1"], false);
    s.publish("b:1", "gift", json!({"n": 1})).await;
    let mut resp = s
        .http
        .get(format!("{}/v1/sse?token={token}&rooms=a,b:1", s.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut buf = String::new();
    for n in 1..=3 {
        s.publish("a", "gift", json!({"n": n})).await;
    }
    let (id, frames) = sse_events(&mut resp, &mut buf, 3).await;
    assert!(matches!(
        frames[0],
        ServerFrame::Connected {
            transport: livepush_proto::Transport::Sse,
            ..
        }
    ));
    let id = id.expect("reliable events carry an id");
    let epoch_a = s.room("a").await["epoch"].as_str().unwrap().to_owned();
    let epoch_b = s.room("b:1").await["epoch"].as_str().unwrap().to_owned();
    assert_eq!(id, format!("a:{epoch_a}:3,b:1:{epoch_b}:1"));
    drop(resp);

    s.publish("a", "gift", json!({"n": 4})).await;
    s.publish("b:1", "gift", json!({"n": 2})).await;
    // Last-Event-ID wins over a stale `since`.
    let mut resp = s
        .http
        .get(format!(
            "{}/v1/sse?token={token}&rooms=a,b:1&since=a:{epoch_a}:0",
            s.url()
        ))
        .header("Last-Event-ID", &id)
        .send()
        .await
        .unwrap();
    let mut buf = String::new();
    let (_, frames) = sse_events(&mut resp, &mut buf, 2).await;
    let joined: Vec<bool> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Joined { recovered, .. } => Some(*recovered),
            _ => None,
        })
        .collect();
    assert_eq!(joined, vec![true, true]);
    let got: Vec<(String, u64)> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Msg(m) => Some((m.room.clone(), m.seq?)),
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![("a".to_owned(), 4), ("b:1".to_owned(), 2)]);
}

#[tokio::test]
async fn sse_rejects_bad_requests() {
    let s = TestServer::start().await;
    let token = s.token("sse", &["a"], false);
    let r = s.get_raw(&format!("/v1/sse?token={token}")).await;
    assert_eq!(r.status(), 400);
    let r = s.get_raw("/v1/sse?token=x&rooms=a").await;
    assert_eq!(r.status(), 401);
    let r = s
        .get_raw(&format!("/v1/sse?token={token}&rooms=a&since=a:ep"))
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "bad_request");
}

#[tokio::test]
async fn a_flapping_terminal_is_moved_to_long_polling() {
    let mut c = config();
    c.flap_threshold = 2;
    c.flap_longpoll_for = Duration::from_secs(30);
    let s = TestServer::with(c).await;
    // Clean closes never count.
    for _ in 0..4 {
        let mut t = s.terminal("flappy", &["r"], false).await;
        t.inner.close(None).await.unwrap();
        while t.try_next().await.is_some() {}
    }
    s.eventually("clean sessions to end", || async {
        s.get("/v1/terminals/flappy").await.1["online"] == json!(false)
    })
    .await;
    let (_, v) = s.get("/v1/terminals/flappy").await;
    assert_eq!(v["interruptions"]["count"], 0, "{v}");
    // Three abrupt ends (> threshold 2).
    for i in 1..=3 {
        let t = s.terminal("flappy", &["r"], false).await;
        drop(t);
        s.eventually("the interruption to count", || async {
            s.get("/v1/terminals/flappy").await.1["interruptions"]["count"] == json!(i)
        })
        .await;
    }
    let (_, v) = s.get("/v1/terminals/flappy").await;
    assert_eq!(v["interruptions"]["threshold"], 2);
    assert_eq!(v["interruptions"]["window_ms"], 60_000);
    assert!(
        v["interruptions"]["longpoll_for_ms"].as_u64().unwrap() > 20_000,
        "{v}"
    );
    let mut t = Ws::open(&s.ws_url()).await;
    let token = s.token("flappy", &["r"], false);
    t.inner
        .send(Message::Text(
            json!({"op":"connect","token":token}).to_string().into(),
        ))
        .await
        .unwrap();
    match t.next().await {
        ServerFrame::Transport {
            use_,
            retry_ws_after_ms,
        } => {
            assert_eq!(use_, livepush_proto::Transport::Longpoll);
            assert!(retry_ws_after_ms > 20_000 && retry_ws_after_ms <= 30_000);
        }
        other => panic!("expected transport, got {other:?}"),
    }
    assert!(t.try_next().await.is_none(), "then the server closes");
    // Another terminal is unaffected, and long-poll works for the flapping one.
    s.terminal("steady", &["r"], false).await;
    let frames = s
        .poll(
            "/v1/poll",
            json!({"token":token,"hello":true,"rooms":{"r":{}},"wait_ms":100}),
        )
        .await;
    assert!(matches!(frames[0], ServerFrame::Connected { .. }));
    let _ = t.inner.next().await;
}

#[tokio::test]
async fn sse_resumes_a_replay_cut_short_from_where_it_stopped() {
    sse_catches_up(10, 50, 20).await;
}

/// With a soft limit that the `joined` alone fills, every stream still carries one message
/// more: the stream moves forward at each reconnect instead of ending empty forever.
#[tokio::test]
async fn sse_catches_up_even_when_the_joined_fills_the_queue() {
    sse_catches_up(1, 6, 12).await;
}

/// `n` messages published before an SSE terminal resumes from 0, with `--outbox-frames
/// outbox_frames`: within `streams` streams (each cut by a prompt, reopened with the last
/// `id:` as EventSource does) it has every message once, in order.
async fn sse_catches_up(outbox_frames: usize, n: u64, streams: usize) {
    let mut c = config();
    c.limits.outbox_frames = outbox_frames;
    let s = TestServer::with(c).await;
    for i in 1..=n {
        s.publish("cut", "gift", json!({"n": i})).await;
    }
    let epoch = s.room("cut").await["epoch"].as_str().unwrap().to_owned();
    let token = s.token("sse", &["cut"], false);
    let mut since = format!("cut:{epoch}:0");
    let mut got: Vec<u64> = Vec::new();
    let n = n as usize;
    for _ in 0..streams {
        if got.len() == n {
            break;
        }
        // Each stream replays what fits, then a prompt, then ends; EventSource reconnects
        // with the last id it saw.
        let mut resp = s
            .http
            .get(format!("{}/v1/sse?token={token}&rooms=cut", s.url()))
            .header("Last-Event-ID", &since)
            .send()
            .await
            .unwrap();
        // Read whole events until the stream ends (after a prompt) or all have arrived.
        let mut buf = String::new();
        while got.len() < n {
            let Some(chunk) = tokio::time::timeout(WAIT, resp.chunk())
                .await
                .unwrap()
                .unwrap()
            else {
                break;
            };
            buf.push_str(std::str::from_utf8(&chunk).unwrap());
            while let Some(i) = buf.find("\n\n") {
                let event: String = buf.drain(..i + 2).collect();
                for line in event.lines() {
                    if let Some(id) = line.strip_prefix("id:") {
                        since = id.trim().to_owned();
                    } else if let Some(ServerFrame::Msg(m)) = line
                        .strip_prefix("data:")
                        .map(|d| ServerFrame::parse(d.trim()).unwrap())
                    {
                        got.push(m.seq.unwrap());
                    }
                }
            }
        }
    }
    assert_eq!(
        got,
        (1..=n as u64).collect::<Vec<_>>(),
        "each once, in order, none skipped"
    );
}

#[tokio::test]
async fn long_poll_ops_may_be_pretty_printed_and_oversized_answers_say_so() {
    let mut c = config();
    c.limits.outbox_max_bytes = 64 * 1024;
    c.limits.max_publish_bytes = 32 * 1024;
    let s = TestServer::with(c).await;
    let token = s.token("p", &["r"], false);
    let body = "{\n  \"token\": \"TOKEN\",\n  \"rooms\": {},\n  \"wait_ms\": 0,\n  \"ops\": [\n    {\n      \"op\": \"ping\",\n      \"id\": 1\n    }\n  ]\n}"
        .replace("TOKEN", &token);
    let r = s
        .http
        .post(format!("{}/v1/poll", s.url()))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["frames"], json!([{"op":"pong","id":1}]));
    // Eight pulls of a quarter of the budget each cannot fit in one answer.
    let big = "x".repeat(15 * 1024);
    for n in 1..=8 {
        s.publish("r", "gift", json!({"n": n, "pad": big})).await;
    }
    let pulls: Vec<Value> = (0..8)
        .map(|_| json!({"op":"pull","room":"r","since":0}))
        .collect();
    let frames = s
        .poll(
            "/v1/poll",
            json!({"token":token,"rooms":{},"wait_ms":0,"ops":pulls}),
        )
        .await;
    assert!(
        matches!(&frames[..], [ServerFrame::Error { code, .. }] if code.as_str() == "too_large"),
        "{frames:?}"
    );
}

#[tokio::test]
async fn a_parked_poll_dropped_by_its_client_ends_its_presence() {
    let mut c = config();
    c.poll_grace = Duration::from_millis(200);
    let s = TestServer::with(c).await;
    let token = s.token("gone", &["r"], false);
    // The client gives up on a poll parked for 10 s after 300 ms (its connection closes).
    // The first poll gets longer: on a loaded machine a cold debug server can take 300 ms.
    let r = s
        .http
        .post(format!("{}/v1/poll", s.url()))
        .timeout(Duration::from_secs(10))
        .json(&json!({"token":token,"rooms":{"r":{}},"wait_ms":100,"hello":true}))
        .send()
        .await;
    assert!(r.is_ok(), "a fresh join answers at once");
    let epoch = s.room("r").await["epoch"].as_str().unwrap().to_owned();
    let r = s
        .http
        .post(format!("{}/v1/poll", s.url()))
        .timeout(Duration::from_millis(300))
        .json(&json!({"token":token,"rooms":{"r":{"epoch":epoch,"seq":0}},"wait_ms":10_000}))
        .send()
        .await;
    assert!(r.is_err(), "the client timed out");
    s.eventually("the terminal to go offline", || async {
        s.get("/v1/terminals/gone").await.1["online"] == json!(false)
    })
    .await;
    assert_eq!(s.room("r").await["online"], 0);
}

/// Contract v1.1, decision 5: a poll with `"bye":true` ends the terminal's presence at once,
/// without the grace period, and answers `left` for its rooms.
#[tokio::test]
async fn a_bye_poll_ends_presence_at_once_and_answers_left() {
    let mut c = config();
    // A grace far longer than the test: only `bye` can end the presence in time.
    c.poll_grace = Duration::from_secs(600);
    let s = TestServer::with(c).await;
    let token = s.token("leaver", &["b1", "b2"], false);
    s.poll(
        "/v1/poll",
        json!({"token":token,"hello":true,"rooms":{"b1":{},"b2":{}},"wait_ms":0}),
    )
    .await;
    assert_eq!(s.room("b1").await["online"], 1);
    assert_eq!(s.get("/v1/terminals/leaver").await.1["online"], json!(true));

    let r = s
        .http
        .post(format!("{}/v1/poll", s.url()))
        .json(&json!({"token":token,"bye":true,"rooms":{"b1":{},"b2":{}},"wait_ms":25000}))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("a bye poll is answered at once");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    for key in ["frames", "ops"] {
        let mut left: Vec<&str> = v[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} in {v}"))
            .iter()
            .filter(|f| f["op"] == "left")
            .map(|f| f["room"].as_str().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["b1", "b2"], "{key}: {v}");
    }
    assert_eq!(
        s.get("/v1/terminals/leaver").await.1["online"],
        json!(false),
        "offline at once, not after the grace period"
    );
    s.eventually("the rooms' online counts to drop", || async {
        s.room("b1").await["online"] == 0 && s.room("b2").await["online"] == 0
    })
    .await;
}

/// Contract v1.1, decision 6: `connected.inbox` and every long-poll answer carry `pending`,
/// the number of unacknowledged inbox messages still kept.
#[tokio::test]
async fn inbox_positions_carry_the_pending_count() {
    let s = TestServer::start().await;
    for n in 0..3 {
        let (status, body) = s
            .post("/v1/terminals/woken/messages", json!({"type":"n","data":n}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let token = s.token("woken", &[], false);
    let post = |body: Value| {
        let s = &s;
        async move {
            let r = s
                .http
                .post(format!("{}/v1/poll", s.url()))
                .json(&body)
                .send()
                .await
                .expect("poll");
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let hello = post(json!({"token":token,"hello":true,"wait_ms":0})).await;
    assert_eq!(
        hello["frames"][0]["inbox"],
        json!({"seq":3,"acked":0,"pending":3}),
        "{hello}"
    );
    assert_eq!(hello["inbox"], json!({"seq":3,"acked":0,"pending":3}));
    let acked =
        post(json!({"token":token,"inbox":3,"ops":[{"op":"ack","inbox":2}],"wait_ms":0})).await;
    assert_eq!(
        acked["inbox"],
        json!({"seq":3,"acked":2,"pending":1}),
        "{acked}"
    );
    let (_, t) = s.get("/v1/terminals/woken").await;
    assert_eq!(t["inbox"], json!({"seq":3,"acked":2,"pending":1}), "{t}");
    // A bye poll may acknowledge the rest on its way out.
    post(json!({"token":token,"bye":true,"ops":[{"op":"ack","inbox":3}]})).await;
    let (_, t) = s.get("/v1/terminals/woken").await;
    assert_eq!(t["inbox"]["pending"], 0, "{t}");

    // Over WebSocket, `connected` carries it too.
    s.post("/v1/terminals/woken/messages", json!({"type":"n","data":4}))
        .await;
    let mut ws = Ws::open(&s.ws_url()).await;
    ws.send(json!({"op":"connect","token":token})).await;
    match ws.next().await {
        ServerFrame::Connected { inbox, .. } => {
            assert_eq!((inbox.seq, inbox.acked, inbox.pending), (4, 3, 1));
        }
        other => panic!("{other:?}"),
    }
}

/// A client that leaves abandons its parked poll and says bye at once; the server may notice
/// the abandoned poll ending only after the bye. That must not bring the terminal back for
/// the grace period (found by the browser client's tests).
#[tokio::test]
async fn a_poll_abandoned_before_a_bye_does_not_bring_the_terminal_back() {
    let mut c = config();
    c.poll_grace = Duration::from_secs(600);
    let s = TestServer::with(c).await;
    let token = s.token("quitter", &["q"], false);
    s.poll(
        "/v1/poll",
        json!({"token":token,"hello":true,"rooms":{"q":{}},"wait_ms":0}),
    )
    .await;
    let epoch = s.room("q").await["epoch"].as_str().unwrap().to_owned();
    // A parked poll whose client goes away only after the bye was answered.
    let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
    let parked = {
        let http = s.http.clone();
        let url = format!("{}/v1/poll", s.url());
        let body = json!({"token":token,"rooms":{"q":{"epoch":epoch,"seq":0}},"wait_ms":20_000});
        tokio::spawn(async move {
            tokio::select! {
                _ = http.post(url).json(&body).send() => {}
                _ = gone_rx => {}
            }
        })
    };
    s.eventually("the poll to park", || async {
        s.get("/v1/terminals/quitter").await.1["online"] == json!(true)
            && s.room("q").await["online"] == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _) = {
        let r = s
            .http
            .post(format!("{}/v1/poll", s.url()))
            .json(&json!({"token":token,"bye":true,"rooms":{"q":{}}}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), ())
    };
    assert_eq!(status, 200);
    let _ = gone_tx.send(());
    parked.await.unwrap();
    s.eventually("the terminal to be offline and out of the room", || async {
        s.get("/v1/terminals/quitter").await.1["online"] == json!(false)
            && s.room("q").await["online"] == 0
    })
    .await;
}

/// One session lifecycle: `/metrics` counts the sessions of every transport, not only
/// WebSocket, and how each ended.
#[tokio::test]
async fn metrics_count_sessions_of_every_transport() {
    let s = TestServer::start().await;
    let metric = |text: &str, name: &str, label: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let metrics = || async { s.get_raw_with_key("/metrics").await };
    let token = s.token("m", &["m"], false);
    let _ws = s.terminal("m", &["m"], false).await;
    let mut sse = s
        .http
        .get(format!("{}/v1/sse?token={token}&rooms=m", s.url()))
        .send()
        .await
        .unwrap();
    tokio::time::timeout(WAIT, sse.chunk())
        .await
        .unwrap()
        .unwrap();
    let epoch = s.room("m").await["epoch"].as_str().unwrap().to_owned();
    let parked = {
        let http = s.http.clone();
        let url = format!("{}/v1/poll", s.url());
        let body = json!({"token":token,"rooms":{"m":{"epoch":epoch,"seq":0}},"wait_ms":1500});
        tokio::spawn(async move { http.post(url).json(&body).send().await.unwrap() })
    };
    s.eventually("a poll, a stream and a websocket to be counted", || async {
        let t = metrics().await;
        ["ws", "sse", "longpoll"].iter().all(|tr| {
            metric(
                &t,
                "livepush_connections_open",
                &format!("transport=\"{tr}\""),
            ) == 1
        })
    })
    .await;
    parked.await.unwrap();
    drop(sse);
    s.eventually("the poll and the stream to end", || async {
        let t = metrics().await;
        metric(&t, "livepush_connections_open", "transport=\"longpoll\"") == 0
            && metric(&t, "livepush_connections_open", "transport=\"sse\"") == 0
            && metric(&t, "livepush_disconnects_total", "reason=\"answered\"") >= 1
            && metric(&t, "livepush_connections_total", "transport=\"sse\"") == 1
    })
    .await;
}

/// Contract v1.1, decision 2: an `error` about one room carries `room`, also for a long-poll
/// room entry with a malformed epoch (found while documenting v1.1).
#[tokio::test]
async fn a_malformed_epoch_in_a_poll_names_its_room() {
    let s = TestServer::start().await;
    let token = s.token("e", &["bad"], false);
    let frames = s
        .poll(
            "/v1/poll",
            json!({"token":token,"rooms":{"bad":{"epoch":"not an epoch!","seq":1}},"wait_ms":0}),
        )
        .await;
    assert!(
        frames.iter().any(|f| matches!(f,
            ServerFrame::Error { code, room: Some(r), .. } if code.as_str() == "bad_frame" && r == "bad")),
        "{frames:?}"
    );
}
