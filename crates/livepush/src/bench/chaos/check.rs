//! The check of `livepush bench chaos`: what the publishers were answered (the [`Ledger`]),
//! what each terminal was handed per room ([`RoomSeen`]), and the [`Figures`] that compare
//! them. Invariant: an answered seq after the terminal's first `joined` in its epoch counts
//! as delivered, reported gone (inside a `Lost` range), or lost; a seq handed over twice is a
//! duplicate, one below the newest already handed over is reordered.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

/// The check's figures for a group of terminals.
#[derive(Debug, Default, Clone, Serialize)]
pub(super) struct Figures {
    pub(super) kind: String,
    pub(super) terminals: u64,
    /// Answered messages the terminals had to receive.
    pub(super) expected: u64,
    pub(super) delivered: u64,
    /// Expected, never delivered, not reported gone.
    pub(super) lost: u64,
    pub(super) duplicates: u64,
    pub(super) reordered: u64,
    /// Expected, reported gone by the SDK (`Event::Lost`), not delivered.
    pub(super) reported_lost: u64,
    /// `joined` with `recovered:false`.
    pub(super) not_recovered: u64,
    /// Terminals that had not received every room's last answered message by the end.
    pub(super) unfinished: u64,
    pub(super) disconnects: u64,
    /// Disconnects by the SDK's watchdog (a silent path: the proxy's stalls).
    pub(super) watchdog: u64,
    /// Sessions started, by transport.
    pub(super) sessions_ws: u64,
    pub(super) sessions_longpoll: u64,
    pub(super) sessions_sse: u64,
}

impl Figures {
    pub(super) fn add(&mut self, o: &Figures) {
        self.terminals += o.terminals;
        self.expected += o.expected;
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.reported_lost += o.reported_lost;
        self.not_recovered += o.not_recovered;
        self.unfinished += o.unfinished;
        self.disconnects += o.disconnects;
        self.watchdog += o.watchdog;
        self.sessions_ws += o.sessions_ws;
        self.sessions_longpoll += o.sessions_longpoll;
        self.sessions_sse += o.sessions_sse;
    }

    pub(super) fn violations(&self) -> u64 {
        self.lost + self.duplicates + self.reordered + self.unfinished
    }
}

/// Every answered publish: per room, per epoch, the seqs.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    pub(super) rooms: HashMap<String, HashMap<String, BTreeSet<u64>>>,
}

impl Ledger {
    pub(super) fn answer(&mut self, room: &str, epoch: &str, seq: u64) {
        self.rooms
            .entry(room.to_owned())
            .or_default()
            .entry(epoch.to_owned())
            .or_default()
            .insert(seq);
    }

    /// The newest answered `(epoch, seq)` of `room`: the epoch with the highest seq.
    pub(super) fn last(&self, room: &str) -> Option<(&str, u64)> {
        self.rooms.get(room)?.iter().fold(None, |best, (e, seqs)| {
            let s = *seqs.last()?;
            match best {
                Some((_, b)) if b >= s => best,
                _ => Some((e.as_str(), s)),
            }
        })
    }
}

/// What one terminal saw of one room, in the order the SDK handed it over.
#[derive(Debug, Default)]
pub(super) struct RoomSeen {
    /// The epochs seen, in order; messages name them by index.
    pub(super) epochs: Vec<String>,
    /// Per epoch: the seq of the first `joined` in it (where the terminal came in).
    pub(super) base: HashMap<usize, u64>,
    /// `(epoch index, seq)` of each message.
    pub(super) msgs: Vec<(usize, u64)>,
    /// `(epoch index, first, last)` of each `Lost`.
    pub(super) lost: Vec<(usize, u64, u64)>,
    pub(super) not_recovered: u64,
}

impl RoomSeen {
    fn epoch(&mut self, epoch: &str) -> usize {
        match self.epochs.iter().position(|e| e == epoch) {
            Some(i) => i,
            None => {
                self.epochs.push(epoch.to_owned());
                self.epochs.len() - 1
            }
        }
    }

    pub(super) fn joined(&mut self, epoch: &str, seq: u64, recovered: bool) {
        let e = self.epoch(epoch);
        self.base.entry(e).or_insert(seq);
        if !recovered {
            self.not_recovered += 1;
        }
    }

    pub(super) fn message(&mut self, epoch: &str, seq: u64) {
        let e = self.epoch(epoch);
        self.msgs.push((e, seq));
    }

    /// `Lost` names seqs of the room's current epoch: the last one seen.
    pub(super) fn lost(&mut self, first: u64, last: u64) {
        let e = self.epochs.len().saturating_sub(1);
        self.lost.push((e, first, last));
    }

