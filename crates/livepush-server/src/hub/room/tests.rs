use super::*;
use crate::outbox::{Batch, OutboxLimits};
use crate::store::StoredMessage;
use livepush_proto::encode_msg;
use proptest::prelude::*;
use serde_json::value::RawValue;

/// A room opened at the start of epoch `ep`, as the engine's first snapshot opens it.
fn opened(r: Room) -> Room {
    let s = Snapshot {
        epoch: Arc::from("ep"),
        seq: 0,
        flags: RoomFlags::default(),
        online: 0,
        history: vec![],
    };
    assert_eq!(r.open(s, false, retention(1000)), None);
    r
}

fn retention(max: usize) -> Retention {
    Retention {
        max_messages: max,
        ttl: Duration::from_secs(3600),
    }
}

fn room(max: usize) -> (Room, Retention) {
    (
        opened(Room::loading(Arc::from("r"), MergeWindow::default())),
        retention(max),
    )
}

/// The engine hands the room its next reliable message.
fn deliver(r: &Room, ret: Retention, ty: &str, data: &RawValue, action: Option<Action>) -> u64 {
    let seq = r.info().seq + 1;
    let ts = 1_000 + seq;
    let m = StoredMessage {
        seq,
        ts,
        frame: encode_msg(&r.id, ty, data, Some(seq), ts),
    };
    assert_eq!(
        r.on_reliable("ep", m, action, ret),
        None,
        "in order: nothing to ask"
    );
    seq
}

fn publish(r: &Room, ret: Retention, n: u64) {
    let data = RawValue::from_string(format!("{n}")).unwrap();
    deliver(r, ret, "gift", &data, None);
}

fn member(soft: usize) -> Member {
    Member {
        terminal: Arc::from("t"),
        outbox: Arc::new(Outbox::new(
            OutboxLimits {
                soft_frames: soft,
                hard_bytes: 1 << 24,
            },
            Arc::default(),
        )),
    }
}

fn resume(r: &Room, conn: ConnId, m: &Member, epoch: &str, seq: u64) -> Joined {
    let since = Position {
        epoch: epoch.into(),
        seq,
    };
    r.join(conn, m.clone(), Some(&since), None, Announce::Always)
        .unwrap()
}

fn seqs(m: &Member) -> (Vec<u64>, Vec<ServerFrame>) {
    let Batch::Frames(frames) = m.outbox.take(usize::MAX) else {
        panic!("closed")
    };
    let parsed: Vec<ServerFrame> = frames
        .iter()
        .flat_map(Frame::parts)
        .map(|f| ServerFrame::parse(std::str::from_utf8(f).unwrap()).unwrap())
        .collect();
    let s = parsed
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Msg(m) => m.seq,
            _ => None,
        })
        .collect();
    (s, parsed)
}

#[test]
fn resume_replays_exactly_what_was_missed() {
    let (r, ret) = room(100);
    for n in 0..10 {
        publish(&r, ret, n);
    }
    let m = member(1000);
    let j = resume(&r, 1, &m, "ep", 4);
    assert!(j.recovered);
    publish(&r, ret, 10);
    let (s, _) = seqs(&m);
    assert_eq!(s, (5..=11).collect::<Vec<_>>());
}

#[test]
fn overflow_and_epoch_mismatch_are_not_recovered() {
    let (r, ret) = room(5);
    for n in 0..10 {
        publish(&r, ret, n);
    }
    let m = member(1000);
    let j = resume(&r, 1, &m, "ep", 2);
    assert!(!j.recovered);
    assert_eq!(seqs(&m).0, vec![6, 7, 8, 9, 10]);
    let m2 = member(1000);
    let j = resume(&r, 2, &m2, "old", 9);
    assert!(!j.recovered);
    assert_eq!(seqs(&m2).0, vec![6, 7, 8, 9, 10]);
    // Exactly at the edge of what is kept: recovered.
    let m3 = member(1000);
    let j = resume(&r, 3, &m3, "ep", 5);
    assert!(j.recovered);
    // Ahead of the server: not recovered, no replay.
    let m4 = member(1000);
    let j = resume(&r, 4, &m4, "ep", 50);
    assert!(!j.recovered);
    assert!(seqs(&m4).0.is_empty());
}

