//! Dead peers are found by heartbeat and leave their rooms.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::MaybeTlsStream;

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
    // Its socket was closed by the server, behind a close frame with 4000. Read the raw
    // bytes: tungstenite would answer the pings queued before it, and a pong written to the
    // closed socket draws a reset that can hide the close frame behind an error.
    let MaybeTlsStream::Plain(tcp) = silent.inner.get_mut() else {
        panic!("a plain TCP test connection");
    };
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut raw))
        .await
        .expect("the server closes the connection")
        .expect("read until the end");
    let close_4000 = raw
        .windows(4)
        .any(|w| w[0] == 0x88 && w[1] >= 2 && w[1] < 126 && w[2..4] == 4000u16.to_be_bytes());
    assert!(
        close_4000,
        "the server sent a heartbeat_timeout close: {raw:?}"
    );
    // The answering peer is still there after several heartbeats.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(s.room("h").await["online"], 1);
    keep.abort();
}
