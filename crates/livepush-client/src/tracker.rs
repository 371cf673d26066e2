//! Per-room ordering of reliable messages, with no IO.
//!
//! A [`RoomTracker`] sees every `joined`, reliable `msg`, `prompt` and `pulled` frame of one
//! room and answers with [`Effect`]s: messages to hand to the application (each `seq` exactly
//! once, in increasing order), `pull` requests to send, and gaps it had to give up on. The
//! connection task owns one tracker per room and does the IO.
//!
//! Invariants:
//! - within one history (from a `joined`, an [`RoomTracker::on_history_reset`] or an
//!   [`Effect::Rewound`] to the next), delivered seqs strictly increase, and the position
//!   ([`RoomTracker::resume_from`]) is the last delivered seq or the base the tracker was
//!   told to start after;
//! - at most one `pull` is outstanding, and a `pulled` answer that does not answer it (one
//!   that crossed a reset or a reconnect) changes nothing;
//! - the out-of-order buffer never holds more than `max_buffered` messages;
//! - the position only moves backwards when the server says its history is behind it (a
//!   `joined` below it, a `pulled{recovered:false}` from beyond its latest seq, a new
//!   history pushed while live), never because of what arrives on the wire otherwise.

use std::collections::BTreeMap;

use livepush_proto::{Message, Position};

/// A reliable room message as delivered to the application: it always has a `seq` and the
/// `epoch` of the history it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomMessage {
    pub room: String,
    pub epoch: String,
    pub seq: u64,
    /// The message `type` (`gift`, `control`, …).
    pub ty: String,
    pub data: serde_json::Value,
    /// Server timestamp, milliseconds since the Unix epoch.
    pub ts: u64,
}

impl RoomMessage {
    /// The position just after this message: persist it and pass it to
    /// [`Client::join`](crate::Client::join) to resume the room after a restart.
    pub fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            seq: self.seq,
        }
    }
}

/// What the connection task must do after the tracker has seen a frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Hand this message to the application.
    Deliver(RoomMessage),
    /// The server no longer has seqs `first..=last` of the current epoch: they will never be
    /// delivered. Comes before the next [`Effect::Deliver`].
    Lost { first: u64, last: u64 },
    /// Send `{"op":"pull","room":…,"since":since}`.
    Pull { since: u64 },
    /// The history changed under a live subscription (a `pulled` answer names another epoch):
    /// send `join` again with [`RoomTracker::resume_from`] to get a proper `joined`.
    Rejoin,
    /// A pull from beyond the server's latest seq (contract v1.1, decision 7): the server
    /// lost messages it had delivered, and its history now ends at `seq`, below the
    /// position. The position moved back to `seq` (the seqs after it will be *new*
    /// messages); nothing is pulled again. Report it like a resume that failed
    /// (`joined{recovered:false}`): the application's view is no longer the server's.
    Rewound { seq: u64 },
}

/// Ordering and de-duplication state of one room: a pure state machine, fed by the
/// connection task.
///
/// Rules, in the words of the wire contract:
/// - `seq <= last delivered` is a duplicate (a replay overlapping what was already delivered,
///   a live message that a pull also returned) and is dropped silently;
/// - `seq == last + 1` is delivered, then any buffered successors;
/// - `seq > last + 1` is a gap: the message is buffered (bounded) and ONE `pull` for the gap
///   is sent; further pulls wait until its `pulled` answer has arrived;
/// - `prompt{seq}` means messages up to `seq` exist: pull until they are delivered;
/// - `joined{recovered:false}` (history window exceeded or epoch changed) and
///   `pulled{recovered:false}`: the server no longer has every message after our position, so
///   the first message it does have becomes the new base and the skipped seqs are reported as
///   [`Effect::Lost`];
/// - a `pulled` answer with nothing past the pull's `since` ends the pulling (the server has
///   nothing more): held messages beyond the gap are then delivered after an
///   [`Effect::Lost`], rather than pulling forever;
/// - a `pulled{recovered:false}` whose latest seq is below the position (the pull started
///   beyond the server's history) moves the position back to that seq
///   ([`Effect::Rewound`]) and does not pull again;
/// - a new history pushed while live ([`on_history_reset`](Self::on_history_reset)) is
///   adopted as is: the position becomes its `(epoch, seq)` and live messages continue
///   from there, with no replay, no pull and no rejoin.
#[derive(Debug, Clone)]
pub struct RoomTracker {
    room: String,
    /// The history we follow; `None` until the first `joined` of a join without `since`.
    epoch: Option<String>,
    /// Last seq handed to the application (or the base we start after).
    last: u64,
    /// Messages ahead of `last + 1`, waiting for the gap to be filled.
    buffer: BTreeMap<u64, Message>,
    max_buffered: usize,
    /// A `joined` has been seen on the current connection.
    live: bool,
    /// After `joined{recovered:false}`: the server cannot give everything after `last`, so the
    /// first reliable message it sends becomes the new base.
    resync: bool,
    /// A `pull` is outstanding.
    pull_in_flight: bool,
    /// Pull until `last >= pull_target` (0: no pull wanted).
    pull_target: u64,
    /// The `since` of the outstanding pull.
    pull_since: u64,
}

