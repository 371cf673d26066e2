//! `GET` and `PUT /v1/admin/log-level`: the log filter, read and changed through the API.

use std::sync::Arc;

use livepush_server::config::LogLevelControl;
use parking_lot::Mutex;
use serde_json::json;

use crate::support::*;

/// A log filter as the binary hands one over: it refuses what is not a directive.
#[derive(Debug)]
struct Filter(Mutex<String>);

impl LogLevelControl for Filter {
    fn current(&self) -> String {
        self.0.lock().clone()
    }

    fn set(&self, directive: &str) -> Result<(), String> {
        if directive.is_empty() || directive.contains('[') {
            return Err(format!("bad log level {directive:?}"));
        }
        *self.0.lock() = directive.to_owned();
        Ok(())
    }
}

async fn server() -> TestServer {
    let mut c = config();
    c.log_level = Some(Arc::new(Filter(Mutex::new("warn".into()))));
    TestServer::with(c).await
}

async fn put(s: &TestServer, body: &str, key: Option<&str>) -> (u16, serde_json::Value) {
    let mut r = s
        .http
        .put(format!("{}/v1/admin/log-level", s.url()))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().await.expect("http");
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

#[tokio::test]
async fn the_log_level_is_read_and_set_with_the_api_key() {
    let s = server().await;
    assert_eq!(
        s.get("/v1/admin/log-level").await,
        (200, json!({"level":"warn"}))
    );
    let (status, body) = put(&s, r#"{"level":"info,livepush_server=debug"}"#, Some(KEY)).await;
    assert_eq!(
        (status, body),
        (200, json!({"level":"info,livepush_server=debug"}))
    );
    assert_eq!(
        s.get("/v1/admin/log-level").await.1,
        json!({"level":"info,livepush_server=debug"})
    );
    // A bad directive, or a body that is not `{"level":…}`: 400, nothing changes.
    for bad in [r#"{"level":"info,[="}"#, r#"{"lvl":"info"}"#, "info"] {
        let (status, body) = put(&s, bad, Some(KEY)).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"], "bad_request", "{bad}: {body}");
    }
    assert_eq!(
        s.get("/v1/admin/log-level").await.1["level"],
        "info,livepush_server=debug"
    );
    // Without the key (or with a wrong one): 401, nothing changes.
    let (status, body) = put(&s, r#"{"level":"trace"}"#, None).await;
    assert_eq!((status, &body["error"]), (401, &json!("unauthorized")));
    assert_eq!(
        put(&s, r#"{"level":"trace"}"#, Some("wrong-key-0123456789"))
            .await
            .0,
        401
    );
    assert_eq!(s.get_raw("/v1/admin/log-level").await.status(), 401);
    assert_eq!(
        s.get("/v1/admin/log-level").await.1["level"],
        "info,livepush_server=debug"
    );
}

#[tokio::test]
async fn without_a_reloadable_logger_the_endpoint_is_not_found() {
    let s = TestServer::start().await;
    let (status, body) = s.get("/v1/admin/log-level").await;
    assert_eq!((status, &body["error"]), (404, &json!("not_found")));
    assert_eq!(put(&s, r#"{"level":"info"}"#, Some(KEY)).await.0, 404);
}
