//! A store whose commits fail (a full disk): nothing of a failed commit is delivered or shown,
//! the publisher gets a JSON error, and the room moves to a new epoch.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use livepush_proto::ServerFrame;
use serde_json::json;

use crate::faulty::FaultyStore;
use crate::support::*;

#[tokio::test]
async fn a_failed_commit_is_answered_with_an_error_and_never_delivered_nor_shown() {
    let store = Arc::new(FaultyStore::default());
    let s = TestServer::with_store(store.clone()).await;
    let mut a = s.terminal("a", &["r"], false).await;
    a.join("r", None).await;
    let first = s.publish("r", "gift", json!({"n": 1})).await;
    let old = first["epoch"].as_str().unwrap().to_owned();
    assert_eq!(a.reliable(1).await, [1]);

    store.full.store(true, Ordering::SeqCst);
    let (status, body) = s
        .post(
            "/v1/rooms/r/messages",
            json!({"type":"gift","data":{"n":2}}),
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (500, Some("internal")));
    store.full.store(false, Ordering::SeqCst);

    // Not shown by the history API: the room is in a new epoch with nothing in it.
    let (status, history) = s.get("/v1/rooms/r/history").await;
    assert_eq!(status, 200);
    let new = history["epoch"].as_str().unwrap().to_owned();
    assert_ne!(new, old, "{history}");
    assert_eq!(history["messages"], json!([]), "{history}");
    // A client resuming from before the failure is told it did not recover.
    let mut b = s.terminal("b", &["r"], false).await;
    let (epoch, seq, recovered) = joined(&b.join("r", Some((&old, 1))).await);
    assert_eq!((epoch.as_str(), seq, recovered), (new.as_str(), 0, false));
    // The member never got the failed message: the next thing it sees is the new epoch's
    // first message.
    let third = s.publish("r", "gift", json!({"n": 3})).await;
    assert_eq!(
        (third["epoch"].as_str(), third["seq"].as_u64()),
        (Some(&*new), Some(1))
    );
    loop {
        match a.next_significant().await {
            ServerFrame::Msg(m) => {
                assert_eq!((m.seq, m.data["n"].as_u64()), (Some(1), Some(3)));
                break;
            }
            ServerFrame::Joined { epoch, .. } => assert_eq!(epoch, new),
            other => panic!("{other:?}"),
        }
    }
}

/// The embedded store's commits are timed for `/metrics` (the store's share of a publish).
#[tokio::test]
async fn store_commits_are_timed() {
    let dir = tempfile::tempdir().unwrap();
    let store = livepush_server::store::RedbStore::open(
        dir.path(),
        livepush_server::store::DurabilityPolicy::Sync,
    )
    .unwrap();
    let s = TestServer::with_store(Arc::new(store)).await;
    s.publish("r", "gift", json!({"n": 1})).await;
    let metrics = s.get_raw_with_key("/metrics").await;
    assert!(
        metrics.contains("livepush_store_commit_seconds_count"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("livepush_store_commit_seconds_count 0"),
        "{metrics}"
    );
}
