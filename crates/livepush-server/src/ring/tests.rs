use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

/// A reader that counts its wake-ups.
#[derive(Default)]
struct Counting(AtomicUsize);

impl Reader for Counting {
    fn wake(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl Counting {
    fn wakes(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

fn reader() -> (Arc<Counting>, Weak<dyn Reader>) {
    let r = Arc::new(Counting::default());
    let w = Arc::downgrade(&r) as Weak<dyn Reader>;
    (r, w)
}

fn msg(seq: u64) -> Frame {
    Frame::reliable(Arc::from("r"), seq, Bytes::from(format!("m{seq}")))
}

fn chat(n: u64) -> Frame {
    Frame::transient(Bytes::from(format!("c{n}")))
}

/// What a reader was handed, as text: `lag:D:P` then the frames.
#[derive(Default)]
struct Got(Vec<String>);

impl Sink for Got {
    fn lagged(&mut self, dropped: u64, prompt: Option<u64>) {
        self.0.push(format!("lag:{dropped}:{prompt:?}"));
    }

    fn run(&mut self, a: &[Frame], b: &[Frame]) {
        assert!(!a.is_empty(), "a run is never empty");
        for f in a.iter().chain(b) {
            self.0
                .push(String::from_utf8(f.bytes().unwrap().to_vec()).unwrap());
        }
    }
}

fn read_all(ring: &Ring, c: &mut Cursor, me: &Weak<dyn Reader>) -> Vec<String> {
    let mut got = Got::default();
    ring.read(c, usize::MAX, true, me, &mut got);
    got.0
}

#[test]
fn a_reader_gets_what_was_appended_after_it_subscribed_in_order() {
    let ring = Ring::new(8, usize::MAX);
    ring.append(msg(1));
    let (_r, me) = reader();
    let mut c = ring.subscribe(me.clone());
    assert!(!ring.pending(&c));
    for seq in 2..=4 {
        ring.append(msg(seq));
    }
    assert!(ring.pending(&c));
    assert_eq!(read_all(&ring, &mut c, &me), ["m2", "m3", "m4"]);
    assert!(!ring.pending(&c));
    assert!(read_all(&ring, &mut c, &me).is_empty());
}

#[test]
fn an_append_wakes_parked_readers_once_and_leaves_readers_behind_alone() {
    let ring = Ring::new(8, usize::MAX);
    let (a, ma) = reader();
    let (b, mb) = reader();
    let mut ca = ring.subscribe(ma.clone());
    let _cb = ring.subscribe(mb);
    ring.append(msg(1));
    assert_eq!((a.wakes(), b.wakes()), (1, 1), "both were parked");
    ring.append(msg(2));
    assert_eq!(
        (a.wakes(), b.wakes()),
        (1, 1),
        "neither read: nobody to wake"
    );
    assert_eq!(read_all(&ring, &mut ca, &ma), ["m1", "m2"]);
    ring.append(msg(3));
    assert_eq!(
        (a.wakes(), b.wakes()),
        (2, 1),
        "only the one that read up parked"
    );
}

#[test]
fn a_reader_that_falls_behind_the_ring_is_told_what_it_lost() {
    let ring = Ring::new(3, usize::MAX);
    let (_r, me) = reader();
    let (_o, other) = reader();
    let mut c = ring.subscribe(me.clone());
    // Another reader that never reads keeps the ring from being emptied.
    let _stuck = ring.subscribe(other);
    ring.append(chat(1));
    ring.append(msg(1));
    ring.append(chat(2));
    ring.append(msg(2));
    ring.append(chat(3));
    ring.append(chat(4));
    // Kept: chat 2..4 would be 3 frames; evicted: chat 1, m1, m2... in order c1 m1 c2 m2 c3 c4
    // with 3 kept the reader lost c1, m1, c2 and gets m2, c3, c4.
    assert_eq!(
        read_all(&ring, &mut c, &me),
        ["lag:2:Some(1)", "m2", "c3", "c4"]
    );
    // Lost only transient messages: no prompt.
    for n in 5..=8 {
        ring.append(chat(n));
    }
    assert_eq!(
        read_all(&ring, &mut c, &me),
        ["lag:1:None", "c6", "c7", "c8"]
    );
}

#[test]
fn a_reader_is_not_prompted_for_what_came_before_it() {
    let ring = Ring::new(2, usize::MAX);
    let (_o, other) = reader();
    let _stuck = ring.subscribe(other);
    ring.append(msg(1));
    ring.append(msg(2));
    let (_r, me) = reader();
    let mut c = ring.subscribe(me.clone());
    ring.append(msg(3));
    ring.append(msg(4));
    ring.append(chat(1));
    // m1 and m2 were evicted before this reader came (not its loss); m3 after.
    assert_eq!(read_all(&ring, &mut c, &me), ["lag:0:Some(3)", "m4", "c1"]);
}

#[test]
fn a_ring_everyone_has_read_keeps_only_the_newest_frame() {
    let ring = Ring::new(100, usize::MAX);
    let (_r, me) = reader();
    let mut c = ring.subscribe(me.clone());
    for seq in 1..=50 {
        ring.append(msg(seq));
        read_all(&ring, &mut c, &me);
    }
    assert_eq!(ring.kept(), 1);
    // A ring nobody reads keeps only the newest frame too.
    ring.unsubscribe(&c);
    ring.append(msg(51));
    ring.append(msg(52));
    assert_eq!(ring.kept(), 1);
}

#[test]
fn a_read_stops_at_its_byte_budget_but_hands_at_least_one_frame_when_asked() {
    let ring = Ring::new(10, usize::MAX);
    let (_r, me) = reader();
    let mut c = ring.subscribe(me.clone());
    for seq in 1..=5 {
        ring.append(msg(seq)); // "mN": 2 bytes + 1 separator
    }
    let mut got = Got::default();
    assert_eq!(ring.read(&mut c, 6, false, &me, &mut got), 6);
    assert_eq!(got.0, ["m1", "m2"]);
    let mut got = Got::default();
    assert_eq!(ring.read(&mut c, 1, false, &me, &mut got), 0);
    assert!(got.0.is_empty());
    assert_eq!(ring.read(&mut c, 1, true, &me, &mut got), 3);
    assert_eq!(got.0, ["m3"]);
    assert!(ring.pending(&c));
}

#[test]
fn a_reader_that_left_is_not_counted_as_caught_up() {
    let ring = Ring::new(10, usize::MAX);
    let (_a, ma) = reader();
    let (_b, mb) = reader();
    let ca = ring.subscribe(ma);
    let mut cb = ring.subscribe(mb.clone());
    ring.append(msg(1));
    // `a` leaves without reading (it was parked in the previous wake's generation).
    ring.unsubscribe(&ca);
    ring.append(msg(2));
    // `b` has not read: nothing may be dropped.
    assert_eq!(read_all(&ring, &mut cb, &mb), ["m1", "m2"]);
}

#[test]
fn viewers_coming_and_going_in_a_quiet_room_leave_no_trace() {
    let ring = Ring::new(8, usize::MAX);
    let (stay, ms) = reader();
    let mut c = ring.subscribe(ms.clone());
    let (_r, me) = reader();
    for _ in 0..10_000 {
        let c = ring.subscribe(me.clone());
        ring.unsubscribe(&c);
    }
    assert!(ring.waiting() <= 2 + STALE_SLACK, "{}", ring.waiting());
    // The reader that stayed was woken with nothing to read along the way. Its writer looks,
    // finds nothing, and is parked again before it sleeps: it still hears of what comes.
    let spurious = stay.wakes();
    assert!(spurious > 0);
    assert!(!ring.pending_or_park(&mut c, &ms));
    ring.append(msg(1));
    assert_eq!(
        stay.wakes(),
        spurious + 1,
        "parked again, woken by the append"
    );
    assert!(ring.pending_or_park(&mut c, &ms));
}

proptest! {
    /// Appends and reads in any order, with any byte budgets: a reader gets every frame
    /// appended after it subscribed, once, in order, or is told it lost it (transient
    /// frames counted, reliable ones prompted up to at least their seq).
    #[test]
    fn every_frame_is_read_once_in_order_or_reported_lost(
        capacity in 1usize..6,
        ops in proptest::collection::vec((0u8..3, 1usize..12), 1..200),
    ) {
        let ring = Ring::new(capacity, usize::MAX);
        let (_r, me) = reader();
        let (_o, other) = reader();
        let mut c = ring.subscribe(me.clone());
        let mut oc = ring.subscribe(other.clone());
        let mut next = 1u64;
        let mut appended = Vec::new();
        let mut got = Got::default();
        for (op, n) in ops {
            match op {
                0 => {
                    let f = if n % 2 == 0 { msg(next) } else { chat(next) };
                    appended.push(if n % 2 == 0 { format!("m{next}") } else { format!("c{next}") });
                    ring.append(f);
                    next += 1;
                }
                1 => {
                    ring.read(&mut c, n, n % 3 == 0, &me, &mut got);
                }
                _ => {
                    ring.read(&mut oc, n, true, &other, &mut Got::default());
                }
            }
        }
        ring.read(&mut c, usize::MAX, true, &me, &mut got);
        // Walk what was handed against what was appended. Consecutive lag reports (a read
        // can lag and hand nothing) cover the frames up to the next one handed.
        let mut i = 0;
        let mut j = 0;
        while j < got.0.len() {
            let (mut dropped, mut prompt) = (0usize, None::<u64>);
            let mut lagged = false;
            while let Some(rest) = got.0.get(j).and_then(|g| g.strip_prefix("lag:")) {
                let (d, p) = rest.split_once(':').unwrap();
                dropped += d.parse::<usize>().unwrap();
                if let Some(p) = p.strip_prefix("Some(") {
                    prompt = prompt.max(Some(p.trim_end_matches(')').parse().unwrap()));
                }
                lagged = true;
                j += 1;
            }
            if lagged {
                let next_frame = got.0.get(j);
                let lost_start = i;
                while i < appended.len() && Some(&appended[i]) != next_frame {
                    i += 1;
                }
                let lost = &appended[lost_start..i];
                let chats = lost.iter().filter(|l| l.starts_with('c')).count();
                prop_assert_eq!(dropped, chats, "transient losses counted");
                let top = lost
                    .iter()
                    .filter_map(|l| l.strip_prefix('m'))
                    .map(|s| s.parse::<u64>().unwrap())
                    .max();
                prop_assert_eq!(prompt, top, "prompted up to the last reliable lost");
                continue;
            }
            prop_assert!(i < appended.len(), "handed more than appended: {:?}", got.0);
            prop_assert_eq!(&got.0[j], &appended[i], "in order, once");
            i += 1;
            j += 1;
        }
        prop_assert_eq!(i, appended.len(), "everything handed or reported");
        prop_assert!(ring.kept() <= capacity);
    }
}
