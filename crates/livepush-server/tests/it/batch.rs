//! `POST /v1/publish`: batch publish (contract v1.1).

use livepush_proto::ServerFrame;
use serde_json::json;

use crate::support::*;

/// One answer per message, in order: a seq for each reliable one (consecutive per room, as
/// given), `{}` for a transient one, an error for a refused one, which does not stop the
/// others; members get the messages in order.
#[tokio::test]
async fn a_batch_answers_each_message_in_order() {
    let s = TestServer::start().await;
    let mut t = s.terminal("viewer", &["a", "b"], false).await;
    joined(&t.join("a", None).await);
    let deep: serde_json::Value =
        serde_json::from_str(&format!("{}1{}", "[".repeat(40), "]".repeat(40))).unwrap();
    let (status, body) = s
        .post(
            "/v1/publish",
            json!({"messages":[
                {"room":"a","type":"gift","data":1},
                {"room":"b","type":"gift","data":2},
                {"room":"a","type":"chat","data":"hi","class":"transient"},
                {"room":"bad room!","type":"gift","data":3},
                {"room":"a","type":"gift"},
                {"room":"a","type":"gift","data":deep},
                {"room":"a","type":"gift","data":4},
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let r = body["results"].as_array().expect("results");
    assert_eq!(r.len(), 7, "{body}");
    assert_eq!(
        (r[0]["seq"].as_u64(), r[1]["seq"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(r[0]["epoch"].is_string());
    assert_eq!(r[2], json!({}));
    assert_eq!(r[3]["error"], "bad_request", "{body}");
    assert_eq!(r[4]["error"], "bad_request", "{body}");
    assert!(r[4]["message"].as_str().unwrap().contains("data"), "{body}");
    assert_eq!(r[5]["error"], "bad_request", "{body}");
    assert!(
        r[5]["message"].as_str().unwrap().contains("max_json_depth"),
        "{body}"
    );
    assert_eq!(r[6]["seq"], 2);
    // Room a's member: 1, the transient chat, then 2.
    let mut got = Vec::new();
    while got.len() < 3 {
        if let ServerFrame::Msg(m) = t.next().await {
            got.push((m.seq, m.ty));
        }
    }
    assert_eq!(
        got,
        [
            (Some(1), "gift".to_owned()),
            (None, "chat".to_owned()),
            (Some(2), "gift".to_owned())
        ]
    );
}

/// Too many messages or bytes: the whole request is refused with 413, nothing published.
#[tokio::test]
async fn a_batch_over_its_limits_is_refused_whole() {
    let mut c = config();
    c.limits.max_batch_messages = 2;
    c.limits.max_batch_bytes = 200;
    let s = TestServer::with(c).await;
    let m = json!({"room":"r","type":"gift","data":1});
    let (status, body) = s.post("/v1/publish", json!({"messages":[m, m, m]})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("too_large")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("max_batch_messages")
    );
    let big = json!({"room":"r","type":"gift","data":"x".repeat(300)});
    let (status, body) = s.post("/v1/publish", json!({"messages":[big]})).await;
    assert_eq!(status, 413, "{body}");
    let (status, _) = s.get("/v1/rooms/r").await;
    assert_eq!(status, 404, "nothing was published");
    let (status, body) = s.post("/v1/publish", json!({"msgs":[]})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
}
