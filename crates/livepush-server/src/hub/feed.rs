//! Order and gaps of one room on this node: a pure state machine, no IO.
//!
//! The engine hands the node a room's reliable messages in order, but across nodes the stream
//! can skip (a pub/sub link dropped and came back), repeat, or carry another epoch (the
//! shared history was lost and started again). The feed turns whatever arrives into what the
//! members may see: each seq once, in order, within one epoch, and an explicit restart when
//! the epoch changes. It asks for what it needs to get there ([`Ask`]): a read of the history
//! after its position, or a fresh snapshot of the room (to learn a new epoch). The room
//! answers those asks with the engine's replies.
//!
//! Rules:
//! - a message of the current epoch at `delivered + 1` is delivered, then whatever waited
//!   behind it; one at or below `delivered` is a repeat and dropped; one further ahead waits
//!   (bounded only by what the engine hands over while one read is in flight) and the
//!   history after `delivered` is read;
//! - a read's messages are delivered in order; where the history no longer has what the
//!   feed misses (it was trimmed), the feed skips to the first message the history has
//!   (members that were not told about the skipped seqs detect the jump and pull; the pull
//!   answers `recovered:false`): never a silent hole in what one member receives, and never
//!   a stall;
//! - a message of another epoch, a read of another epoch, or a lost link ask for a snapshot;
//!   a snapshot of another epoch restarts the feed there: members are told
//!   `joined{recovered:false}` with the new epoch, then get the new history's kept messages
//!   and the live ones;
//! - an epoch event ([`Feed::epoch_changed`]) asks for a snapshot too: only snapshots move
//!   the feed to another epoch, so epochs never go back.
//!
//! On one node ([`crate::engine::local`]) the stream is exact and only the first rule ever
//! applies.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::control::Action;
use crate::engine::{History, Snapshot};
use crate::store::StoredMessage;

/// A reliable message as the engine handed it over.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub epoch: Arc<str>,
    pub message: StoredMessage,
    pub action: Option<Action>,
}

/// What the feed needs from the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// The history of the current epoch after `since`.
    Read { since: u64 },
    /// A fresh snapshot of the room (its epoch, position and kept history).
    Snapshot,
}

/// What the members get.
#[derive(Debug, Clone)]
pub enum Step {
    /// Deliver this message (its seq is the one after the previous step's).
    Deliver(Incoming),
    /// The room's history continues in `epoch` after `seq`; nothing before counts any more.
    Restart { epoch: Arc<str>, seq: u64 },
}

/// See the module documentation.
#[derive(Debug)]
pub struct Feed {
    epoch: Arc<str>,
    delivered: u64,
    /// Messages of the current epoch ahead of a gap, by seq.
    ahead: BTreeMap<u64, Incoming>,
    /// Messages of another epoch (or of any epoch while loading), in arrival order.
    other: Vec<Incoming>,
    /// The ask in flight, if any: at most one at a time.
    asked: Option<Ask>,
    /// No snapshot yet: everything waits.
    loading: bool,
    /// The stream was (re)established after the last ask was sent (or while loading): what
    /// was published before it may be in no answer yet, so one more read is due.
    stale: bool,
}

impl Feed {
    /// A feed that waits for its first snapshot ([`Feed::loaded`]).
    pub fn loading() -> Feed {
        Feed {
            epoch: Arc::from(""),
            delivered: 0,
            ahead: BTreeMap::new(),
            other: Vec::new(),
            asked: None,
            loading: true,
            stale: false,
        }
    }

