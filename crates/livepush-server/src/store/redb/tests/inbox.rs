//! Terminal inboxes and wake registrations in the embedded store.

use std::net::SocketAddr;

use super::*;

fn imsg(seq: u64) -> InboxMessage {
    InboxMessage {
        seq,
        ts: 2_000 + seq,
        frame: Bytes::from(format!("{{\"t\":\"inbox\",\"seq\":{seq}}}")),
    }
}

fn wake(addr: &str, ts: u64) -> WakeRegistration {
    WakeRegistration {
        addr: addr.parse::<SocketAddr>().unwrap(),
        size: 96,
        ts,
    }
}

fn append_inbox_all(store: &RedbStore, terminal: &str, seqs: impl IntoIterator<Item = u64>) {
    let pending: Vec<Durable> = seqs
        .into_iter()
        .map(|s| store.append_inbox(terminal, &imsg(s)))
        .collect();
    block(async {
        for p in pending {
            p.await.unwrap();
        }
    });
}

fn inbox_seqs(record: &TerminalRecord) -> Vec<u64> {
    record.inbox.iter().map(|m| m.seq).collect()
}

fn terminal(store: &RedbStore, terminal: &str) -> TerminalRecord {
    store.load_terminal(terminal).unwrap().unwrap()
}

#[test]
fn inbox_append_load_round_trip() {
    for policy in ALL {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), policy);
        assert_eq!(store.load_terminal("t").unwrap(), None);
        append_inbox_all(&store, "t", 1..=5);
        block(store.flush()).unwrap();
        assert_eq!(
            terminal(&store, "t"),
            TerminalRecord {
                seq: 5,
                acked: 0,
                inbox: (1..=5).map(imsg).collect(),
                wake: None,
            },
            "{policy}"
        );
        // Terminals whose names share a prefix, and a room of the same name, are apart.
        assert_eq!(store.load_terminal("t2").unwrap(), None);
        append_inbox_all(&store, "t2", 1..=2);
        block(store.create_room("t", "E")).unwrap();
        append_all(&store, "t", 1..=3);
        block(store.flush()).unwrap();
        assert_eq!(inbox_seqs(&terminal(&store, "t")), [1, 2, 3, 4, 5]);
        assert_eq!(inbox_seqs(&terminal(&store, "t2")), [1, 2]);
        assert_eq!(seqs(&store.load_room("t", 10).unwrap().unwrap()), [1, 2, 3]);
        assert_eq!(store.load_terminal("").unwrap(), None);
    }
}

#[test]
fn ack_deletes_and_advances() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), DurabilityPolicy::Batch);
    append_inbox_all(&store, "t", 1..=5);
    block(store.ack_inbox("t", 3)).unwrap();
    let record = terminal(&store, "t");
    assert_eq!((record.seq, record.acked), (5, 3));
    assert_eq!(record.inbox, [imsg(4), imsg(5)]);
    // An older ack changes nothing.
    block(store.ack_inbox("t", 2)).unwrap();
    let record = terminal(&store, "t");
    assert_eq!((record.seq, record.acked), (5, 3));
    assert_eq!(inbox_seqs(&record), [4, 5]);
    block(store.ack_inbox("t", 5)).unwrap();
    let record = terminal(&store, "t");
    assert_eq!((record.seq, record.acked), (5, 5));
    assert!(record.inbox.is_empty());
    // The messages are gone from the file, not only hidden.
    assert!(store.trimmed_bytes_since_compaction() > 0);
    // An acknowledged seq was handed out: the seq never stays behind it.
    block(store.ack_inbox("t", 8)).unwrap();
    assert_eq!(
        (terminal(&store, "t").seq, terminal(&store, "t").acked),
        (8, 8)
    );
    // A message at or below the acknowledged seq is not kept.
    append_inbox_all(&store, "t", [7, 9]);
    let record = terminal(&store, "t");
    assert_eq!((record.seq, record.acked), (9, 8));
    assert_eq!(inbox_seqs(&record), [9]);
    // An ack creates the record of a terminal never seen.
    block(store.ack_inbox("new", 4)).unwrap();
    let record = terminal(&store, "new");
    assert_eq!((record.seq, record.acked), (4, 4));
}

