//! Log lines about a connection carry its ids: `req` (the HTTP request, also answered in
//! `X-Request-Id`), `conn` and, once known, `terminal`.

use std::sync::{Arc, Mutex};

use serde_json::json;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;

use crate::support::*;

/// Everything the server logs on this thread (the test runtime is single-threaded, so the
/// server's tasks and the reactor run here too) from `set_default` to the guard's drop.
struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn start() -> Capture {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let lines = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()));
        let subscriber = tracing_subscriber::registry()
            .with(Targets::new().with_target("livepush_server", LevelFilter::DEBUG))
            .with(lines);
        Capture {
            _guard: tracing::subscriber::set_default(subscriber),
            buf,
        }
    }

    /// The lines that contain `what`.
    fn lines(&self, what: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.buf.lock().unwrap())
            .lines()
            .filter(|l| l.contains(what))
            .map(str::to_owned)
            .collect()
    }

    /// Wait (bounded) for a line with `what`.
    async fn line(&self, what: &str) -> String {
        for _ in 0..500 {
            if let Some(l) = self.lines(what).pop() {
                return l;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("no log line with {what:?}: {:?}", self.lines(""));
    }
}

#[tokio::test]
async fn a_websocket_sessions_lines_carry_its_ids() {
    let logs = Capture::start();
    let s = TestServer::start().await;
    // Refused: a bad token. The handshake's lines carry the upgrade's request id and `conn`.
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(s.ws_url())
            .unwrap();
    req.headers_mut()
        .insert("x-request-id", "upgrade-7".parse().unwrap());
    let (inner, res) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(res.headers()["x-request-id"], "upgrade-7");
    let mut ws = Ws::over(inner);
    ws.send(json!({"op":"connect","token":"nope"})).await;
    ws.expect_error("unauthorized").await;
    let refused = logs.line("connection refused").await;
    assert!(refused.contains("req=upgrade-7"), "{refused}");
    assert!(refused.contains("conn{conn="), "{refused}");
    assert!(refused.contains("ending=\"unauthorized\""), "{refused}");

    // Open, then closed by the client: the session's last line comes from the reactor, with
    // its ids as fields.
    let mut ws = s.terminal("alice", &["a"], false).await;
    let started = logs.line("session started").await;
    assert!(started.contains(r#"terminal="alice""#), "{started}");
    let conn = started
        .split("conn=")
        .nth(1)
        .and_then(|rest| rest.split([' ', '}']).next())
        .expect("a conn id")
        .to_owned();
    ws.inner.close(None).await.unwrap();
    let ended = logs.line("ending=\"client_close\"").await;
    assert!(
        ended.contains(&format!("conn={conn} ")),
        "{ended} (conn {conn})"
    );
    assert!(ended.contains(r#"terminal="alice""#), "{ended}");
}

#[tokio::test]
async fn a_long_poll_request_carries_its_request_id_conn_and_terminal() {
    let logs = Capture::start();
    let s = TestServer::start().await;
    let token = s.token("poller", &["lp"], false);
    let r = s
        .http
        .post(format!("{}/v1/poll", s.url()))
        .header("x-request-id", "poll-42")
        .json(&json!({"token":token,"rooms":{"lp":{}},"wait_ms":0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "poll-42");
    let started = logs.line("session started").await;
    assert!(started.contains("http{req=poll-42}"), "{started}");
    assert!(started.contains(r#"transport="longpoll""#), "{started}");
    assert!(started.contains(r#"terminal="poller""#), "{started}");
    let ended = logs.line("ending=\"answered\"").await;
    assert!(
        ended.contains("req=poll-42") && ended.contains("poller"),
        "{ended}"
    );

    // Refused (no token): the line says which request and connection.
    let r = s
        .http
        .post(format!("{}/v1/poll", s.url()))
        .header("x-request-id", "poll-43")
        .json(&json!({"rooms":{}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let refused = logs.line("code=\"unauthorized\"").await;
    assert!(
        refused.contains("http{req=poll-43}:conn{conn="),
        "{refused}"
    );
}

#[tokio::test]
async fn a_request_id_is_taken_only_when_well_formed() {
    let s = TestServer::start().await;
    let long = "x".repeat(65);
    for given in [Some("has space"), Some(long.as_str()), None] {
        let mut r = s.http.get(format!("{}/healthz", s.url()));
        if let Some(g) = given {
            r = r.header("x-request-id", g);
        }
        let r = r.send().await.unwrap();
        let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(id.len(), 16, "{given:?} → {id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    }
    let r = s
        .http
        .get(format!("{}/healthz", s.url()))
        .header("x-request-id", "abc-1.2:3_4")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-1.2:3_4");
}