impl RoomTracker {
    /// A tracker for `room` starting at `since` (`None`: start from the live edge at the first
    /// `joined`). `max_buffered` bounds the out-of-order buffer (at least 1 is used).
    pub fn new(room: impl Into<String>, since: Option<Position>, max_buffered: usize) -> Self {
        let (epoch, last) = match since {
            Some(p) => (Some(p.epoch), p.seq),
            None => (None, 0),
        };
        RoomTracker {
            room: room.into(),
            epoch,
            last,
            buffer: BTreeMap::new(),
            max_buffered: max_buffered.max(1),
            live: false,
            resync: false,
            pull_in_flight: false,
            pull_target: 0,
            pull_since: 0,
        }
    }

    pub fn room(&self) -> &str {
        &self.room
    }

    /// The `since` of the next `join`: the epoch and the last seq delivered, once an epoch is
    /// known.
    pub fn resume_from(&self) -> Option<Position> {
        self.epoch.as_ref().map(|e| Position {
            epoch: e.clone(),
            seq: self.last,
        })
    }

    /// Whether a `joined` has been seen since the last [`on_disconnect`](Self::on_disconnect).
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// Whether a `pull` is outstanding.
    pub fn pull_in_flight(&self) -> bool {
        self.pull_in_flight
    }

    /// The epoch of the history followed, once known.
    pub fn epoch(&self) -> Option<&str> {
        self.epoch.as_deref()
    }

    /// Messages currently held in the out-of-order buffer.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The connection ended: everything per-connection is forgotten; the position stays.
    pub fn on_disconnect(&mut self) {
        self.live = false;
        self.resync = false;
        self.pull_in_flight = false;
        self.pull_target = 0;
        self.buffer.clear();
    }

    /// Long-poll: the room is attached again at [`resume_from`](Self::resume_from) by a new
    /// poll. A server answers a complete resume in the same epoch without `joined`, with
    /// only the messages after the position, so the tracker goes live at once; a `joined`
    /// in the answer (another epoch, messages lost) is still applied with
    /// [`on_joined`](Self::on_joined). The per-poll state (a held gap, an outstanding pull)
    /// is forgotten: the poll's replay from the position covers it. Does nothing while no
    /// epoch is known (a fresh join waits for its `joined`).
    pub fn on_attached(&mut self) {
        if self.epoch.is_some() {
            self.on_disconnect();
            self.live = true;
        }
    }

    /// Long-poll: the answer that carried `joined{seq: latest}` has been read to its end and
    /// held no `prompt` for the room, so the whole replay has been seen. When the join said
    /// `recovered: false` and no message followed it, the server keeps nothing after the
    /// position: `last+1..=latest` are reported lost and the room continues from `latest`
    /// (otherwise every poll would be answered with the same `joined` again).
    pub fn on_replay_complete(&mut self, latest: u64) -> Vec<Effect> {
        let mut out = Vec::new();
        if self.live && self.resync && !self.pull_in_flight {
            self.resync = false;
            self.skip_to(latest, &mut out);
            self.drain(&mut out);
        }
        out
    }