#[test]
fn trim_inbox_keeps_acked() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), DurabilityPolicy::Batch);
    append_inbox_all(&store, "t", 1..=6);
    block(store.ack_inbox("t", 2)).unwrap();
    block(store.trim_inbox("t", 5)).unwrap();
    let record = terminal(&store, "t");
    assert_eq!((record.seq, record.acked), (6, 2));
    assert_eq!(record.inbox, [imsg(5), imsg(6)]);
    // Trimming everything keeps seq and acked.
    block(store.trim_inbox("t", 100)).unwrap();
    let record = terminal(&store, "t");
    assert_eq!((record.seq, record.acked), (6, 2));
    assert!(record.inbox.is_empty());
    append_inbox_all(&store, "t", 7..=8);
    assert_eq!(inbox_seqs(&terminal(&store, "t")), [7, 8]);
    // A trim alone does not make a terminal known.
    block(store.trim_inbox("nobody", 10)).unwrap();
    assert_eq!(store.load_terminal("nobody").unwrap(), None);
}

#[test]
fn restart_keeps_inbox_acked_and_registration() {
    for policy in ALL {
        let dir = tempfile::tempdir().unwrap();
        let v4 = wake("192.0.2.10:40123", 77);
        let v6 = wake("[2001:db8::7]:5000", 88);
        {
            let store = open(dir.path(), policy);
            append_inbox_all(&store, "t4", 1..=6);
            block(store.ack_inbox("t4", 2)).unwrap();
            block(store.trim_inbox("t4", 4)).unwrap();
            block(store.set_wake("t4", &wake("198.51.100.1:1", 1))).unwrap();
            block(store.set_wake("t4", &v4)).unwrap();
            block(store.set_wake("t6", &v6)).unwrap();
            block(store.flush()).unwrap();
        }
        for _ in 0..2 {
            let store = open(dir.path(), policy);
            assert_eq!(
                terminal(&store, "t4"),
                TerminalRecord {
                    seq: 6,
                    acked: 2,
                    inbox: (4..=6).map(imsg).collect(),
                    wake: Some(v4),
                },
                "{policy}"
            );
            // A registration alone makes a terminal known, with an empty inbox.
            assert_eq!(
                terminal(&store, "t6"),
                TerminalRecord {
                    wake: Some(v6),
                    ..TerminalRecord::default()
                }
            );
        }
    }
}

#[test]
fn pending_inboxes_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), DurabilityPolicy::Batch);
        assert!(store.terminals_with_pending_inbox().unwrap().is_empty());
        // Pending.
        append_inbox_all(&store, "a", 1..=3);
        block(store.ack_inbox("a", 1)).unwrap();
        // Everything acknowledged.
        append_inbox_all(&store, "b", 1..=3);
        block(store.ack_inbox("b", 3)).unwrap();
        // Unacknowledged, but nothing kept (expired).
        append_inbox_all(&store, "c", 1..=3);
        block(store.trim_inbox("c", 4)).unwrap();
        // Known only by its registration.
        block(store.set_wake("d", &wake("192.0.2.1:9", 5))).unwrap();
        // Pending, after a trim of part of it.
        append_inbox_all(&store, "a2", 1..=3);
        block(store.trim_inbox("a2", 3)).unwrap();
        // A room with messages is not an inbox.
        block(store.create_room("e", "E")).unwrap();
        append_all(&store, "e", 1..=3);
        assert_eq!(store.terminals_with_pending_inbox().unwrap(), ["a", "a2"]);
    }
    let store = open(dir.path(), DurabilityPolicy::Batch);
    assert_eq!(store.terminals_with_pending_inbox().unwrap(), ["a", "a2"]);
    append_inbox_all(&store, "b", [4]);
    block(store.ack_inbox("a", 3)).unwrap();
    assert_eq!(store.terminals_with_pending_inbox().unwrap(), ["a2", "b"]);
}

/// Poll `f` once; a ready future must have succeeded.
fn ready_ok(f: &mut Durable) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(f).poll(&mut cx) {
        Poll::Ready(result) => {
            result.unwrap();
            true
        }
        Poll::Pending => false,
    }
}

/// Check that the resolved futures are a prefix of `futures`. Scans from the newest down, so
/// that a future resolving during the scan cannot make it fail wrongly.
fn assert_resolved_in_order(futures: &mut [Durable], done: &mut [bool], label: &str) {
    let mut newest_ready = None;
    for k in (0..futures.len()).rev() {
        if !done[k] && ready_ok(&mut futures[k]) {
            done[k] = true;
        }
        match (done[k], newest_ready) {
            (true, None) => newest_ready = Some(k),
            (false, Some(newer)) => panic!("{label}: future {k} not resolved, {newer} is"),
            _ => {}
        }
    }
}

