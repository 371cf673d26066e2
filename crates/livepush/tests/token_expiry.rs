//! The Rust SDK when the server ends its session because the token expired: it reports the
//! refusal, and once the app gives it a fresh token it reconnects and resumes every room,
//! losing nothing reliable.

mod support;

use std::time::Duration;

use livepush_client::{Client, Event};
use livepush_proto::ErrorCode;
use livepush_server::auth::{Claims, TokenKeys, now_secs};
use serde_json::json;
use support::{SECRET, TestServer, fast_client, next_event, token};
use tokio::time::Instant;

/// The next event that `pick` accepts, skipping the others; fails at `deadline`.
async fn until<T>(
    events: &mut livepush_client::Events,
    deadline: Instant,
    what: &str,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> T {
    loop {
        let e = next_event(events, deadline, what).await;
        if let Some(t) = pick(&e) {
            return t;
        }
    }
}

#[tokio::test]
async fn the_sdk_resumes_with_a_fresh_token_after_its_token_expired() {
    let server = TestServer::start().await;
    let mut config = fast_client(server.url(), "viewer");
    // Accepted for about two more seconds: `exp` three seconds ago, within the leeway.
    let expiring = TokenKeys::new(SECRET)
        .mint(&Claims {
            sub: "viewer".into(),
            exp: now_secs() - 3,
            rooms: vec!["live:*".into()],
            send: false,
        })
        .expect("mint");
    config.token = Some(expiring);
    let (client, mut events) = Client::connect(config).expect("client");
    client.join("live:1", None).await.expect("join");
    let deadline = Instant::now() + Duration::from_secs(20);
    until(&mut events, deadline, "joined", |e| {
        matches!(e, Event::Joined { .. }).then_some(())
    })
    .await;
    server.api.publish("live:1", "gift", json!({"n": 1})).await;
    // The session ends when the token expires; the client says so. The app then publishes
    // one more gift and hands over a fresh token: the client resumes with it.
    let mut refused = None;
    let mut seqs = Vec::new();
    while seqs.len() < 2 {
        match next_event(&mut events, deadline, "the expiry, then both gifts").await {
            Event::Error { code, message, .. }
                if code == ErrorCode::Unauthorized && refused.is_none() =>
            {
                refused = Some(message);
                server.api.publish("live:1", "gift", json!({"n": 2})).await;
                client
                    .set_token(Some(token("viewer", &["live:*"], false)))
                    .await
                    .expect("set_token");
            }
            Event::Message(m) => seqs.push(m.seq),
            e @ Event::Joined {
                recovered: false, ..
            } => panic!("the resume lost messages: {e:?}"),
            _ => {}
        }
    }
    assert_eq!(seqs, [1, 2]);
    let refused = refused.expect("the expiry was reported before the second gift");
    assert!(refused.contains("token expired"), "{refused}");
}
