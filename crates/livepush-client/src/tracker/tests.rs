//! Tests of [`RoomTracker`]: one per rule, then property tests (every seq exactly once and in
//! order whatever the server does to a complete history; garbage never panics).

use super::*;
use proptest::prelude::*;

const ROOM: &str = "live:1";

fn msg(seq: u64) -> Message {
    Message {
        room: ROOM.to_owned(),
        ty: "gift".to_owned(),
        data: serde_json::json!({ "n": seq }),
        seq: Some(seq),
        ts: seq,
    }
}

fn pos(epoch: &str, seq: u64) -> Option<Position> {
    Some(Position {
        epoch: epoch.to_owned(),
        seq,
    })
}

fn delivered(effects: &[Effect]) -> Vec<u64> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Deliver(m) => Some(m.seq),
            _ => None,
        })
        .collect()
}

fn pulls(effects: &[Effect]) -> Vec<u64> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Pull { since } => Some(*since),
            _ => None,
        })
        .collect()
}

#[test]
fn fresh_join_starts_at_the_live_edge() {
    let mut t = RoomTracker::new(ROOM, None, 16);
    assert_eq!(t.resume_from(), None);
    assert!(t.on_message(msg(1)).is_empty(), "nothing before joined");
    t.on_joined("e1", 7, true);
    assert_eq!(t.resume_from(), pos("e1", 7));
    assert!(t.on_message(msg(7)).is_empty());
    let e = t.on_message(msg(8));
    assert_eq!(delivered(&e), vec![8]);
    match &e[0] {
        Effect::Deliver(m) => {
            assert_eq!(m.epoch, "e1");
            assert_eq!(
                m.position(),
                Position {
                    epoch: "e1".into(),
                    seq: 8
                }
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn duplicates_are_dropped_and_gaps_pull_once() {
    let mut t = RoomTracker::new(ROOM, pos("e", 0), 16);
    t.on_joined("e", 0, true);
    assert_eq!(delivered(&t.on_message(msg(1))), vec![1]);
    assert!(t.on_message(msg(1)).is_empty());
    let e = t.on_message(msg(4));
    assert_eq!(e, vec![Effect::Pull { since: 1 }]);
    assert!(
        t.on_message(msg(5)).is_empty(),
        "one pull in flight at a time"
    );
    assert!(t.on_prompt(9).is_empty(), "still in flight");
    let e = t.on_pulled("e", 9, true, vec![msg(2), msg(3), msg(4)]);
    assert_eq!(delivered(&e), vec![2, 3, 4, 5]);
    assert_eq!(pulls(&e), vec![5], "the prompt wants up to 9");
    let e = t.on_pulled("e", 9, true, vec![msg(6), msg(7), msg(8), msg(9)]);
    assert_eq!(delivered(&e), vec![6, 7, 8, 9]);
    assert!(pulls(&e).is_empty());
    assert!(!t.pull_in_flight());
    assert_eq!(t.resume_from(), pos("e", 9));
}

#[test]
fn live_message_filling_the_gap_before_the_pull_answer() {
    let mut t = RoomTracker::new(ROOM, pos("e", 0), 16);
    t.on_joined("e", 0, true);
    assert_eq!(pulls(&t.on_message(msg(2))), vec![0]);
    assert_eq!(delivered(&t.on_message(msg(1))), vec![1, 2]);
    // The pull answer overlaps what was delivered.
    let e = t.on_pulled("e", 3, true, vec![msg(1), msg(2), msg(3)]);
    assert_eq!(delivered(&e), vec![3]);
    assert!(pulls(&e).is_empty());
}

#[test]
fn resume_in_the_same_epoch_drops_the_overlap() {
    let mut t = RoomTracker::new(ROOM, pos("e", 3), 16);
    t.on_joined("e", 5, true);
    let mut all = Vec::new();
    for s in [2, 3, 4, 4, 5, 5, 6] {
        all.extend(delivered(&t.on_message(msg(s))));
    }
    assert_eq!(all, vec![4, 5, 6]);
}

#[test]
fn reconnect_forgets_the_connection_state_but_not_the_position() {
    let mut t = RoomTracker::new(ROOM, pos("e", 0), 16);
    t.on_joined("e", 0, true);
    t.on_message(msg(1));
    assert_eq!(pulls(&t.on_message(msg(3))), vec![1]);
    t.on_disconnect();
    assert!(!t.is_live());
    assert_eq!(t.buffered(), 0);
    assert_eq!(t.resume_from(), pos("e", 1));
    assert!(t.on_message(msg(2)).is_empty(), "not joined yet");
    t.on_joined("e", 3, true);
    let mut all = Vec::new();
    for s in [2, 3] {
        all.extend(delivered(&t.on_message(msg(s))));
    }
    assert_eq!(all, vec![2, 3]);
    assert!(!t.pull_in_flight(), "the old pull was forgotten");
}

#[test]
fn history_exceeded_skips_to_the_first_kept_message() {
    let mut t = RoomTracker::new(ROOM, pos("e", 3), 16);
    t.on_joined("e", 60, false);
    let e = t.on_message(msg(50));
    assert_eq!(e[0], Effect::Lost { first: 4, last: 49 });
    assert_eq!(delivered(&e), vec![50]);
    assert_eq!(delivered(&t.on_message(msg(51))), vec![51]);
    // Only the first message re-bases; a later gap pulls as usual.
    assert_eq!(pulls(&t.on_message(msg(53))), vec![51]);
}

#[test]
fn new_epoch_resets_the_position() {
    let mut t = RoomTracker::new(ROOM, pos("old", 40), 16);
    t.on_joined("new", 3, false);
    assert_eq!(t.resume_from(), pos("new", 0));
    let mut all = Vec::new();
    for s in [1, 2, 3, 4] {
        all.extend(delivered(&t.on_message(msg(s))));
    }
    assert_eq!(all, vec![1, 2, 3, 4]);
}

#[test]
fn server_that_lost_data_is_followed() {
    let mut t = RoomTracker::new(ROOM, pos("e", 10), 16);
    t.on_joined("e", 4, false);
    assert_eq!(t.resume_from(), pos("e", 4));
    assert_eq!(delivered(&t.on_message(msg(5))), vec![5]);
}

#[test]
fn replay_that_did_not_fit_is_pulled_after_the_prompt() {
    let mut t = RoomTracker::new(ROOM, pos("e", 0), 16);
    t.on_joined("e", 250, true);
    let mut all = Vec::new();
    for s in 1..=3 {
        all.extend(delivered(&t.on_message(msg(s))));
    }
    assert_eq!(pulls(&t.on_prompt(250)), vec![3]);
    // A live message published after the prompt arrives before the pulled answer.
    assert!(t.on_message(msg(251)).is_empty());
    let mut since = 3;
    loop {
        let batch: Vec<_> = (since + 1..=(since + 100).min(250)).map(msg).collect();
        let e = t.on_pulled("e", 251, true, batch);
        all.extend(delivered(&e));
        match pulls(&e).as_slice() {
            [] => break,
            [s] => since = *s,
            more => panic!("{more:?}"),
        }
    }
    assert_eq!(all, (1..=251).collect::<Vec<_>>());
}

#[test]
fn recovered_false_pull_skips_and_empty_answer_gives_up() {
    let mut t = RoomTracker::new(ROOM, pos("e", 0), 16);
    t.on_joined("e", 0, true);
    t.on_message(msg(1));
    assert_eq!(pulls(&t.on_message(msg(30))), vec![1]);
    let e = t.on_pulled("e", 30, false, vec![msg(20), msg(21)]);
    assert_eq!(e[0], Effect::Lost { first: 2, last: 19 });
    assert_eq!(delivered(&e), vec![20, 21]);
    assert_eq!(pulls(&e), vec![21]);
    // Nothing more to give (a broken server): no pull loop, the buffer goes on.
    let e = t.on_pulled("e", 30, true, vec![]);
    assert_eq!(
        e[0],
        Effect::Lost {
            first: 22,
            last: 29
        }
    );
    assert_eq!(delivered(&e), vec![30]);
    assert!(pulls(&e).is_empty());
}

#[test]
fn resync_waits_for_an_outstanding_pull() {
    // recovered:false and the replay did not fit: prompt, then a live message arrives
    // before the pulled answer. The live message must not become the base.
    let mut t = RoomTracker::new(ROOM, pos("e", 3), 16);
    t.on_joined("e", 100, false);
    assert_eq!(pulls(&t.on_prompt(100)), vec![3]);
    assert!(t.on_message(msg(101)).is_empty());
    let e = t.on_pulled("e", 101, false, (50..=100).map(msg).collect());
    assert_eq!(e[0], Effect::Lost { first: 4, last: 49 });
    assert_eq!(delivered(&e), (50..=101).collect::<Vec<_>>());
}

#[test]
fn buffer_overflow_drops_the_buffer_and_relies_on_pull() {
    let mut t = RoomTracker::new(ROOM, pos("e", 0), 4);
    t.on_joined("e", 0, true);
    assert_eq!(pulls(&t.on_message(msg(3))), vec![0]);
    for s in 4..=10 {
        t.on_message(msg(s));
    }
    assert!(t.buffered() <= 4);
    let mut all = delivered(&t.on_pulled("e", 10, true, (1..=4).map(msg).collect()));
    let e = t.on_pulled("e", 10, true, (5..=10).map(msg).collect());
    all.extend(delivered(&e));
    assert_eq!(all, (1..=10).collect::<Vec<_>>());
}

#[test]
fn pulled_from_another_epoch_asks_for_a_rejoin() {
    let mut t = RoomTracker::new(ROOM, pos("e", 0), 4);
    t.on_joined("e", 0, true);
    t.on_message(msg(2));
    assert_eq!(
        t.on_pulled("x", 5, false, vec![msg(1)]),
        vec![Effect::Rejoin]
    );
    assert_eq!(t.resume_from(), pos("e", 0));
    assert!(!t.is_live());
}

#[test]
fn transient_and_pull_failure() {
    let mut t = RoomTracker::new(ROOM, pos("e", 0), 4);
    t.on_joined("e", 0, true);
    let mut m = msg(1);
    m.seq = None;
    assert!(t.on_message(m).is_empty());
    assert_eq!(pulls(&t.on_message(msg(3))), vec![0]);
    t.on_pull_failed();
    assert_eq!(
        pulls(&t.on_message(msg(4))),
        vec![0],
        "pulls again on the next gap"
    );
}

#[test]
fn long_poll_attach_goes_live_without_joined() {
    let mut t = RoomTracker::new(ROOM, None, 16);
    t.on_attached();
    assert!(!t.is_live(), "a fresh join waits for its joined");
    t.on_joined("e", 4, true);
    assert_eq!(delivered(&t.on_message(msg(5))), vec![5]);
    // A held gap and its pull are forgotten by the next poll, whose replay covers them.
    assert_eq!(pulls(&t.on_message(msg(7))), vec![5]);
    t.on_attached();
    assert!(t.is_live());
    assert_eq!(t.buffered(), 0);
    assert!(!t.pull_in_flight());
    assert_eq!(t.resume_from(), pos("e", 5));
    assert_eq!(delivered(&t.on_message(msg(5))), Vec::<u64>::new());
    assert_eq!(delivered(&t.on_message(msg(6))), vec![6]);
}

#[test]
fn replay_complete_after_recovered_false_skips_what_is_gone() {
    // The history expired entirely: joined{recovered:false} with no replay at all.
    let mut t = RoomTracker::new(ROOM, pos("e", 3), 16);
    t.on_attached();
    t.on_joined("e", 9, false);
    assert_eq!(
        t.on_replay_complete(9),
        vec![Effect::Lost { first: 4, last: 9 }]
    );
    assert_eq!(t.resume_from(), pos("e", 9));
    assert_eq!(delivered(&t.on_message(msg(10))), vec![10]);
    // With a replay the first message already re-based: nothing more to do.
    let mut t = RoomTracker::new(ROOM, pos("e", 3), 16);
    t.on_joined("e", 9, false);
    assert_eq!(delivered(&t.on_message(msg(8))), vec![8]);
    assert!(t.on_replay_complete(9).is_empty());
    // A complete resume never skips.
    let mut t = RoomTracker::new(ROOM, pos("e", 3), 16);
    t.on_joined("e", 9, true);
    assert!(t.on_replay_complete(9).is_empty());
    assert_eq!(t.resume_from(), pos("e", 3));
}

#[test]
fn pull_from_beyond_the_latest_seq_moves_back_and_stops_pulling() {
    // Contract v1.1, decision 7. The client delivered up to 10; a prompt makes it pull from
    // there, but the server's history now ends at 4 (it lost 5..=10 after delivering them).
    let mut t = RoomTracker::new(ROOM, pos("e", 8), 16);
    t.on_joined("e", 10, true);
    assert_eq!(delivered(&t.on_message(msg(9))), vec![9]);
    assert_eq!(delivered(&t.on_message(msg(10))), vec![10]);
    assert_eq!(pulls(&t.on_message(msg(12))), vec![10]);
    let e = t.on_pulled("e", 4, false, vec![]);
    assert_eq!(e, vec![Effect::Rewound { seq: 4 }]);
    assert_eq!(
        t.resume_from(),
        pos("e", 4),
        "moved back to the server's latest"
    );
    assert!(t.is_live());
    assert!(!t.pull_in_flight());
    assert_eq!(
        t.buffered(),
        0,
        "what was held belongs to the lost messages"
    );
    // Nothing is pulled again: not for the old prompt, not for seqs the server never had.
    assert!(t.on_prompt(4).is_empty());
    assert!(
        t.on_pulled("e", 4, false, vec![]).is_empty(),
        "no pull was outstanding"
    );
    // The server's next messages (new ones, reusing 5, 6, …) are delivered.
    assert_eq!(delivered(&t.on_message(msg(5))), vec![5]);
    assert_eq!(delivered(&t.on_message(msg(6))), vec![6]);
    // A pull answered `recovered:false` at or after the position is still a plain loss.
    let mut t = RoomTracker::new(ROOM, pos("e", 3), 16);
    t.on_joined("e", 3, true);
    assert_eq!(pulls(&t.on_prompt(9)), vec![3]);
    assert_eq!(
        t.on_pulled("e", 9, false, vec![]),
        vec![Effect::Lost { first: 4, last: 9 }]
    );
    assert_eq!(t.resume_from(), pos("e", 9));
}

#[test]
fn a_history_pushed_while_live_is_adopted_without_replay_pull_or_rejoin() {
    // Contract v1.1, decision 8.
    let mut t = RoomTracker::new(ROOM, pos("old", 0), 16);
    t.on_joined("old", 0, true);
    let all: Vec<u64> = (1..=5)
        .flat_map(|s| delivered(&t.on_message(msg(s))))
        .collect();
    assert_eq!(all, vec![1, 2, 3, 4, 5]);
    assert_eq!(
        pulls(&t.on_message(msg(8))),
        vec![5],
        "a gap is being pulled"
    );
    t.on_history_reset("new", 0);
    assert_eq!(t.resume_from(), pos("new", 0));
    assert!(t.is_live(), "no rejoin needed");
    assert_eq!(t.buffered(), 0);
    assert!(!t.pull_in_flight());
    // The old history's pull answer crossed the reset: it changes nothing (no rejoin).
    assert!(
        t.on_pulled("old", 8, true, (6..=8).map(msg).collect())
            .is_empty()
    );
    // The new history continues live from its first message, nothing reported lost.
    let e = t.on_message(msg(1));
    assert_eq!(e.len(), 1, "{e:?}");
    match &e[0] {
        Effect::Deliver(m) => assert_eq!((m.epoch.as_str(), m.seq), ("new", 1)),
        other => panic!("{other:?}"),
    }
    assert_eq!(delivered(&t.on_message(msg(2))), vec![2]);
    // A new history that starts at S > 0 continues from S: unlike a `joined` answering a
    // join from another epoch (whose replay re-bases), nothing before S is expected.
    t.on_history_reset("third", 7);
    assert_eq!(t.resume_from(), pos("third", 7));
    assert_eq!(t.on_message(msg(8)).len(), 1, "delivered, no Lost");
    let mut j = RoomTracker::new(ROOM, pos("new", 2), 16);
    j.on_joined("third", 7, false);
    assert_eq!(j.on_message(msg(8))[0], Effect::Lost { first: 1, last: 7 });
    // The same epoch, backwards: followed too.
    t.on_history_reset("third", 3);
    assert_eq!(t.resume_from(), pos("third", 3));
    assert_eq!(delivered(&t.on_message(msg(4))), vec![4]);
}

/// What the harness can do to a tracker. The server's history is `1..=n` of one epoch and
/// is complete (nothing is lost), so every seq must be delivered exactly once, in order;
/// a [`Op::Reset`] replaces it by a new epoch's history whose `base+1..=n` must then be.
#[derive(Debug, Clone)]
enum Op {
    /// A live (or duplicated, or late) message.
    Live(u64),
    /// The server answers the outstanding pull, capping it at `cap` messages.
    AnswerPull(u64),
    Prompt(u64),
    /// The connection drops; the client rejoins and gets a replay from its position,
    /// cut after `cut` messages, with `dup` extra duplicates of older seqs mixed in.
    Reconnect {
        cut: u64,
        dup: u64,
    },
    /// The server pushes a new history (another epoch) that continues after `base`; an
    /// outstanding pull is answered from the old history after the push.
    Reset {
        base: u64,
    },
}

fn op(n: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..=n).prop_map(Op::Live),
        2 => (1..=n).prop_map(Op::AnswerPull),
        1 => (1..=n).prop_map(Op::Prompt),
        1 => (0..=n, 0..=n).prop_map(|(cut, dup)| Op::Reconnect { cut, dup }),
    ]
}

/// [`op`], and now and then a new history.
fn op_with_resets(n: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => op(n),
        1 => (0..n).prop_map(|base| Op::Reset { base }),
    ]
}

struct Harness {
    n: u64,
    t: RoomTracker,
    /// The history the server has now, and the seq it continues after.
    epoch: String,
    base: u64,
    /// What was delivered of that history.
    delivered: Vec<u64>,
    pending_pull: Option<u64>,
    pulls_sent: usize,
}

impl Harness {
    fn apply(&mut self, effects: Vec<Effect>) -> Result<(), TestCaseError> {
        for e in effects {
            match e {
                Effect::Deliver(m) => self.delivered.push(m.seq),
                Effect::Pull { since } => {
                    prop_assert!(self.pending_pull.is_none(), "two pulls in flight");
                    self.pending_pull = Some(since);
                    self.pulls_sent += 1;
                }
                other => prop_assert!(false, "unexpected {other:?}"),
            }
        }
        // Invariant: what was delivered of this history is exactly base+1..=k.
        for (i, s) in self.delivered.iter().enumerate() {
            prop_assert_eq!(
                *s,
                self.base + i as u64 + 1,
                "delivered {:?}",
                self.delivered
            );
        }
        Ok(())
    }

    fn answer_pull(&mut self, cap: u64) -> Result<(), TestCaseError> {
        if let Some(since) = self.pending_pull.take() {
            let msgs = (since + 1..=(since + cap).min(self.n)).map(msg).collect();
            let e = self.t.on_pulled(&self.epoch, self.n, true, msgs);
            self.apply(e)?;
        }
        Ok(())
    }

    fn reset(&mut self, base: u64) -> Result<(), TestCaseError> {
        let old = std::mem::replace(&mut self.epoch, format!("e{base}x{}", self.pulls_sent));
        self.base = base;
        self.delivered.clear();
        self.t.on_history_reset(&self.epoch, base);
        prop_assert_eq!(
            self.t.resume_from(),
            pos(&self.epoch, base),
            "the pushed position is adopted"
        );
        if let Some(since) = self.pending_pull.take() {
            let msgs = (since + 1..=self.n).map(msg).collect();
            let e = self.t.on_pulled(&old, self.n, true, msgs);
            prop_assert!(e.is_empty(), "a stale pull answer acted on: {:?}", e);
        }
        Ok(())
    }

    fn reconnect(&mut self, cut: u64, dup: u64) -> Result<(), TestCaseError> {
        self.t.on_disconnect();
        self.pending_pull = None;
        let since = self.t.resume_from().map(|p| p.seq).unwrap_or(0);
        self.t.on_joined(&self.epoch, self.n, true);
        for s in since.saturating_sub(dup)..=since {
            if s > 0 {
                let e = self.t.on_message(msg(s));
                self.apply(e)?;
            }
        }
        let end = (since + cut).min(self.n);
        for s in since + 1..=end {
            let e = self.t.on_message(msg(s));
            self.apply(e)?;
        }
        if end < self.n {
            let e = self.t.on_prompt(self.n);
            self.apply(e)?;
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_seq_exactly_once_in_order(
        (n, ops, cap) in (1u64..40).prop_flat_map(|n| (Just(n), proptest::collection::vec(op_with_resets(n), 0..120), 1..=n)),
        max_buffered in 1usize..16,
    ) {
        let mut h = Harness {
            n,
            t: RoomTracker::new(ROOM, pos("e", 0), max_buffered),
            epoch: "e".to_owned(),
            base: 0,
            delivered: Vec::new(),
            pending_pull: None,
            pulls_sent: 0,
        };
        h.t.on_joined("e", n, true);
        for op in ops {
            match op {
                Op::Live(s) => { let e = h.t.on_message(msg(s)); h.apply(e)?; }
                Op::AnswerPull(c) => h.answer_pull(c)?,
                Op::Prompt(s) => { let e = h.t.on_prompt(s); h.apply(e)?; }
                Op::Reconnect { cut, dup } => h.reconnect(cut, dup)?,
                Op::Reset { base } => h.reset(base)?,
            }
            prop_assert!(h.t.buffered() <= max_buffered);
        }
        // Settle: answer pulls until none is left, then a full resume finishes the job.
        for _ in 0..=n {
            h.answer_pull(cap)?;
        }
        h.reconnect(n, 2)?;
        for _ in 0..=n {
            h.answer_pull(cap)?;
        }
        prop_assert_eq!(h.delivered, (h.base + 1..=n).collect::<Vec<_>>());
        prop_assert!(h.pending_pull.is_none());
    }

    /// Garbage from a broken server never panics, never delivers a seq twice within an
    /// epoch without a `joined`, a pushed history or a rewind in between, and keeps the
    /// buffer bounded.
    #[test]
    fn arbitrary_frames_never_panic(
        frames in proptest::collection::vec(
            (0u8..5, prop_oneof![8 => 0u64..50, 1 => any::<u64>()], any::<bool>(), 0u8..3),
            0..200,
        ),
    ) {
        let mut t = RoomTracker::new(ROOM, None, 8);
        let mut last_delivered: Option<u64> = None;
        for (kind, seq, flag, e) in frames {
            let epoch = ["a", "b", "c"][usize::from(e)];
            let effects = match kind {
                0 => { t.on_joined(epoch, seq, flag); last_delivered = None; vec![] }
                1 => t.on_message(msg(seq)),
                2 => t.on_prompt(seq),
                3 => { t.on_history_reset(epoch, seq); last_delivered = None; vec![] }
                _ => t.on_pulled(epoch, seq, flag, (seq.saturating_sub(3)..seq.saturating_add(3)).map(msg).collect()),
            };
            for eff in effects {
                match eff {
                    Effect::Deliver(m) => {
                        if let Some(l) = last_delivered { prop_assert!(m.seq > l); }
                        last_delivered = Some(m.seq);
                    }
                    Effect::Rejoin | Effect::Rewound { .. } => last_delivered = None,
                    _ => {}
                }
            }
            prop_assert!(t.buffered() <= 8);
        }
    }
}