#[test]
fn room_and_inbox_futures_resolve_in_submission_order() {
    for policy in ALL {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), policy);
        for r in ["a", "b"] {
            block(store.create_room(r, "E")).unwrap();
        }
        let n = if policy == DurabilityPolicy::Sync {
            120
        } else {
            1200
        };
        let mut futures: Vec<Durable> = (0..n)
            .map(|i| {
                let round = (i / 8 + 1) as u64;
                match i % 8 {
                    0 => store.append("a", &msg(round), None),
                    1 => store.append_inbox("t", &imsg(round)),
                    2 => store.append("b", &msg(round), None),
                    // Seqs far apart: under `none` each goes past the reservation and waits
                    // for a durable commit, amid writes answered at once.
                    3 => store.append_inbox("jumpy", &imsg(round * 3 * INBOX_RESERVE_STEP)),
                    4 => store.ack_inbox("t", round - 1),
                    5 => store.set_wake("t", &wake("192.0.2.3:7", round)),
                    6 => store.trim_inbox("jumpy", round * INBOX_RESERVE_STEP),
                    _ => store.trim("a", round / 2),
                }
            })
            .collect();
        let mut done = vec![false; n];
        let rt = rt();
        for i in (0..n).step_by(7).chain([n - 1]) {
            if !done[i] {
                rt.block_on(&mut futures[i]).unwrap();
                done[i] = true;
            }
            assert_resolved_in_order(&mut futures, &mut done, policy.as_str());
        }
        assert!(done.iter().all(|d| *d));
        block(store.flush()).unwrap();
        let record = terminal(&store, "t");
        let rounds = (n / 8) as u64;
        assert_eq!(record.seq, rounds);
        assert_eq!(record.acked, rounds - 1);
        assert_eq!(inbox_seqs(&record), [rounds]);
    }
}

#[test]
fn inbox_write_failures_are_reported_and_repaired() {
    for policy in [DurabilityPolicy::Batch, DurabilityPolicy::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let fail = Arc::new(AtomicBool::new(false));
        let store = open_flaky(dir.path(), policy, &fail);
        append_inbox_all(&store, "t", 1..=2);
        fail.store(true, Ordering::SeqCst);
        let failed = block(store.append_inbox("t", &imsg(3)));
        assert!(matches!(failed, Err(StoreError::Io { .. })), "{failed:?}");
        let failed = block(store.ack_inbox("t", 1));
        assert!(matches!(failed, Err(StoreError::Io { .. })), "{failed:?}");
        let registration = wake("192.0.2.5:5", 5);
        let failed = block(store.set_wake("t", &registration));
        assert!(matches!(failed, Err(StoreError::Io { .. })), "{failed:?}");
        fail.store(false, Ordering::SeqCst);
        append_inbox_all(&store, "t", [4]);
        let expected = TerminalRecord {
            seq: 4,
            acked: 1,
            inbox: vec![imsg(2), imsg(4)],
            wake: Some(registration),
        };
        // The failed message is gone; its seq, the ack and the registration were re-applied.
        assert_eq!(terminal(&store, "t"), expected, "{policy}");
        drop(store);
        let store = open(dir.path(), policy);
        assert_eq!(terminal(&store, "t"), expected, "{policy}");
    }
}

#[test]
fn closed_store_refuses_inbox_writes_and_reads() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), DurabilityPolicy::None);
    append_inbox_all(&store, "t", 1..=2);
    store.close().unwrap();
    assert!(matches!(
        block(store.append_inbox("t", &imsg(3))),
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        block(store.ack_inbox("t", 1)),
        Err(StoreError::Closed)
    ));
    assert!(matches!(store.load_terminal("t"), Err(StoreError::Closed)));
    assert!(matches!(
        store.terminals_with_pending_inbox(),
        Err(StoreError::Closed)
    ));
    let again = open(dir.path(), DurabilityPolicy::Batch);
    assert_eq!(inbox_seqs(&terminal(&again, "t")), [1, 2]);
}