    /// The newest `(epoch, seq)` handed over.
    pub(super) fn last(&self) -> Option<(&str, u64)> {
        self.msgs.last().map(|&(e, s)| (self.epochs[e].as_str(), s))
    }

    /// Check what was seen against what was answered; adds to `f`, returns the seqs seen
    /// that nobody was answered for.
    pub(super) fn check(
        &self,
        answered: Option<&HashMap<String, BTreeSet<u64>>>,
        f: &mut Figures,
    ) -> u64 {
        let mut seen: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); self.epochs.len()];
        let mut newest: Vec<Option<u64>> = vec![None; self.epochs.len()];
        for &(e, s) in &self.msgs {
            f.delivered += 1;
            if !seen[e].insert(s) {
                f.duplicates += 1;
            } else if newest[e].is_some_and(|n| s < n) {
                f.reordered += 1;
            }
            newest[e] = newest[e].max(Some(s));
        }
        f.not_recovered += self.not_recovered;
        let mut unanswered = 0;
        let empty = HashMap::new();
        let answered = answered.unwrap_or(&empty);
        for (i, epoch) in self.epochs.iter().enumerate() {
            let mine = answered.get(epoch);
            unanswered += seen[i]
                .iter()
                .filter(|s| !mine.is_some_and(|m| m.contains(s)))
                .count() as u64;
        }
        for (epoch, seqs) in answered {
            let e = self.epochs.iter().position(|x| x == epoch);
            // An epoch the terminal never joined in: everything of it is owed (it came in
            // before the first message, so it must have followed the room into it).
            let base = e.and_then(|e| self.base.get(&e).copied()).unwrap_or(0);
            for &s in seqs.range(base + 1..) {
                f.expected += 1;
                let got = e.is_some_and(|e| seen[e].contains(&s));
                if got {
                    continue;
                }
                let said_gone = e.is_some_and(|e| {
                    self.lost
                        .iter()
                        .any(|&(le, a, b)| le == e && (a..=b).contains(&s))
                });
                if said_gone {
                    f.reported_lost += 1;
                } else {
                    f.lost += 1;
                }
            }
        }
        unanswered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(seqs: &[u64]) -> HashMap<String, BTreeSet<u64>> {
        HashMap::from([("e1".to_owned(), seqs.iter().copied().collect())])
    }

    fn check(seen: &RoomSeen, seqs: &[u64]) -> (Figures, u64) {
        let mut f = Figures::default();
        let extra = seen.check(Some(&answered(seqs)), &mut f);
        (f, extra)
    }

    #[test]
    fn a_clean_run_has_nothing_to_report() {
        let mut s = RoomSeen::default();
        s.joined("e1", 2, true);
        for q in 3..=6 {
            s.message("e1", q);
        }
        let (f, extra) = check(&s, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(
            (f.expected, f.delivered, f.violations(), extra),
            (4, 4, 0, 0)
        );
    }

    #[test]
    fn loss_duplicates_and_reordering_are_told_apart() {
        let mut s = RoomSeen::default();
        s.joined("e1", 0, true);
        for q in [1, 3, 2, 3, 5] {
            s.message("e1", q);
        }
        let (f, _) = check(&s, &[1, 2, 3, 4, 5]);
        assert_eq!((f.lost, f.duplicates, f.reordered), (1, 1, 1));
    }

    #[test]
    fn what_the_sdk_said_is_gone_is_counted_apart() {
        let mut s = RoomSeen::default();
        s.joined("e1", 0, true);
        s.message("e1", 1);
        s.joined("e1", 4, false);
        s.lost(2, 3);
        s.message("e1", 4);
        let (f, _) = check(&s, &[1, 2, 3, 4]);
        assert_eq!((f.lost, f.reported_lost, f.not_recovered), (0, 2, 1));
    }

    #[test]
    fn unanswered_seqs_and_a_new_epoch() {
        let mut s = RoomSeen::default();
        s.joined("e1", 0, true);
        s.message("e1", 1);
        // Seq 2 was stored but its answer lost: seen, never answered.
        s.message("e1", 2);
        let mut f = Figures::default();
        let mut answered = answered(&[1]);
        // An epoch the terminal never saw: all of it is owed.
        answered.insert("e2".to_owned(), BTreeSet::from([1, 2]));
        assert_eq!(s.check(Some(&answered), &mut f), 1);
        assert_eq!(f.lost, 2);
    }

    #[test]
    fn the_ledger_knows_the_newest_message_of_a_room() {
        let mut l = Ledger::default();
        assert_eq!(l.last("r"), None);
        l.answer("r", "e1", 5);
        l.answer("r", "e1", 3);
        assert_eq!(l.last("r"), Some(("e1", 5)));
    }
}
