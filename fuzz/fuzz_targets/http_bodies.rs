//! The HTTP API's bodies and the long-poll body, through the server's own handlers, in
//! process (a server with the in-memory store, started once). The first byte picks the
//! endpoint, the rest is the body; `$T` in it becomes a valid terminal token, so that polls
//! get past authentication to their rooms and ops. Every answer is a JSON object with the
//! contract's status codes: 200, or an error with `error` and `message`.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::routing::post;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use livepush_server::auth::{Claims, TokenKeys, now_secs};
use livepush_server::{App, Config, Running, WakeListen, api, transport};
use tower::ServiceExt;

const SECRET: &str = "fuzz-token-secret-0123456789";
const ENDPOINTS: [&str; 3] = [
    "/v1/rooms/fuzz/messages",
    "/v1/terminals/fuzz/messages",
    "/v1/poll",
];

struct Harness {
    rt: tokio::runtime::Runtime,
    router: Router,
    token: String,
    _running: Running,
}

fn harness() -> Harness {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut config = Config::for_tests("fuzz-api-key-0123456789", SECRET);
    config.wake_listen = WakeListen::Off;
    config.history_size = 4;
    // A poll with nothing to answer parks this long at most.
    config.limits.poll_max_wait = Duration::from_millis(1);
    let running = rt
        .block_on(livepush_server::start(config))
        .expect("server starts");
    let app: Arc<App> = running.app().clone();
    let poll_app = app.clone();
    let router = Router::new()
        .route("/v1/rooms/{room}/messages", post(api::publish))
        .route("/v1/terminals/{id}/messages", post(api::post_inbox))
        .route(
            "/v1/poll",
            post(move |req: Request| transport::longpoll::poll(poll_app.clone(), req)),
        )
        .with_state(app);
    let token = TokenKeys::new(SECRET)
        .mint(&Claims {
            sub: "fuzz".into(),
            exp: now_secs() + 24 * 3600,
            rooms: vec!["*".into()],
            send: true,
        })
        .expect("mint");
    Harness {
        rt,
        router,
        token,
        _running: running,
    }
}

thread_local! {
    static HARNESS: Harness = harness();
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let path = ENDPOINTS[usize::from(pick) % ENDPOINTS.len()];
    HARNESS.with(|h| {
        let body = match std::str::from_utf8(body) {
            Ok(text) => text.replace("$T", &h.token).into_bytes(),
            Err(_) => body.to_vec(),
        };
        let req = Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("request");
        let (status, answer) = h.rt.block_on(async {
            let res = h.router.clone().oneshot(req).await.expect("infallible");
            let status = res.status().as_u16();
            let bytes = res.into_body().collect().await.expect("body").to_bytes();
            (status, bytes)
        });
        let v: serde_json::Value = serde_json::from_slice(&answer)
            .unwrap_or_else(|e| panic!("{status}: answer is not JSON ({e}): {answer:?}"));
        match status {
            200 => assert!(v.is_object(), "{v}"),
            400 | 401 | 404 | 413 | 429 | 503 => {
                assert!(v["error"].is_string() && v["message"].is_string(), "{v}")
            }
            other => panic!("status {other}: {v}"),
        }
    });
});