#[test]
fn unclean_stop_under_none_moves_inbox_seqs_past_what_was_answered() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), DurabilityPolicy::None);
        // The first append waits for its reservation (up to 1 + step, if nothing else is in
        // its batch); the next ones are within it.
        append_inbox_all(&store, "t", [1]);
        append_inbox_all(&store, "t", 2..=5);
        block(store.ack_inbox("t", 2)).unwrap();
        append_inbox_all(&store, "big", 1..=INBOX_RESERVE_STEP + 10);
        block(store.set_wake("idle", &wake("192.0.2.9:9", 1))).unwrap();
        store.crash();
    }
    let after_first_crash;
    {
        let store = open(dir.path(), DurabilityPolicy::None);
        let record = terminal(&store, "t");
        // The first append reserved up to 1 + step, which is where the inbox goes on.
        assert_eq!(record.seq, 1 + INBOX_RESERVE_STEP);
        assert_eq!(record.acked, 2);
        // What reached the disk stays.
        assert!(inbox_seqs(&record).iter().all(|s| (3..=5).contains(s)));
        let big = terminal(&store, "big");
        assert!(big.seq > INBOX_RESERVE_STEP + 10, "{}", big.seq);
        assert!(big.seq <= INBOX_RESERVE_STEP + 10 + INBOX_RESERVE_STEP);
        // A terminal that never got a message does not move.
        assert_eq!(terminal(&store, "idle").seq, 0);
        // The inbox goes on after the gap, and is protected the same way.
        after_first_crash = record.seq;
        append_inbox_all(&store, "t", [after_first_crash + 1]);
        append_inbox_all(&store, "t", after_first_crash + 2..=after_first_crash + 3);
        assert_eq!(store.terminals_with_pending_inbox().unwrap(), ["big", "t"]);
        store.crash();
    }
    {
        let store = open(dir.path(), DurabilityPolicy::Batch);
        let record = terminal(&store, "t");
        assert_eq!(record.seq, after_first_crash + 1 + INBOX_RESERVE_STEP);
        let sent: Vec<u64> = (3..=5)
            .chain(after_first_crash + 1..=after_first_crash + 3)
            .collect();
        assert!(inbox_seqs(&record).iter().all(|s| sent.contains(s)));
        // Under `batch` nothing was answered early: a crash moves nothing.
        append_inbox_all(&store, "t", record.seq + 1..=record.seq + 2);
        store.crash();
    }
    let store = open(dir.path(), DurabilityPolicy::Batch);
    assert_eq!(
        terminal(&store, "t").seq,
        after_first_crash + 3 + INBOX_RESERVE_STEP
    );
}

#[test]
fn clean_stop_under_none_keeps_inbox_seqs() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), DurabilityPolicy::None);
        append_inbox_all(&store, "t", 1..=5);
        // Dropping closes cleanly.
    }
    {
        let store = open(dir.path(), DurabilityPolicy::None);
        assert_eq!(terminal(&store, "t").seq, 5);
        append_inbox_all(&store, "t", 6..=8);
        // A flush at shutdown marks the file clean even if the process then dies.
        block(store.flush()).unwrap();
        store.crash();
    }
    let store = open(dir.path(), DurabilityPolicy::None);
    let record = terminal(&store, "t");
    assert_eq!(record.seq, 8);
    assert_eq!(inbox_seqs(&record), (1..=8).collect::<Vec<_>>());
}

#[test]
fn inbox_dirty_marker_survives_an_older_build() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), DurabilityPolicy::None);
        append_inbox_all(&store, "t", [1]);
        append_inbox_all(&store, "t", 2..=3);
        store.crash();
    }
    // A build that predates inboxes opens the file and clears `dirty` only.
    {
        let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(tables::META)
            .unwrap()
            .insert(tables::META_DIRTY, [0u8].as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let store = open(dir.path(), DurabilityPolicy::Batch);
    assert_eq!(terminal(&store, "t").seq, 1 + INBOX_RESERVE_STEP);
}

#[test]
fn under_none_appends_within_the_reservation_are_answered_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), DurabilityPolicy::None);
    append_inbox_all(&store, "t", [1]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.shared.gate.lock().early {
        assert!(Instant::now() < deadline, "the gate never opened");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        store.shared.gate.lock().reserved.get("t"),
        Some(&(1 + INBOX_RESERVE_STEP))
    );
    for seq in 2..=1 + INBOX_RESERVE_STEP {
        let mut f = store.append_inbox("t", &imsg(seq));
        assert!(ready_ok(&mut f), "append {seq} waited");
    }
    // The next one waits for its reservation, and so does what follows it.
    let gate_open = store.shared.gate.lock().early;
    assert!(gate_open);
    let beyond = store.append_inbox("t", &imsg(2 + INBOX_RESERVE_STEP));
    let after = store.append_inbox("t", &imsg(3 + INBOX_RESERVE_STEP));
    block(async {
        beyond.await.unwrap();
        after.await.unwrap();
    });
    block(store.flush()).unwrap();
    assert_eq!(terminal(&store, "t").seq, 3 + INBOX_RESERVE_STEP);
}