    /// A `joined{epoch, seq, recovered}` answer. The replay (if any) follows as messages.
    pub fn on_joined(&mut self, epoch: &str, seq: u64, recovered: bool) {
        self.on_disconnect();
        self.live = true;
        match &self.epoch {
            None => {
                // A join without `since`: start at the live edge; there is no replay.
                self.epoch = Some(epoch.to_owned());
                self.last = seq;
            }
            Some(current) if current == epoch => {
                if seq < self.last {
                    // The server has fewer messages than we delivered: it lost data. Follow it.
                    self.last = seq;
                }
                self.resync = !recovered;
            }
            Some(_) => {
                // Another history: our position means nothing in it. Whatever it still keeps
                // is replayed; its first message becomes the base.
                self.epoch = Some(epoch.to_owned());
                self.last = 0;
                self.resync = true;
            }
        }
    }

    /// A `joined` the server pushed for a room that is live on this connection, not the
    /// answer to a join (contract v1.1, decision 8: the server's history was lost, e.g. its
    /// store was flushed, and the room restarts as `epoch` at `seq`). The position becomes
    /// `(epoch, seq)`, even backwards and even in the same epoch; no replay follows, so live
    /// messages continue from `seq + 1`. Whatever was held for the old history (buffered
    /// messages, an outstanding pull) is forgotten.
    pub fn on_history_reset(&mut self, epoch: &str, seq: u64) {
        self.reset_to(epoch.to_owned(), seq);
    }

    /// Start over at `(epoch, seq)`, live, with nothing held or outstanding.
    fn reset_to(&mut self, epoch: String, seq: u64) {
        self.on_disconnect();
        self.live = true;
        self.epoch = Some(epoch);
        self.last = seq;
    }

    /// A reliable `msg` (one with a `seq`); transient messages never come here.
    pub fn on_message(&mut self, msg: Message) -> Vec<Effect> {
        let mut out = Vec::new();
        let Some(seq) = msg.seq else {
            return out;
        };
        if !self.live || seq <= self.last {
            // Before `joined` the replay will bring it again; at or below `last` it is a dup.
            return out;
        }
        if seq == self.last.saturating_add(1) {
            self.resync = false;
            self.deliver(msg, &mut out);
            self.drain(&mut out);
            self.maybe_pull(&mut out);
        } else if self.resync && !self.pull_in_flight {
            // First message after `joined{recovered:false}`: the server kept nothing older.
            self.resync = false;
            self.skip_to(seq.saturating_sub(1), &mut out);
            self.deliver(msg, &mut out);
            self.drain(&mut out);
            self.maybe_pull(&mut out);
        } else {
            self.hold(seq, msg);
            self.pull_target = self.pull_target.max(seq);
            self.maybe_pull(&mut out);
        }
        out
    }

    /// A `prompt{seq}`: messages up to `seq` exist; pull them.
    pub fn on_prompt(&mut self, seq: u64) -> Vec<Effect> {
        let mut out = Vec::new();
        if self.live {
            self.pull_target = self.pull_target.max(seq);
            self.maybe_pull(&mut out);
        }
        out
    }

