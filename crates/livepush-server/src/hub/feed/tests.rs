use std::collections::VecDeque;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::engine::History;
use crate::store::RoomFlags;

/// The engine's truth: epochs in order, each with its messages; the newest is current.
struct Truth {
    epochs: Vec<Arc<str>>,
    /// Last seq of the current epoch.
    latest: u64,
    /// How many of the newest messages the history keeps.
    keep: u64,
}

fn frame(epoch: &str, seq: u64) -> Bytes {
    Bytes::from(format!("{epoch}/{seq}"))
}

fn message(epoch: &Arc<str>, seq: u64) -> Incoming {
    Incoming {
        epoch: epoch.clone(),
        message: StoredMessage {
            seq,
            ts: 0,
            frame: frame(epoch, seq),
        },
        action: None,
    }
}

impl Truth {
    fn epoch(&self) -> &Arc<str> {
        self.epochs.last().expect("an epoch")
    }

    fn first_kept(&self) -> u64 {
        self.latest.saturating_sub(self.keep) + 1
    }

    fn kept(&self, since: u64, limit: usize) -> Vec<StoredMessage> {
        (self.first_kept().max(since + 1)..=self.latest)
            .take(limit)
            .map(|seq| message(self.epoch(), seq).message)
            .collect()
    }

    fn history(&self, since: u64, limit: usize) -> History {
        History {
            epoch: self.epoch().clone(),
            latest: self.latest,
            first: self.first_kept(),
            messages: self.kept(since, limit),
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            epoch: self.epoch().clone(),
            seq: self.latest,
            flags: RoomFlags::default(),
            online: 0,
            history: self.kept(0, usize::MAX),
        }
    }
}

/// What reaches the feed, in the order the (unreliable) link delivers it.
#[derive(Debug, Clone)]
enum Op {
    /// The engine stores the next message; the link carries it unless `dropped`.
    Publish { dropped: bool },
    /// The link delivers its next item (twice if `dup`).
    Deliver { dup: bool },
    /// The link swaps its next two items.
    Swap,
    /// The engine answers the feed's ask; reads return at most `limit` messages.
    Answer { limit: usize },
    /// The shared history is lost: a new epoch; the engine says so on the link if `told`.
    Reset { told: bool },
    /// The link to the engine dropped and came back.
    Lost,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => any::<bool>().prop_map(|d| Op::Publish { dropped: d }),
        6 => any::<bool>().prop_map(|dup| Op::Deliver { dup }),
        1 => Just(Op::Swap),
        3 => (1usize..6).prop_map(|limit| Op::Answer { limit }),
        1 => any::<bool>().prop_map(|told| Op::Reset { told }),
        1 => Just(Op::Lost),
    ]
}

enum Item {
    Message(Incoming),
    Epoch(Arc<str>, u64),
}

/// Everything the members were given, checked as it comes: each epoch's messages strictly in
/// order and genuine, epochs only ever moving to newer ones.
struct Members {
    epoch: Arc<str>,
    last: u64,
    epochs_seen: Vec<Arc<str>>,
}

impl Members {
    fn check(&mut self, truth: &Truth, steps: Vec<Step>) -> Result<(), TestCaseError> {
        for step in steps {
            match step {
                Step::Deliver(m) => {
                    prop_assert_eq!(&m.epoch, &self.epoch, "a message of another epoch");
                    prop_assert!(
                        m.message.seq > self.last,
                        "seq {} after {}: repeated or out of order",
                        m.message.seq,
                        self.last
                    );
                    prop_assert_eq!(&m.message.frame, &frame(&m.epoch, m.message.seq));
                    self.last = m.message.seq;
                }
                Step::Restart { epoch, seq } => {
                    let at = truth.epochs.iter().position(|e| *e == epoch);
                    let was = truth.epochs.iter().position(|e| *e == self.epoch);
                    prop_assert!(at.is_some() && at > was, "epochs only move forward");
                    self.epochs_seen.push(epoch.clone());
                    self.epoch = epoch;
                    self.last = seq;
                }
            }
        }
        Ok(())
    }
}