#[derive(Debug, Clone)]
enum InboxStep {
    Append(usize, u8),
    Ack(usize, u8),
    Trim(usize, u8),
    Wake(usize, u8),
    Load,
    Reopen,
    Crash,
}

fn inbox_step() -> impl Strategy<Value = InboxStep> {
    prop_oneof![
        4 => (0..2usize, 1..6u8).prop_map(|(t, n)| InboxStep::Append(t, n)),
        2 => (0..2usize, 0..8u8).prop_map(|(t, n)| InboxStep::Ack(t, n)),
        2 => (0..2usize, 0..8u8).prop_map(|(t, n)| InboxStep::Trim(t, n)),
        1 => (0..2usize, any::<u8>()).prop_map(|(t, n)| InboxStep::Wake(t, n)),
        1 => Just(InboxStep::Load),
        1 => Just(InboxStep::Reopen),
        1 => Just(InboxStep::Crash),
    ]
}

fn registration(n: u8) -> WakeRegistration {
    if n.is_multiple_of(2) {
        wake(
            &format!("192.0.2.{n}:{}", 1000 + u16::from(n)),
            u64::from(n),
        )
    } else {
        wake(&format!("[2001:db8::{n:x}]:{n}"), u64::from(n))
    }
}

#[derive(Debug, Default)]
struct InboxModel {
    known: bool,
    /// Something was appended (so the terminal's record is durable under any policy).
    appended: bool,
    seq: u64,
    acked: u64,
    messages: BTreeMap<u64, InboxMessage>,
    wake: Option<WakeRegistration>,
}

impl InboxModel {
    fn record(&self) -> Option<TerminalRecord> {
        self.known.then(|| TerminalRecord {
            seq: self.seq,
            acked: self.acked,
            inbox: self.messages.values().cloned().collect(),
            wake: self.wake,
        })
    }
}

const TERMINALS: [&str; 2] = ["term", "term2"];