#[test]
fn big_replay_is_cut_and_prompted() {
    let (r, ret) = room(100);
    for n in 0..20 {
        publish(&r, ret, n);
    }
    let m = member(5);
    let j = resume(&r, 1, &m, "ep", 0);
    assert!(j.prompted);
    let (s, frames) = seqs(&m);
    assert_eq!(s, vec![1, 2, 3, 4]);
    assert!(matches!(
        frames.last(),
        Some(ServerFrame::Prompt { seq: 20, .. })
    ));
}

/// A soft limit the `joined` alone fills still lets a replay carry its first message: an SSE
/// stream, which cannot pull and resumes by joining again, must move forward at every join.
#[test]
fn a_replay_carries_its_first_message_past_the_soft_limit() {
    let (r, ret) = room(100);
    for n in 0..3 {
        publish(&r, ret, n);
    }
    let m = member(1);
    let j = resume(&r, 1, &m, "ep", 0);
    assert!(j.prompted);
    assert_eq!(j.replayed, 1);
    let (s, frames) = seqs(&m);
    assert_eq!(s, vec![1]);
    assert!(matches!(
        frames.last(),
        Some(ServerFrame::Prompt { seq: 3, .. })
    ));
}

#[test]
fn close_sends_left_and_refuses_joins() {
    let (r, ret) = room(100);
    let m = member(100);
    r.join(1, m.clone(), None, None, Announce::Always).unwrap();
    let data = RawValue::from_string(r#"{"action":"close"}"#.into()).unwrap();
    deliver(&r, ret, "control", &data, Some(Action::Close));
    let (s, frames) = seqs(&m);
    assert_eq!(s, vec![1]);
    assert!(matches!(frames.last(), Some(ServerFrame::Left { .. })));
    assert_eq!(
        r.join(2, member(10), None, None, Announce::Always)
            .unwrap_err(),
        JoinError::Closed
    );
    assert_eq!(r.info().online, 0);
}

#[test]
fn only_an_idle_room_retires_and_then_refuses_joins() {
    let (r, ret) = room(10);
    let m = member(10);
    r.join(1, m.clone(), None, None, Announce::Always).unwrap();
    let t = r.tick(1_000, ret);
    assert_eq!((t.idle, t.idle_ms), (false, 0));
    assert!(!r.retire(), "a room with a member stays");
    r.leave(1);
    assert_eq!(r.tick(2_000, ret).idle_ms, 0, "idle from this tick on");
    assert_eq!(r.tick(2_500, ret).idle_ms, 500);
    assert!(r.retire());
    assert!(r.is_retired());
    assert_eq!(
        r.join(2, member(10), None, None, Announce::Always)
            .unwrap_err(),
        JoinError::Retired,
        "a join that found the retired object is told to look again"
    );
}

#[test]
fn online_counts_unique_terminals() {
    let (r, ret) = room(10);
    let a = member(10);
    let b = member(10); // same terminal "t", second connection
    r.join(1, a.clone(), None, None, Announce::Always).unwrap();
    r.join(2, b, None, None, Announce::Always).unwrap();
    assert_eq!(r.info().online, 1);
    assert!(r.tick(0, ret).online_broadcast);
    assert!(
        !r.tick(0, ret).online_broadcast,
        "unchanged count is not resent"
    );
    r.leave(1);
    assert_eq!(r.info().online, 1);
    r.leave(2);
    assert_eq!(r.info().online, 0);
}

// --- The merge window -------------------------------------------------------------------

/// Long enough that the window's timer never fires in a test that does not wait for it:
/// these tests flush by hand, as the timer would.
const HOUR: Duration = Duration::from_secs(3600);

fn merging(window: Duration, max_bytes: usize) -> (Room, Retention, MergeStats) {
    let stats = MergeStats::default();
    let r = opened(Room::loading(
        Arc::from("r"),
        MergeWindow {
            window,
            max_bytes,
            stats: stats.clone(),
        },
    ));
    let ret = Retention {
        max_messages: 1000,
        ttl: HOUR,
    };
    (r, ret, stats)
}

/// What the window's timer does.
fn flush(r: &Room) {
    r.state.lock().flush_merged(&r.id);
}

fn chat(r: &Room, text: &str) -> usize {
    let data = RawValue::from_string(format!("{text:?}")).unwrap();
    r.broadcast_transient(&Frame::transient(encode_msg(&r.id, "chat", &data, None, 1)))
}

fn raw(m: &Member) -> Vec<Frame> {
    let Batch::Frames(frames) = m.outbox.take(usize::MAX) else {
        panic!("closed")
    };
    frames
}

/// Everything queued to a member, one entry per push, each split into its frames.
fn pushes(m: &Member) -> Vec<Vec<ServerFrame>> {
    raw(m).iter().map(pushes_of).collect()
}

/// The seqs of a push (`0` for a transient message), `None` for anything but messages.
fn msgs(push: &[ServerFrame]) -> Option<Vec<u64>> {
    push.iter()
        .map(|f| match f {
            ServerFrame::Msg(m) => Some(m.seq.unwrap_or(0)),
            _ => None,
        })
        .collect()
}

fn joined_fresh(r: &Room, conn: ConnId, m: &Member) {
    r.join(conn, m.clone(), None, None, Announce::Always)
        .unwrap();
    let got = pushes(m);
    assert!(matches!(got[..], [ref p] if matches!(p[..], [ServerFrame::Joined { .. }])));
}

#[tokio::test]
async fn merge_window_pushes_one_chunk_per_window() {
    let (r, ret, stats) = merging(HOUR, 1 << 16);
    let a = member(100);
    joined_fresh(&r, 1, &a);
    publish(&r, ret, 1);
    publish(&r, ret, 2);
    assert_eq!(chat(&r, "hi"), 1, "gathered for the one member");
    publish(&r, ret, 3);
    assert!(
        raw(&a).is_empty(),
        "nothing is pushed before the window ends"
    );
    assert_eq!(r.info().seq, 3, "but the messages are delivered");
    flush(&r);
    let got = pushes(&a);
    assert_eq!(got.len(), 1, "one push: {got:?}");
    assert_eq!(msgs(&got[0]), Some(vec![1, 2, 0, 3]));
    assert_eq!((stats.flushes.get(), stats.frames.get()), (1, 4));
    flush(&r);
    assert!(raw(&a).is_empty());
    assert_eq!(stats.flushes.get(), 1, "an empty buffer is not pushed");
}

#[tokio::test]
async fn the_window_timer_flushes() {
    let (r, ret, _) = merging(Duration::from_millis(20), 1 << 16);
    let a = member(100);
    joined_fresh(&r, 1, &a);
    for round in 0..2u64 {
        publish(&r, ret, 2 * round + 1);
        publish(&r, ret, 2 * round + 2);
        assert!(r.state.lock().merged.scheduled);
        assert!(raw(&a).is_empty());
        tokio::time::timeout(Duration::from_secs(10), a.outbox.ready())
            .await
            .expect("flushed by the timer");
        let got = pushes(&a);
        assert_eq!(got.len(), 1);
        assert_eq!(msgs(&got[0]), Some(vec![2 * round + 1, 2 * round + 2]));
        assert!(!r.state.lock().merged.scheduled);
    }
}

#[test]
fn without_a_runtime_the_window_pushes_at_once() {
    let (r, ret, _) = merging(HOUR, 1 << 16);
    let a = member(100);
    joined_fresh(&r, 1, &a);
    publish(&r, ret, 1);
    assert_eq!(msgs(&pushes(&a)[0]), Some(vec![1]));
}

#[tokio::test]
async fn nothing_is_gathered_without_members() {
    let (r, ret, _) = merging(HOUR, 1 << 16);
    publish(&r, ret, 1);
    assert_eq!(chat(&r, "nobody"), 0);
    assert!(r.state.lock().merged.frames.is_empty());
    assert!(!r.state.lock().merged.scheduled);
}

#[tokio::test]
async fn a_join_mid_window_flushes_first_and_gets_nothing_twice() {
    let (r, ret, _) = merging(HOUR, 1 << 16);
    let a = member(100);
    joined_fresh(&r, 1, &a);
    for n in 1..=3 {
        publish(&r, ret, n);
    }
    // Resuming from 0: the replay has 1..3, and the flush must not send them again.
    let b = member(100);
    assert!(resume(&r, 2, &b, "ep", 0).recovered);
    let got_a = pushes(&a);
    assert_eq!(got_a.len(), 1);
    assert_eq!(msgs(&got_a[0]), Some(vec![1, 2, 3]), "flushed by the join");
    // A fresh join mid-window starts after the latest seq, with nothing of the buffer.
    publish(&r, ret, 4);
    let c = member(100);
    r.join(3, c.clone(), None, None, Announce::Always).unwrap();
    publish(&r, ret, 5);
    flush(&r);
    assert_eq!(seqs(&a).0, vec![4, 5]);
    assert_eq!(seqs(&b).0, vec![1, 2, 3, 4, 5]);
    let (s, frames) = seqs(&c);
    assert!(matches!(frames[0], ServerFrame::Joined { seq: 4, .. }));
    assert_eq!(s, vec![5]);
}

#[tokio::test]
async fn a_pull_mid_window_queues_the_live_copies_first() {
    let (r, ret, _) = merging(HOUR, 1 << 16);
    let a = member(100);
    joined_fresh(&r, 1, &a);
    publish(&r, ret, 1);
    publish(&r, ret, 2);
    // As the session does: compute the answer, then queue it.
    a.outbox.push(r.pulled(0, 100, 1 << 20, Some(7)));
    let got = pushes(&a);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(msgs(&got[0]), Some(vec![1, 2]));
    assert!(
        matches!(&got[1][..], [ServerFrame::Pulled { seq: 2, messages, .. }] if messages.len() == 2)
    );
    // The history API reads without flushing (no member is involved).
    publish(&r, ret, 3);
    assert_eq!(r.page(0, 100, 1 << 20).messages.len(), 3);
    assert!(raw(&a).is_empty());
}

#[tokio::test]
async fn a_leave_mid_window_hands_the_leaver_what_was_gathered() {
    let (r, ret, _) = merging(HOUR, 1 << 16);
    let a = member(100);
    let b = member(100);
    joined_fresh(&r, 1, &a);
    joined_fresh(&r, 2, &b);
    publish(&r, ret, 1);
    chat(&r, "x");
    assert!(r.leave(1));
    let got = pushes(&a);
    assert_eq!(got.len(), 1);
    assert_eq!(msgs(&got[0]), Some(vec![1, 0]));
    assert!(raw(&b).is_empty(), "the others keep gathering");
    publish(&r, ret, 2);
    flush(&r);
    assert!(raw(&a).is_empty(), "nothing after the leave");
    let got = pushes(&b);
    assert_eq!(got.len(), 1);
    assert_eq!(msgs(&got[0]), Some(vec![1, 0, 2]));
}

#[tokio::test]
async fn a_close_mid_window_pushes_the_messages_before_left() {
    let (r, ret, _) = merging(HOUR, 1 << 16);
    let a = member(100);
    joined_fresh(&r, 1, &a);
    publish(&r, ret, 1);
    let data = RawValue::from_string(r#"{"action":"close"}"#.into()).unwrap();
    deliver(&r, ret, "control", &data, Some(Action::Close));
    // No flush by hand: the control command pushed everything at once.
    let got = pushes(&a);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(msgs(&got[0]), Some(vec![1, 2]));
    assert!(matches!(got[1][..], [ServerFrame::Left { .. }]));
    assert!(r.state.lock().merged.frames.is_empty());
    assert_eq!(
        r.join(2, member(10), None, None, Announce::Always)
            .unwrap_err(),
        JoinError::Closed
    );
}

#[tokio::test]
async fn chunks_stay_within_the_byte_cap() {
    let data = RawValue::from_string("1".into()).unwrap();
    let frame_len = encode_msg("r", "gift", &data, Some(1), 1_001).len();
    // Exactly two frames (and their separator) fill a chunk.
    let cap = 2 * frame_len + 1;
    let (r, ret, _) = merging(HOUR, cap);
    let a = member(100);
    joined_fresh(&r, 1, &a);
    for n in 1..=5 {
        publish(&r, ret, n);
    }
    flush(&r);
    let got = raw(&a);
    assert!(got.iter().all(|c| c.len() <= cap));
    let chunks: Vec<_> = got.iter().map(|c| msgs(&pushes_of(c)).unwrap()).collect();
    assert_eq!(chunks, vec![vec![1, 2], vec![3, 4], vec![5]]);

    // A frame larger than the cap goes alone, at once.
    let (r, ret, _) = merging(HOUR, 10);
    let a = member(100);
    joined_fresh(&r, 1, &a);
    publish(&r, ret, 1);
    publish(&r, ret, 2);
    let chunks: Vec<_> = pushes(&a).iter().map(|p| msgs(p).unwrap()).collect();
    assert_eq!(chunks, vec![vec![1], vec![2]]);
}

fn pushes_of(chunk: &Frame) -> Vec<ServerFrame> {
    chunk
        .parts()
        .map(|l| ServerFrame::parse(std::str::from_utf8(l).unwrap()).unwrap())
        .collect()
}

#[tokio::test]
async fn merged_chunks_keep_the_soft_limit_rules() {
    let stats = MergeStats::default();
    let merge = MergeWindow {
        window: HOUR,
        max_bytes: 1 << 16,
        stats,
    };
    // A ring of one chunk: a member that has not read the last chunk when the next one is
    // pushed has fallen behind.
    let ring = OutboxLimits {
        soft_frames: 1,
        hard_bytes: 1 << 20,
    };
    let r = opened(Room::loading_with(Arc::from("r"), merge, ring, None));
    let ret = retention(1000);
    let a = member(1);
    r.join(1, a.clone(), None, None, Announce::Always).unwrap();
    // Transient only: dropped as a whole.
    chat(&r, "a");
    chat(&r, "b");
    flush(&r);
    // With reliable messages: folded into a prompt up to the highest of them.
    publish(&r, ret, 1);
    chat(&r, "c");
    publish(&r, ret, 2);
    chat(&r, "d");
    flush(&r);
    chat(&r, "e");
    flush(&r);
    let got = pushes(&a);
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(matches!(got[0][..], [ServerFrame::Joined { .. }]));
    assert!(matches!(got[1][..], [ServerFrame::Prompt { seq: 2, .. }]));
    // What is still in the ring arrives; a transient-only chunk is `Transient`.
    assert_eq!(msgs(&got[2]), Some(vec![0]));
    // Read up: the next chunk arrives whole.
    publish(&r, ret, 3);
    flush(&r);
    assert_eq!(msgs(&pushes(&a)[0]), Some(vec![3]));
}

#[derive(Debug, Clone)]
enum Op {
    Publish,
    Chat,
    Flush,
    /// Join a new member, resuming from `since % (latest + 1)`, or fresh.
    Join(Option<u64>),
    /// Leave the `n % members`-th member still in the room.
    Leave(usize),
    /// Pull as the `n % members`-th member (the answer is not examined).
    Pull(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Publish),
        2 => Just(Op::Chat),
        2 => Just(Op::Flush),
        2 => proptest::option::of(0u64..1000).prop_map(Op::Join),
        1 => (0usize..100).prop_map(Op::Leave),
        1 => (0usize..100).prop_map(Op::Pull),
    ]
}

proptest! {
    // With the merge window on, any interleaving of publishes, transient messages, window
    // ends, joins (fresh or resuming), leaves and pulls gives every member each reliable
    // message of its membership exactly once, in order, and nothing from before it.
    #[test]
    fn merge_window_keeps_exactly_once(ops in proptest::collection::vec(op(), 1..80), cap in 40usize..400) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        // Timers are scheduled on this runtime but never run: `Op::Flush` is the window end.
        let _rt = rt.enter();
        let (r, ret, _) = merging(HOUR, cap);
        // (conn, member, first expected seq, last expected seq once left)
        let mut members: Vec<(ConnId, Member, u64, Option<u64>)> = Vec::new();
        let mut latest = 0;
        for (i, op) in ops.into_iter().enumerate() {
            let conn = i as ConnId + 1;
            let here: Vec<usize> = (0..members.len()).filter(|&k| members[k].3.is_none()).collect();
            match op {
                Op::Publish => {
                    latest += 1;
                    publish(&r, ret, latest);
                }
                Op::Chat => {
                    chat(&r, "c");
                }
                Op::Flush => flush(&r),
                Op::Join(since) => {
                    let m = member(1 << 20);
                    let first = match since {
                        Some(s) => {
                            let s = s % (latest + 1);
                            prop_assert!(resume(&r, conn, &m, "ep", s).recovered);
                            s + 1
                        }
                        None => {
                            r.join(conn, m.clone(), None, None, Announce::Always).unwrap();
                            latest + 1
                        }
                    };
                    members.push((conn, m, first, None));
                }
                Op::Leave(n) if !here.is_empty() => {
                    let k = here[n % here.len()];
                    prop_assert!(r.leave(members[k].0));
                    members[k].3 = Some(latest);
                }
                Op::Pull(n) if !here.is_empty() => {
                    // Like the session: the answer is queued after the pull returns.
                    let k = here[n % here.len()];
                    members[k].1.outbox.push(r.pulled(0, 1, 1 << 20, None));
                }
                Op::Leave(_) | Op::Pull(_) => {}
            }
        }
        flush(&r);
        for (conn, m, first, last) in &members {
            let want: Vec<u64> = (*first..=last.unwrap_or(latest)).collect();
            let (got, frames) = seqs(m);
            prop_assert_eq!(got, want, "member {}", conn);
            // A pull answer (`seq` = the latest seq when it was made) comes after the
            // live copies of every message up to that seq: it never overtakes them.
            let mut seen = first - 1;
            for f in &frames {
                match f {
                    ServerFrame::Msg(livepush_proto::Message { seq: Some(s), .. }) => seen = *s,
                    ServerFrame::Pulled { seq, .. } => prop_assert_eq!(seen, *seq, "member {}", conn),
                    _ => {}
                }
            }
        }
    }
}

proptest! {
    // The history ring: for any sequence of publishes, joins from any position, and any
    // retention, a join's replay is exactly the kept messages after `since`, contiguous and
    // in order, and `recovered` is true exactly when none after `since` is missing.
    #[test]
    fn history_ring(n in 0u64..60, max in 1usize..30, since in 0u64..70) {
        let (r, ret) = room(max);
        for i in 0..n { publish(&r, ret, i); }
        let m = member(10_000);
        let j = resume(&r, 1, &m, "ep", since);
        let (s, _) = seqs(&m);
        let first_kept = n.saturating_sub(max as u64) + 1;
        let expected: Vec<u64> = if since > n { vec![] } else { (since.max(first_kept - 1) + 1..=n).collect() };
        prop_assert_eq!(&s, &expected);
        let complete = since <= n && since + 1 >= first_kept;
        prop_assert_eq!(j.recovered, complete);
    }
}
