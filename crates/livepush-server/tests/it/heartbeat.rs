//! Dead peers are found by heartbeat and leave their rooms.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test]
async fn silent_peer_is_closed_and_leaves_the_online_count() {
    let mut c = config();
    c.heartbeat = Duration::from_millis(200);
    c.heartbeat_timeout = Duration::from_millis(200);
    let s = TestServer::with(c).await;

    let mut live = s.terminal("live", &["h"], false).await;
    live.join("h", None).await;
    let mut silent = s.terminal("silent", &["h"], false).await;
    silent.join("h", None).await;
    assert_eq!(s.room("h").await["online"], 2);

    // `silent` stops reading: tungstenite answers pings only while it is read, so the server
    // hears nothing from it. `live` keeps reading (and so answers pings).
    let keep = tokio::spawn(async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(3), live.inner.next()).await {
                Ok(Some(Ok(_))) => continue,
                _ => return live,
            }
        }
    });
    s.eventually("the silent peer to leave", || async {
        s.room("h").await["online"] == json!(1)
    })
    .await;
    // Its socket was closed by the server: reading now yields the close or the end.
    let mut saw_close = false;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), silent.inner.next()).await
    {
        match m {
            Ok(Message::Close(Some(c))) => {
                assert_eq!(u16::from(c.code), 4000);
                saw_close = true;
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    assert!(saw_close, "the server sent a heartbeat_timeout close");
    // The answering peer is still there after several heartbeats.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(s.room("h").await["online"], 1);
    keep.abort();
}