fn check_inboxes(store: &RedbStore, models: &[InboxModel]) -> Result<(), TestCaseError> {
    let mut pending = Vec::new();
    for (name, model) in TERMINALS.iter().zip(models) {
        prop_assert_eq!(
            store.load_terminal(name).unwrap(),
            model.record(),
            "{}",
            name
        );
        if !model.messages.is_empty() {
            pending.push(name.to_string());
        }
    }
    prop_assert_eq!(store.terminals_with_pending_inbox().unwrap(), pending);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_inbox_appends_acks_trims_and_restarts_keep_exactly_what_is_expected(
        policy in prop_oneof![
            Just(DurabilityPolicy::Sync),
            Just(DurabilityPolicy::Batch),
            Just(DurabilityPolicy::None),
        ],
        steps in proptest::collection::vec(inbox_step(), 1..28)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let mut store = open(dir.path(), policy);
        let mut models: Vec<InboxModel> = TERMINALS.iter().map(|_| InboxModel::default()).collect();
        for step in steps {
            match step {
                InboxStep::Append(t, n) => {
                    let m = &mut models[t];
                    m.known = true;
                    m.appended = true;
                    let pending: Vec<Durable> = (0..n).map(|_| {
                        m.seq += 1;
                        let message = imsg(m.seq);
                        m.messages.insert(m.seq, message.clone());
                        store.append_inbox(TERMINALS[t], &message)
                    }).collect();
                    for p in pending {
                        rt.block_on(p).unwrap();
                    }
                }
                InboxStep::Ack(t, n) => {
                    let m = &mut models[t];
                    m.known = true;
                    let seq = (m.seq + 2).saturating_sub(u64::from(n));
                    m.acked = m.acked.max(seq);
                    m.seq = m.seq.max(m.acked);
                    let acked = m.acked;
                    m.messages.retain(|&s, _| s > acked);
                    rt.block_on(store.ack_inbox(TERMINALS[t], seq)).unwrap();
                }
                InboxStep::Trim(t, n) => {
                    let m = &mut models[t];
                    let keep_from = (m.seq + 1).saturating_sub(u64::from(n));
                    m.messages.retain(|&s, _| s >= keep_from);
                    rt.block_on(store.trim_inbox(TERMINALS[t], keep_from)).unwrap();
                }
                InboxStep::Wake(t, n) => {
                    models[t].known = true;
                    models[t].wake = Some(registration(n));
                    rt.block_on(store.set_wake(TERMINALS[t], &registration(n))).unwrap();
                }
                InboxStep::Load => {
                    if policy == DurabilityPolicy::None {
                        // Answered is not yet written under `none`.
                        rt.block_on(store.flush()).unwrap();
                    }
                    check_inboxes(&store, &models)?;
                }
                InboxStep::Reopen => {
                    drop(store);
                    store = open(dir.path(), policy);
                    check_inboxes(&store, &models)?;
                }
                InboxStep::Crash => {
                    store.crash();
                    drop(store);
                    store = open(dir.path(), policy);
                    if policy == DurabilityPolicy::None {
                        // Answered writes may be lost, but the inbox goes on past every seq
                        // that was answered; what is kept is what was sent.
                        for (name, m) in TERMINALS.iter().zip(models.iter_mut()) {
                            let Some(record) = store.load_terminal(name).unwrap() else {
                                prop_assert!(!m.appended);
                                *m = InboxModel::default();
                                continue;
                            };
                            prop_assert!(record.seq >= m.seq);
                            prop_assert!(record.seq <= m.seq + INBOX_RESERVE_STEP);
                            prop_assert!(record.acked <= m.acked);
                            for message in &record.inbox {
                                prop_assert_eq!(message, &imsg(message.seq));
                            }
                            *m = InboxModel {
                                known: true,
                                appended: m.appended,
                                seq: record.seq,
                                acked: record.acked,
                                messages: record.inbox.iter().map(|x| (x.seq, x.clone())).collect(),
                                wake: record.wake,
                            };
                        }
                    }
                    check_inboxes(&store, &models)?;
                }
            }
        }
        if policy == DurabilityPolicy::None {
            rt.block_on(store.flush()).unwrap();
        }
        check_inboxes(&store, &models)?;
    }
}

const INBOX_STORM_DIR: &str = "LIVEPUSH_STORE_INBOX_STORM_DIR";

/// The child side of [`kill_9_during_an_inbox_storm_under_none`]: append to an inbox under
/// `none` until killed, printing every answered seq.
#[test]
#[ignore = "run by kill_9_during_an_inbox_storm_under_none in a child process"]
fn inbox_storm_child() {
    let Ok(dir) = std::env::var(INBOX_STORM_DIR) else {
        return;
    };
    let store = RedbStore::open(Path::new(&dir), DurabilityPolicy::None).unwrap();
    let rt = rt();
    let mut out = std::io::stdout().lock();
    let started = Instant::now();
    let mut seq = 0;
    while started.elapsed() < Duration::from_secs(30) {
        let pending: Vec<(u64, Durable)> = (0..64)
            .map(|_| {
                seq += 1;
                (seq, store.append_inbox("storm", &imsg(seq)))
            })
            .collect();
        for (s, p) in pending {
            rt.block_on(p).unwrap();
            writeln!(out, "acked {s}").unwrap();
        }
        out.flush().unwrap();
    }
}

#[test]
fn kill_9_during_an_inbox_storm_under_none() {
    let dir = tempfile::tempdir().unwrap();
    // Past a few reservations.
    let acked = super::kill_9_after(
        "store::redb::tests::inbox::inbox_storm_child",
        &[(INBOX_STORM_DIR, dir.path().to_str().unwrap())],
        3 * INBOX_RESERVE_STEP + 100,
    );
    let store = open(dir.path(), DurabilityPolicy::None);
    let record = terminal(&store, "storm");
    // Every answered seq is behind the inbox's seq now: none is handed out again.
    assert!(record.seq >= acked, "answered {acked}, seq {}", record.seq);
    assert!(record.seq <= acked + 64 + INBOX_RESERVE_STEP);
    // What is kept is a gap-free run of the messages sent.
    let kept = inbox_seqs(&record);
    assert_eq!(kept, (1..=kept.len() as u64).collect::<Vec<_>>());
    for m in &record.inbox {
        assert_eq!(m, &imsg(m.seq));
    }
}
