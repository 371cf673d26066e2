//! `GET /v1/openapi.json`: served without a key, from the serving limits; `docs/openapi.json`
//! is the document of the default limits; the document is OpenAPI 3.1 and names every route
//! (scripts/schemathesis also validates it against the OpenAPI 3.1 schema).

use livepush_server::Limits;
use livepush_server::api::openapi;
use serde_json::Value;

use crate::support::{TestServer, config};

const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");

/// Every route of the router, as (method, path).
const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/rooms/{room}/messages"),
    ("post", "/v1/publish"),
    ("get", "/v1/rooms/{room}/history"),
    ("delete", "/v1/rooms/{room}/history"),
    ("get", "/v1/rooms/{room}"),
    ("get", "/v1/terminals"),
    ("get", "/v1/terminals/{id}"),
    ("post", "/v1/terminals/{id}/messages"),
    ("get", "/healthz"),
    ("get", "/metrics"),
    ("post", "/v1/poll"),
    ("get", "/v1/connect"),
    ("post", "/v1/connect"),
    ("get", "/v1/sse"),
    ("get", "/v1/openapi.json"),
    ("get", "/"),
    ("get", "/livepush.js"),
    ("get", "/demo/app.js"),
    ("get", "/demo/style.css"),
    ("get", "/v1/admin/stats"),
    ("post", "/v1/admin/token"),
    ("get", "/v1/admin/log-level"),
    ("put", "/v1/admin/log-level"),
    ("get", "/admin"),
    ("get", "/admin/app.js"),
    ("get", "/admin/style.css"),
];

#[test]
fn docs_openapi_json_is_the_document_of_the_default_limits() {
    let generated = openapi::json(&Limits::default());
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(DOCS, &generated).expect("write docs/openapi.json");
    }
    let kept = std::fs::read_to_string(DOCS).unwrap_or_default();
    assert!(
        kept == generated,
        "docs/openapi.json is not the generated document; regenerate it with \
         `cargo run -p livepush -- openapi > docs/openapi.json` \
         (or `UPDATE_OPENAPI=1 cargo test -p livepush-server --test it openapi`)"
    );
}

#[tokio::test]
async fn served_without_a_key_from_the_servers_limits() {
    let mut config = config();
    config.limits.max_batch_messages = 7;
    let limits = config.limits.clone();
    let s = TestServer::with(config).await;
    let r = s.get_raw("/v1/openapi.json").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let text = r.text().await.expect("body");
    assert_eq!(text, openapi::json(&limits));
    let doc: Value = serde_json::from_str(&text).expect("JSON");
    let messages = &doc["components"]["schemas"]["BatchRequest"]["properties"]["messages"];
    assert_eq!(messages["maxItems"], 7, "{messages}");
    s.running.shutdown().await;
}

#[tokio::test]
async fn the_document_is_openapi_3_1_and_names_every_route() {
    let text = openapi::json(&Limits::default());
    let doc: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());

    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            documented.push((method.clone(), path.clone()));
            let responses = op["responses"].as_object().expect("responses");
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    let schema = &response["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(
                        schema, "#/components/schemas/ErrorBody",
                        "{method} {path} {status}: not the JSON error body"
                    );
                }
            }
            if op["security"].to_string().contains("api_key") {
                assert!(responses.contains_key("401"), "{method} {path}: no 401");
            }
        }
    }
    let mut expected: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    documented.sort();
    expected.sort();
    assert_eq!(documented, expected);

    // Every `$ref` names a schema of the document.
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for name in text.split("\"$ref\": \"#/components/schemas/").skip(1) {
        let name = &name[..name.find('"').expect("end of ref")];
        assert!(schemas.contains_key(name), "dangling $ref {name}");
    }
}

/// Each documented operation is routed: none gets the fallback's 404 or a 405.
#[tokio::test]
async fn every_documented_operation_is_routed() {
    let s = TestServer::start().await;
    for (method, path) in ROUTES {
        let url = format!(
            "{}{}",
            s.url(),
            path.replace("{room}", "r1").replace("{id}", "t1")
        );
        let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let r = s
            .http
            .request(method.clone(), &url)
            .bearer_auth(crate::support::KEY)
            .body("{}")
            .send()
            .await
            .expect("http");
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        assert_ne!(status, 405, "{method} {path}: {body}");
        assert!(
            !(status == 404 && body.contains("no such endpoint")),
            "{method} {path} is not routed"
        );
    }
    s.running.shutdown().await;
}

// Found by scripts/schemathesis.

/// `/v1/connect` is GET (WebSocket) and POST (long-poll): any other method was answered 400
/// "use a WebSocket upgrade", not 405 like every other route.
#[tokio::test]
async fn connect_answers_other_methods_with_405() {
    let s = TestServer::start().await;
    for method in ["PUT", "DELETE", "PATCH", "TRACE"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = s
            .http
            .request(method.clone(), format!("{}/v1/connect", s.url()))
            .send()
            .await
            .expect("http");
        assert_eq!(r.status(), 405, "{method}");
        let allow = r.headers()["allow"].to_str().unwrap().to_owned();
        assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
        let body: Value = r.json().await.expect("JSON error");
        assert_eq!(body["error"], "bad_request", "{method}");
    }
    s.running.shutdown().await;
}

/// The document types a poll's numbers `integer`, which JSON Schema reads as any number
/// without a fractional part: `2.0` was refused with 400 ("expected u64").
#[tokio::test]
async fn a_poll_takes_integers_written_with_a_fraction_of_zero() {
    let s = TestServer::start().await;
    let token = s.token("t1", &["*"], false);
    // (The API key `post` sends is ignored by a poll.)
    let (status, body) = s
        .post(
            "/v1/poll",
            serde_json::json!({
                "token": token, "wait_ms": 0.0, "inbox": 1e0,
                "rooms": {"r1": {"epoch": "e1", "seq": 2.0}},
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for bad in [
        serde_json::json!(1.5),
        serde_json::json!(-1),
        serde_json::json!(1e20),
    ] {
        let (status, body) = s
            .post(
                "/v1/poll",
                serde_json::json!({"token": token, "wait_ms": bad}),
            )
            .await;
        assert_eq!(status, 400, "wait_ms {bad}: {body}");
    }
    s.running.shutdown().await;
}

/// SSE resume positions were ignored when bad (the stream started afresh, 200): a
/// `Last-Event-ID` that is not visible ASCII, and a bad `since` beside a `Last-Event-ID`
/// (which wins over it).
#[tokio::test]
async fn sse_refuses_bad_positions_it_used_to_ignore() {
    let s = TestServer::start().await;
    let token = s.token("t1", &["*"], false);
    let cases: [(&str, &[u8]); 2] = [("", b"\xc2\x84"), ("&since=nope", b"r1:e1:0")];
    for (since, last_event_id) in cases {
        let r = s
            .http
            .get(format!("{}/v1/sse?rooms=r1&token={token}{since}", s.url()))
            .header(
                "last-event-id",
                reqwest::header::HeaderValue::from_bytes(last_event_id).unwrap(),
            )
            .send()
            .await
            .expect("http");
        assert_eq!(r.status(), 400, "{since} {last_event_id:?}");
        let body: Value = r.json().await.expect("JSON error");
        assert_eq!(body["error"], "bad_request");
    }
    s.running.shutdown().await;
}
