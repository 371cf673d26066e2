//! The admin API: `GET /v1/admin/stats` (its shape, its bounds), `POST /v1/admin/token` (a
//! token for the reserved admin room only) and the live snapshots in that room; with Redis,
//! every node listed.

use std::time::Duration;

use livepush_proto::{Message, ServerFrame};
use serde_json::{Value, json};

use crate::redis::node_with;
use crate::redis_server::Redis;
use crate::support::*;

/// Snapshots every 100 ms, so that tests see them promptly.
fn fast() -> livepush_server::Config {
    let mut c = config();
    c.limits.admin_interval = Duration::from_millis(100);
    c
}

/// The room's entry in a snapshot, if listed.
fn listed<'a>(stats: &'a Value, room: &str) -> Option<&'a Value> {
    stats["rooms"]
        .as_array()?
        .iter()
        .find(|r| r["room"] == room)
}

#[tokio::test]
async fn the_admin_api_needs_the_api_key_and_the_page_does_not() {
    let s = TestServer::start().await;
    for (method, path) in [
        (reqwest::Method::GET, "/v1/admin/stats"),
        (reqwest::Method::POST, "/v1/admin/token"),
    ] {
        let r = s
            .http
            .request(method.clone(), format!("{}{path}", s.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{method} {path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized", "{body}");
        let r = s
            .http
            .request(method, format!("{}{path}", s.url()))
            .bearer_auth("wrong-key-0123456789")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    for (path, ty) in [
        ("/admin", "text/html"),
        ("/admin/app.js", "text/javascript"),
        ("/admin/style.css", "text/css"),
    ] {
        let r = s.get_raw(path).await;
        assert_eq!(r.status(), 200, "{path}");
        let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ct.starts_with(ty), "{path}: {ct}");
    }
}

#[tokio::test]
async fn stats_show_the_node_and_each_room_with_its_online_count_history_and_flags() {
    let s = TestServer::start().await;
    let mut a = s.terminal("a", &["live:*"], false).await;
    joined(&a.join("live:1", None).await);
    for i in 0..3 {
        s.publish("live:1", "gift", json!({ "i": i })).await;
    }
    a.reliable(3).await;
    let (status, stats) = s.get("/v1/admin/stats").await;
    assert_eq!(status, 200, "{stats}");
    let nodes = stats["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "one node: {stats}");
    let node = &nodes[0];
    assert_eq!(node["id"], stats["node"]);
    assert_eq!(node["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(node["connections"]["ws"], 1, "{node}");
    assert_eq!(node["terminals"]["online"], 1, "{node}");
    assert_eq!(node["terminals"]["ws"], 1, "{node}");
    assert_eq!(node["published"]["reliable"], 3, "{node}");
    for field in [
        "slow_consumer_closes",
        "dropped_transient",
        "transient_deliveries",
        "uptime_s",
        "rooms_open",
    ] {
        assert!(node[field].is_u64(), "{field}: {node}");
    }
    for field in ["posted", "pending", "inboxes", "wakes_sent"] {
        assert!(node["inbox"][field].is_u64(), "inbox.{field}: {node}");
    }
    assert!(
        node.get("rooms").is_none(),
        "rooms are listed once, not per node"
    );
    let room = listed(&stats, "live:1").expect("the room is listed");
    assert_eq!(
        room,
        &json!({"room":"live:1","online":1,"seq":3,"history":3,"members":1,"closed":false,"muted":false})
    );
    assert_eq!(stats["rooms_listed"], 1);
    assert_eq!(stats["complete"], true);

    // Inbox backlog: two posts to an offline terminal's inbox.
    for _ in 0..2 {
        let (status, body) = s
            .post("/v1/terminals/away/messages", json!({"type":"n","data":{}}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (_, stats) = s.get("/v1/admin/stats").await;
    assert_eq!(stats["nodes"][0]["inbox"]["pending"], 2, "{stats}");
    assert_eq!(stats["nodes"][0]["inbox"]["posted"], 2, "{stats}");

    s.publish("live:1", "control", json!({"action":"mute"}))
        .await;
    s.eventually("the room shows muted", || async {
        let (_, stats) = s.get("/v1/admin/stats").await;
        listed(&stats, "live:1").is_some_and(|r| r["muted"] == true && r["seq"] == 4)
    })
    .await;
}

#[tokio::test]
async fn the_room_list_is_busiest_first_and_its_limit_is_bounded() {
    let mut c = config();
    c.limits.admin_rooms = 2;
    let s = TestServer::with(c).await;
    let mut terminals = Vec::new();
    for (room, viewers) in [("r:a", 1), ("r:b", 3), ("r:c", 2)] {
        for v in 0..viewers {
            let mut t = s.terminal(&format!("{room}-{v}"), &["r:*"], false).await;
            joined(&t.join(room, None).await);
            terminals.push(t);
        }
    }
    let ids = |stats: &Value| -> Vec<String> {
        stats["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["room"].as_str().unwrap().to_owned())
            .collect()
    };
    s.eventually("the busiest two, busiest first", || async {
        let (_, stats) = s.get("/v1/admin/stats").await;
        ids(&stats) == ["r:b", "r:c"]
    })
    .await;
    // Past admin_rooms: bounded to it.
    let (status, stats) = s.get("/v1/admin/stats?limit=1000").await;
    assert_eq!(status, 200);
    assert_eq!(ids(&stats), ["r:b", "r:c"]);
    let (_, stats) = s.get("/v1/admin/stats?limit=1").await;
    assert_eq!(ids(&stats), ["r:b"]);
    for bad in ["limit=0", "limit=-1", "limit=many", "rooms=3"] {
        let (status, body) = s.get(&format!("/v1/admin/stats?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"], "bad_request", "{bad}: {body}");
        assert!(body["message"].is_string(), "{bad}: {body}");
    }
}

#[tokio::test]
async fn the_admin_token_grants_the_admin_room_only_and_it_carries_live_snapshots() {
    let s = TestServer::with(fast()).await;
    let (status, minted) = s.post("/v1/admin/token", json!(null)).await;
    assert_eq!(status, 200, "{minted}");
    let room = minted["room"].as_str().unwrap().to_owned();
    assert_eq!(room, "_livepush.admin");
    assert_eq!(minted["interval_ms"], 100);
    let ttl = minted["ttl_s"].as_u64().unwrap();
    assert!(ttl > 0 && ttl <= 600, "{minted}");

    // A wildcard grant does not reach the admin room.
    let mut viewer = s.terminal("viewer", &["*"], true).await;
    viewer.send(json!({"op":"join","room":room.as_str()})).await;
    viewer.expect_error("forbidden").await;
    joined(&viewer.join("live:9", None).await);

    let mut admin = Ws::open(&s.ws_url()).await;
    admin
        .send(json!({"op":"connect","token":minted["token"],"client":"test/1"}))
        .await;
    match admin.next().await {
        ServerFrame::Connected { terminal, .. } => assert_eq!(terminal, minted["terminal"]),
        other => panic!("expected connected, got {other:?}"),
    }
    // Only the admin room, and no sending.
    admin.send(json!({"op":"join","room":"live:9"})).await;
    admin.expect_error("forbidden").await;
    joined(&admin.join(&room, None).await);
    admin
        .send(json!({"op":"send","room":room.as_str(),"type":"chat","data":{}}))
        .await;
    admin.expect_error("forbidden").await;
    let (_, stats) = s.get("/v1/admin/stats").await;
    assert_eq!(
        stats["nodes"][0]["rooms_open"], 1,
        "the admin room aside: {stats}"
    );

    // Snapshots arrive by themselves, and follow the room's online count.
    let mut seen_two = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut second = None;
    while tokio::time::Instant::now() < deadline {
        let ServerFrame::Msg(Message { ty, data, seq, .. }) = admin.next().await else {
            continue;
        };
        assert_eq!(ty, "stats");
        assert_eq!(seq, None, "snapshots are transient");
        assert!(
            listed(&data, &room).is_none(),
            "the admin room is not listed"
        );
        match listed(&data, "live:9").map(|r| r["online"].as_u64()) {
            Some(Some(1)) if second.is_none() => {
                let mut t = s.terminal("second", &["live:*"], false).await;
                joined(&t.join("live:9", None).await);
                second = Some(t);
            }
            Some(Some(2)) => {
                seen_two = true;
                break;
            }
            _ => {}
        }
    }
    assert!(seen_two, "a snapshot shows the second viewer");
}

#[tokio::test]
async fn the_admin_interval_and_room_bound_must_not_be_zero() {
    let mut c = config();
    c.limits.admin_interval = Duration::ZERO;
    assert!(livepush_server::start(c).await.is_err());
    let mut c = config();
    c.limits.admin_rooms = 0;
    assert!(livepush_server::start(c).await.is_err());
}

/// Two nodes on one Redis: each lists both, and the rooms of the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_every_node_is_listed_on_every_node() {
    let redis = Redis::start();
    let a = node_with(&redis, "adm", fast()).await;
    let b = node_with(&redis, "adm", fast()).await;
    let mut t = b.terminal("on-b", &["live:*"], false).await;
    joined(&t.join("live:b", None).await);
    let (_, mine) = a.get("/v1/admin/stats").await;
    let a_id = mine["node"].as_str().unwrap().to_owned();
    let (_, theirs) = b.get("/v1/admin/stats").await;
    let b_id = theirs["node"].as_str().unwrap().to_owned();
    assert_ne!(a_id, b_id);
    let mut expected = vec![a_id.clone(), b_id.clone()];
    expected.sort();
    a.eventually("node a lists both nodes and node b's room", || async {
        let (_, stats) = a.get("/v1/admin/stats").await;
        let ids: Vec<&str> = stats["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["id"].as_str())
            .collect();
        ids == expected && listed(&stats, "live:b").is_some_and(|r| r["online"] == 1)
    })
    .await;
    // A node that stops leaves the list (its record expires).
    drop(t);
    b.running.shutdown().await;
    a.eventually("node b leaves the list", || async {
        let (_, stats) = a.get("/v1/admin/stats").await;
        stats["nodes"].as_array().is_some_and(|n| n.len() == 1) && stats["complete"] == true
    })
    .await;
}

/// Without Redis, a node still answers with its own figures, marked incomplete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_a_node_shows_itself_alone() {
    let mut redis = Redis::start();
    let a = node_with(&redis, "adm-down", fast()).await;
    let (_, stats) = a.get("/v1/admin/stats").await;
    assert_eq!(stats["complete"], true, "{stats}");
    redis.kill();
    a.eventually("an incomplete snapshot of this node", || async {
        let (status, stats) = a.get("/v1/admin/stats").await;
        status == 200
            && stats["complete"] == false
            && stats["nodes"].as_array().is_some_and(|n| n.len() == 1)
            && stats["nodes"][0]["id"] == stats["node"]
    })
    .await;
}