fn run(ops: Vec<Op>, keep: u64) -> Result<(), TestCaseError> {
    let mut truth = Truth {
        epochs: vec![Arc::from("e0")],
        latest: 0,
        keep,
    };
    let mut feed = Feed::loading();
    let mut link: VecDeque<Item> = VecDeque::new();
    let mut asked: Option<Ask> = None;
    let mut out = Vec::new();
    // A member joins at the first snapshot, after a few messages were published.
    truth.latest = 3;
    link.push_back(Item::Message(message(truth.epoch(), 3)));
    if let Some(a) = feed.loaded(truth.epoch().clone(), 2, &mut out) {
        asked = Some(a);
    }
    let mut members = Members {
        epoch: truth.epoch().clone(),
        last: 2,
        epochs_seen: vec![],
    };
    let mut every_message_kept = true;
    let apply = |feed: &mut Feed, item: &Item, out: &mut Vec<Step>| -> Option<Ask> {
        match item {
            Item::Message(m) => feed.message(m.clone(), out),
            Item::Epoch(e, seq) => feed.epoch_changed(e, *seq),
        }
    };
    for op in ops {
        let mut got = None;
        match op {
            Op::Publish { dropped } => {
                truth.latest += 1;
                if truth.latest > keep {
                    every_message_kept = false;
                }
                if !dropped {
                    link.push_back(Item::Message(message(truth.epoch(), truth.latest)));
                }
            }
            Op::Deliver { dup } => {
                if let Some(item) = link.pop_front() {
                    got = apply(&mut feed, &item, &mut out);
                    if dup {
                        got = got.or(apply(&mut feed, &item, &mut out));
                    }
                }
            }
            Op::Swap => {
                if link.len() >= 2 {
                    link.swap(0, 1);
                }
            }
            Op::Answer { limit } => match asked.take() {
                Some(Ask::Read { since }) => got = feed.read(truth.history(since, limit), &mut out),
                Some(Ask::Snapshot) => got = feed.snapshot(truth.snapshot(), &mut out),
                None => {}
            },
            Op::Reset { told } => {
                let epoch: Arc<str> = Arc::from(format!("e{}", truth.epochs.len()));
                truth.epochs.push(epoch.clone());
                truth.latest = 0;
                if told {
                    link.push_back(Item::Epoch(epoch, 0));
                }
            }
            Op::Lost => got = feed.lost(),
        }
        if let Some(a) = got {
            prop_assert!(asked.is_none(), "one ask at a time");
            asked = Some(a);
        }
        members.check(&truth, std::mem::take(&mut out))?;
    }
    // Quiesce: the link delivers everything and the engine answers every ask; then the link
    // is found lost (how a feed learns of messages that never reached it), and again.
    for lost in [false, true] {
        if lost && asked.is_none() {
            asked = feed.lost();
        }
        for _ in 0..500 {
            while let Some(item) = link.pop_front() {
                if let Some(a) = apply(&mut feed, &item, &mut out) {
                    asked = Some(a);
                }
            }
            asked = match asked.take() {
                Some(Ask::Read { since }) => feed.read(truth.history(since, 3), &mut out),
                Some(Ask::Snapshot) => feed.snapshot(truth.snapshot(), &mut out),
                None => None,
            };
            members.check(&truth, std::mem::take(&mut out))?;
            if asked.is_none() && link.is_empty() {
                break;
            }
        }
    }
    prop_assert!(asked.is_none(), "the feed settles");
    prop_assert_eq!(feed.epoch(), truth.epoch(), "it follows the engine's epoch");
    prop_assert_eq!(feed.delivered(), truth.latest, "it catches up");
    prop_assert_eq!(members.last, truth.latest);
    prop_assert!(!feed.is_waiting());
    if every_message_kept && truth.epochs.len() == 1 {
        // Nothing was ever trimmed: nothing may have been skipped either. (Checked by
        // `Members::check` as strictly increasing; here, that no seq is missing.)
        prop_assert!(members.epochs_seen.is_empty());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary interleavings of live messages (dropped, repeated, swapped), reads, snapshots,
    /// epoch changes (announced or not) and lost links: members see each seq of an epoch at
    /// most once and in order, epochs only move forward, and the feed ends where the engine
    /// is.
    #[test]
    fn members_see_each_seq_once_in_order_and_catch_up(
        ops in proptest::collection::vec(op(), 1..120),
        keep in 2u64..40,
    ) {
        run(ops, keep)?;
    }

    /// With a history that keeps everything, nothing is ever skipped: every seq of the
    /// epoch reaches the members, exactly once.
    #[test]
    fn nothing_is_skipped_while_the_history_keeps_it(
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let ops: Vec<Op> = ops.into_iter().filter(|o| !matches!(o, Op::Reset { .. })).collect();
        let mut feed = Feed::loading();
        let mut truth = Truth { epochs: vec![Arc::from("e0")], latest: 0, keep: u64::MAX };
        let mut out = Vec::new();
        let mut asked = feed.loaded(truth.epoch().clone(), 0, &mut out);
        let mut link: VecDeque<Incoming> = VecDeque::new();
        let mut seen: Vec<u64> = Vec::new();
        let collect = |out: &mut Vec<Step>, seen: &mut Vec<u64>| {
            for s in out.drain(..) {
                if let Step::Deliver(m) = s {
                    seen.push(m.message.seq);
                }
            }
        };
        for op in ops {
            let got = match op {
                Op::Publish { dropped } => {
                    truth.latest += 1;
                    if !dropped {
                        link.push_back(message(truth.epoch(), truth.latest));
                    }
                    None
                }
                Op::Deliver { dup } => match link.pop_front() {
                    Some(m) => {
                        let a = feed.message(m.clone(), &mut out);
                        if dup { a.or(feed.message(m, &mut out)) } else { a }
                    }
                    None => None,
                },
                Op::Swap => {
                    if link.len() >= 2 { link.swap(0, 1); }
                    None
                }
                Op::Answer { limit } => match asked.take() {
                    Some(Ask::Read { since }) => feed.read(truth.history(since, limit), &mut out),
                    Some(Ask::Snapshot) => feed.snapshot(truth.snapshot(), &mut out),
                    None => None,
                },
                Op::Lost => feed.lost(),
                Op::Reset { .. } => None,
            };
            if got.is_some() {
                asked = got;
            }
            collect(&mut out, &mut seen);
        }
        while let Some(m) = link.pop_front() {
            if let Some(a) = feed.message(m, &mut out) { asked = Some(a); }
        }
        for lost in [false, true] {
            if lost && asked.is_none() { asked = feed.lost(); }
            for _ in 0..500 {
                asked = match asked.take() {
                    Some(Ask::Read { since }) => feed.read(truth.history(since, 2), &mut out),
                    Some(Ask::Snapshot) => feed.snapshot(truth.snapshot(), &mut out),
                    None => break,
                };
            }
        }
        collect(&mut out, &mut seen);
        prop_assert_eq!(seen, (1..=truth.latest).collect::<Vec<u64>>());
    }
}

#[test]
fn a_gap_is_read_and_the_messages_behind_it_follow() {
    let e: Arc<str> = Arc::from("e");
    let mut feed = Feed::loading();
    let mut out = Vec::new();
    assert_eq!(feed.loaded(e.clone(), 0, &mut out), None);
    assert_eq!(feed.message(message(&e, 1), &mut out), None);
    assert_eq!(
        feed.message(message(&e, 4), &mut out),
        Some(Ask::Read { since: 1 })
    );
    assert_eq!(
        feed.message(message(&e, 5), &mut out),
        None,
        "one ask at a time"
    );
    let truth = Truth {
        epochs: vec![e.clone()],
        latest: 5,
        keep: 100,
    };
    assert_eq!(feed.read(truth.history(1, 100), &mut out), None);
    let seqs: Vec<u64> = out
        .iter()
        .filter_map(|s| match s {
            Step::Deliver(m) => Some(m.message.seq),
            Step::Restart { .. } => None,
        })
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
}

#[test]
fn another_epoch_restarts_at_the_first_kept_message() {
    let e0: Arc<str> = Arc::from("e0");
    let e1: Arc<str> = Arc::from("e1");
    let mut feed = Feed::loading();
    let mut out = Vec::new();
    feed.loaded(e0.clone(), 7, &mut out);
    assert_eq!(feed.message(message(&e1, 3), &mut out), Some(Ask::Snapshot));
    let truth = Truth {
        epochs: vec![e0, e1.clone()],
        latest: 3,
        keep: 2,
    };
    assert_eq!(feed.snapshot(truth.snapshot(), &mut out), None);
    match &out[..] {
        [
            Step::Restart { epoch, seq: 1 },
            Step::Deliver(a),
            Step::Deliver(b),
        ] => {
            assert_eq!(*epoch, e1);
            assert_eq!((a.message.seq, b.message.seq), (2, 3));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn control_actions_survive_a_read_back() {
    let e: Arc<str> = Arc::from("e");
    let mut feed = Feed::loading();
    let mut out = Vec::new();
    feed.loaded(e.clone(), 0, &mut out);
    let data = serde_json::value::RawValue::from_string(r#"{"action":"mute"}"#.into()).unwrap();
    let history = History {
        epoch: e,
        latest: 1,
        first: 1,
        messages: vec![StoredMessage {
            seq: 1,
            ts: 0,
            frame: livepush_proto::encode_msg("r", "control", &data, Some(1), 0),
        }],
    };
    feed.read(history, &mut out);
    assert!(matches!(&out[..], [Step::Deliver(m)] if m.action == Some(Action::Mute)));
}

/// A message published after the last read and before the stream came back reaches the room
/// through no stream: the re-established stream makes the feed read once more.
#[test]
fn a_reestablished_stream_reads_what_came_before_it() {
    let e: Arc<str> = Arc::from("e");
    let mut out = Vec::new();
    let snapshot = |seq: u64| Snapshot {
        epoch: e.clone(),
        seq,
        flags: RoomFlags::default(),
        online: 0,
        history: vec![],
    };

    // Nothing in flight: read at once from the position.
    let mut feed = Feed::loading();
    assert_eq!(feed.loaded(e.clone(), 20, &mut out), None);
    assert_eq!(feed.subscribed(), Some(Ask::Read { since: 20 }));

    // A snapshot in flight (asked after the link dropped, maybe read before the stream was
    // back): its answer is followed by a read, even though it shows nothing new.
    let mut feed = Feed::loading();
    assert_eq!(feed.loaded(e.clone(), 20, &mut out), None);
    assert_eq!(feed.lost(), Some(Ask::Snapshot));
    assert_eq!(feed.subscribed(), None, "one ask at a time");
    assert_eq!(
        feed.snapshot(snapshot(20), &mut out),
        Some(Ask::Read { since: 20 })
    );
    // That read covers it: no more.
    let truth = Truth {
        epochs: vec![e.clone()],
        latest: 21,
        keep: 100,
    };
    assert_eq!(feed.read(truth.history(20, 100), &mut out), None);
    assert_eq!(feed.retry(), None);
    assert_eq!(feed.delivered(), 21);

    // Subscribed while the first snapshot loads: read once loaded.
    let mut feed = Feed::loading();
    assert_eq!(feed.subscribed(), None);
    assert_eq!(
        feed.loaded(e.clone(), 20, &mut out),
        Some(Ask::Read { since: 20 })
    );

    // The ask in flight failed: the upkeep's retry owes the read.
    let mut feed = Feed::loading();
    assert_eq!(feed.loaded(e.clone(), 20, &mut out), None);
    assert_eq!(feed.lost(), Some(Ask::Snapshot));
    assert_eq!(feed.subscribed(), None);
    feed.failed();
    assert_eq!(feed.retry(), Some(Ask::Read { since: 20 }));
}