    /// A `pulled{epoch, seq: latest, recovered, messages}` answer to our pull. An answer
    /// while no pull is outstanding (one that crossed a reconnect, a
    /// [`on_history_reset`](Self::on_history_reset) or a failed pull) is ignored.
    pub fn on_pulled(
        &mut self,
        epoch: &str,
        latest: u64,
        recovered: bool,
        messages: Vec<Message>,
    ) -> Vec<Effect> {
        let mut out = Vec::new();
        if !self.live || !self.pull_in_flight {
            return out;
        }
        self.pull_in_flight = false;
        let Some(current) = self.epoch.clone().filter(|e| e == epoch) else {
            // Not the history we follow: re-establish the position with a fresh `joined`.
            self.on_disconnect();
            out.push(Effect::Rejoin);
            return out;
        };
        if !recovered && latest < self.last {
            // The pull started beyond the server's latest seq: it lost messages it had
            // delivered. Follow it back; pulling again would get the same answer.
            self.reset_to(current, latest);
            out.push(Effect::Rewound { seq: latest });
            return out;
        }
        // Did the server return anything past what we asked for? (Live messages may have
        // moved `last` beyond the pull's `since` meanwhile; that is still progress.)
        let answered_past_since = messages
            .iter()
            .filter_map(|m| m.seq)
            .any(|s| s > self.pull_since);
        let first_kept = messages.iter().filter_map(|m| m.seq).min();
        let mut messages: Vec<(u64, Message)> = messages
            .into_iter()
            .filter_map(|m| m.seq.map(|s| (s, m)))
            .filter(|(s, _)| *s > self.last)
            .collect();
        messages.sort_by_key(|(s, _)| *s);
        // A pull answer settles the question a `joined{recovered:false}` left open.
        self.resync = false;
        if !recovered {
            // The server could not return everything after our `since`: what it has starts
            // at its first message; without any, everything up to `latest` is gone.
            match first_kept {
                Some(first) => self.skip_to(first.saturating_sub(1), &mut out),
                None => self.skip_to(latest, &mut out),
            }
        }
        for (seq, m) in messages {
            if seq == self.last.saturating_add(1) {
                self.deliver(m, &mut out);
                self.drain(&mut out);
            } else if seq > self.last {
                self.hold(seq, m);
            }
        }
        self.drain(&mut out);
        if !answered_past_since {
            // The server has nothing more for this gap (or prompt). Give up on it rather than
            // pull forever, and go on from what we hold.
            self.pull_target = 0;
            if let Some(&first) = self.buffer.keys().next() {
                self.skip_to(first.saturating_sub(1), &mut out);
                self.drain(&mut out);
            }
        }
        self.maybe_pull(&mut out);
        out
    }

    /// Our pull was answered with an `error`: forget it. The next gap or prompt pulls again.
    pub fn on_pull_failed(&mut self) {
        self.pull_in_flight = false;
    }

    fn deliver(&mut self, m: Message, out: &mut Vec<Effect>) {
        let Some(seq) = m.seq else { return };
        self.last = seq;
        out.push(Effect::Deliver(RoomMessage {
            room: m.room,
            epoch: self.epoch.clone().unwrap_or_default(),
            seq,
            ty: m.ty,
            data: m.data,
            ts: m.ts,
        }));
    }

    /// Deliver buffered successors of `last`, and drop buffered entries at or below it.
    fn drain(&mut self, out: &mut Vec<Effect>) {
        while let Some((&seq, _)) = self.buffer.first_key_value() {
            if seq <= self.last {
                self.buffer.pop_first();
            } else if seq == self.last.saturating_add(1) {
                if let Some((_, m)) = self.buffer.pop_first() {
                    self.deliver(m, out);
                }
            } else {
                break;
            }
        }
        if self.pull_target <= self.last {
            self.pull_target = 0;
        }
    }

    /// Give up on seqs up to `to`: report them lost and move `last` there.
    fn skip_to(&mut self, to: u64, out: &mut Vec<Effect>) {
        if to > self.last {
            out.push(Effect::Lost {
                first: self.last.saturating_add(1),
                last: to,
            });
            self.last = to;
        }
    }

    fn hold(&mut self, seq: u64, m: Message) {
        if self.buffer.len() >= self.max_buffered && !self.buffer.contains_key(&seq) {
            // Too far behind: drop what we hold; the pull brings it back in order.
            self.buffer.clear();
        }
        self.buffer.insert(seq, m);
    }

    /// Send one pull if a gap or a prompt wants one and none is outstanding.
    fn maybe_pull(&mut self, out: &mut Vec<Effect>) {
        let gap = self
            .buffer
            .keys()
            .next()
            .is_some_and(|&first| first > self.last.saturating_add(1));
        if (gap || self.pull_target > self.last) && !self.pull_in_flight {
            self.pull_in_flight = true;
            self.pull_since = self.last;
            out.push(Effect::Pull { since: self.last });
        }
    }
}

#[cfg(test)]
mod tests;