    pub fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    /// The last seq delivered to members.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    pub fn is_loading(&self) -> bool {
        self.loading
    }

    /// The ask in flight, if any.
    pub fn asked(&self) -> Option<Ask> {
        self.asked
    }

    /// Whether messages wait for an answer (the room's upkeep asks again after a failure).
    pub fn is_waiting(&self) -> bool {
        !self.ahead.is_empty() || !self.other.is_empty()
    }

    /// The first snapshot: the position the members start from (its history is the caller's
    /// to keep). Whatever arrived meanwhile is fed again.
    pub fn loaded(&mut self, epoch: Arc<str>, seq: u64, out: &mut Vec<Step>) -> Option<Ask> {
        self.loading = false;
        self.epoch = epoch;
        self.delivered = seq;
        self.asked = None;
        let ask = self.refeed(out);
        self.or_catch_up(ask)
    }

    /// The engine's stream of the room is (re)established ([`Event::Subscribed`]): a message
    /// published before it and after the last answer was read reaches the room through no
    /// stream, so it is read now, or once the ask in flight (possibly sent before the stream
    /// was back) is answered.
    ///
    /// [`Event::Subscribed`]: crate::engine::Event::Subscribed
    pub fn subscribed(&mut self) -> Option<Ask> {
        self.stale = true;
        self.catch_up()
    }

    /// A read after the position, if the stream was re-established since the last ask was sent
    /// and nothing is in flight.
    fn catch_up(&mut self) -> Option<Ask> {
        if !self.stale || self.loading || self.asked.is_some() {
            return None;
        }
        self.ask(Ask::Read {
            since: self.delivered,
        })
    }

    /// `ask`, or else the catch-up read that a re-established stream still owes.
    fn or_catch_up(&mut self, ask: Option<Ask>) -> Option<Ask> {
        match ask {
            Some(a) => Some(a),
            None => self.catch_up(),
        }
    }

    /// A reliable message from the engine's stream.
    pub fn message(&mut self, m: Incoming, out: &mut Vec<Step>) -> Option<Ask> {
        if self.loading {
            self.other.push(m);
            return None;
        }
        if m.epoch != self.epoch {
            self.other.push(m);
            return self.ask(Ask::Snapshot);
        }
        let seq = m.message.seq;
        if seq <= self.delivered {
            return None;
        }
        if seq == self.delivered + 1 && self.ahead.is_empty() {
            self.deliver(m, out);
            return None;
        }
        self.ahead.insert(seq, m);
        self.drain(out);
        if self.ahead.is_empty() {
            None
        } else {
            self.ask(Ask::Read {
                since: self.delivered,
            })
        }
    }

    /// The engine says the room's history changed epoch. Only a snapshot moves the feed to
    /// another epoch: an epoch event can be older than a snapshot already taken (they travel
    /// different paths), and epochs have no order to tell, while snapshots are read one after
    /// the other and never go back.
    pub fn epoch_changed(&mut self, epoch: &str, seq: u64) -> Option<Ask> {
        if self.loading || (*epoch == *self.epoch && seq <= self.delivered) {
            return None;
        }
        self.ask(Ask::Snapshot)
    }

    /// The link to the engine's stream was lost (and is back): what happened meanwhile is
    /// learnt from a snapshot.
    pub fn lost(&mut self) -> Option<Ask> {
        if self.loading {
            return None;
        }
        self.ask(Ask::Snapshot)
    }

    /// The answer to [`Ask::Read`].
    pub fn read(&mut self, history: History, out: &mut Vec<Step>) -> Option<Ask> {
        let ask = self.take_read(history, out);
        self.or_catch_up(ask)
    }

    fn take_read(&mut self, history: History, out: &mut Vec<Step>) -> Option<Ask> {
        if matches!(self.asked, Some(Ask::Read { .. })) {
            self.asked = None;
        }
        if self.loading {
            return None;
        }
        if history.epoch != self.epoch {
            return self.ask(Ask::Snapshot);
        }
        let before = self.delivered;
        self.take_history(&history.epoch, history.messages, out);
        self.drain(out);
        if self.delivered < history.latest && history.first > self.delivered + 1 {
            // The history no longer keeps what follows the position (trimmed): skip to what
            // it keeps.
            self.skip_below(history.first, out);
            self.drain(out);
        }
        if self.delivered < history.latest {
            // The read stopped at its limit: read on.
            return self.ask(Ask::Read {
                since: self.delivered,
            });
        }
        if self.ahead.is_empty() {
            return None;
        }
        if self.delivered == before {
            // The history has nothing between the position and what waits: skip to it.
            self.skip_below(u64::MAX, out);
            return None;
        }
        // What waits is newer than this read: read again.
        self.ask(Ask::Read {
            since: self.delivered,
        })
    }

    /// The answer to [`Ask::Snapshot`].
    pub fn snapshot(&mut self, s: Snapshot, out: &mut Vec<Step>) -> Option<Ask> {
        let ask = self.take_snapshot(s, out);
        self.or_catch_up(ask)
    }

    fn take_snapshot(&mut self, s: Snapshot, out: &mut Vec<Step>) -> Option<Ask> {
        if matches!(self.asked, Some(Ask::Snapshot)) {
            self.asked = None;
        }
        if self.loading {
            return None;
        }
        // A message of any other epoch than the engine's current one is stale (sent before
        // the history it belongs to was replaced); a newer epoch would come with new messages.
        self.other.retain(|m| m.epoch == s.epoch);
        if s.epoch == self.epoch {
            // The same history: whatever was missed is read after the position.
            let ask = self.refeed(out);
            if ask.is_none() && s.seq > self.delivered {
                return self.ask(Ask::Read {
                    since: self.delivered,
                });
            }
            return ask;
        }
        // A new history: start before the first message it keeps, so that members get all
        // of them (the snapshot carries the whole retention).
        let start = s.history.first().map_or(s.seq, |m| m.seq.saturating_sub(1));
        self.restart(s.epoch.clone(), start, out);
        self.take_history(&s.epoch, s.history, out);
        let ask = self.refeed(out);
        if ask.is_none() && s.seq > self.delivered {
            return self.ask(Ask::Read {
                since: self.delivered,
            });
        }
        ask
    }

    /// An ask failed (the engine is unreachable): it may be asked again.
    pub fn failed(&mut self) {
        self.asked = None;
    }

    /// What to ask again after a failure, if anything waits.
    pub fn retry(&mut self) -> Option<Ask> {
        if self.loading || self.asked.is_some() {
            return None;
        }
        if !self.other.is_empty() {
            return self.ask(Ask::Snapshot);
        }
        if !self.ahead.is_empty() {
            return self.ask(Ask::Read {
                since: self.delivered,
            });
        }
        self.catch_up()
    }

    fn ask(&mut self, ask: Ask) -> Option<Ask> {
        if self.asked.is_some() {
            return None;
        }
        // Sent after the stream was re-established: its answer covers what came before.
        self.stale = false;
        self.asked = Some(ask);
        Some(ask)
    }

    fn deliver(&mut self, m: Incoming, out: &mut Vec<Step>) {
        self.delivered = m.message.seq;
        out.push(Step::Deliver(m));
    }

    fn restart(&mut self, epoch: Arc<str>, seq: u64, out: &mut Vec<Step>) {
        self.epoch = epoch.clone();
        self.delivered = seq;
        self.ahead.clear();
        out.push(Step::Restart { epoch, seq });
    }

    /// Deliver history messages after `delivered`, in order. The history is contiguous; what
    /// it no longer keeps before its first message (trimmed) is skipped, but live copies that
    /// wait are delivered rather than dropped, and a live copy is preferred (it carries the
    /// control action; a message read back has it parsed from its frame).
    fn take_history(
        &mut self,
        epoch: &Arc<str>,
        messages: Vec<StoredMessage>,
        out: &mut Vec<Step>,
    ) {
        for message in messages {
            if message.seq <= self.delivered {
                continue;
            }
            if message.seq > self.delivered + 1 {
                self.skip_below(message.seq, out);
            }
            let m = match self.ahead.remove(&message.seq) {
                Some(live) => live,
                None => Incoming {
                    epoch: epoch.clone(),
                    action: Action::of_frame(&message.frame),
                    message,
                },
            };
            self.deliver(m, out);
        }
    }

    /// Deliver what waits below `seq`, in order, over holes the history cannot fill; the
    /// position moves to just below `seq` (or to the last delivered, for `u64::MAX`).
    fn skip_below(&mut self, seq: u64, out: &mut Vec<Step>) {
        while let Some(entry) = self.ahead.first_entry() {
            if *entry.key() >= seq {
                break;
            }
            let m = entry.remove();
            if m.message.seq > self.delivered {
                self.deliver(m, out);
            }
        }
        if seq != u64::MAX {
            self.delivered = self.delivered.max(seq - 1);
        }
    }

    /// Deliver what waits contiguously after `delivered`.
    fn drain(&mut self, out: &mut Vec<Step>) {
        while let Some(entry) = self.ahead.first_entry() {
            let seq = *entry.key();
            if seq <= self.delivered {
                entry.remove();
            } else if seq == self.delivered + 1 {
                let m = entry.remove();
                self.deliver(m, out);
            } else {
                break;
            }
        }
    }

    /// Feed again what arrived while loading or under another epoch.
    fn refeed(&mut self, out: &mut Vec<Step>) -> Option<Ask> {
        let mut ask = None;
        for m in std::mem::take(&mut self.other) {
            if let Some(a) = self.message(m, out) {
                ask = Some(a);
            }
        }
        self.drain(out);
        ask.or_else(|| self.retry())
    }
}

#[cfg(test)]
mod tests;
