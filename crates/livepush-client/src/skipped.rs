//! Messages whose `data` the client cannot decode, and what it does with them.
//!
//! A server without a nesting limit may send `data` nested deeper than serde_json decodes
//! (128 levels, envelope included). Such a frame is read with
//! [`ServerFrame::parse_tolerant`]: its `data` becomes `null` and the rest of it is used.
//! Invariant: such a message is never handed to the application, and never lost track of
//! either: a transient one is reported at once and dropped; a reliable one (or an inbox
//! message) goes through ordering like any other, so its seq counts (no gap, no pull, no
//! replay of it by the next poll or stream) and where it would be delivered, its report
//! ([`Event::Error`] with `bad_frame`, ending in "skipped") is emitted instead.

use std::collections::HashMap;

use livepush_proto::{ErrorCode, Message, ServerFrame, Undecodable};

use crate::Event;

/// Marks kept at most; past it they are forgotten (a mark is normally taken within the same
/// batch, and one never taken belongs to a message that was a duplicate).
const MAX_MARKS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Mark {
    Room(String, u64),
    Inbox(u64),
}

/// The undecodable messages waiting for their turn, with why each could not be decoded.
#[derive(Debug, Default)]
pub(crate) struct Skipped {
    marks: HashMap<Mark, String>,
}

fn report(room: Option<String>, what: String, error: &str) -> Event {
    Event::Error {
        code: ErrorCode::BadFrame,
        message: format!("{what}: `data` could not be decoded ({error}); skipped"),
        room,
    }
}

impl Skipped {
    /// A frame read by [`ServerFrame::parse_tolerant`] with what it could not decode: the
    /// frame to handle (none for a transient message), and a report to emit now.
    pub fn admit(
        &mut self,
        frame: ServerFrame,
        bad: Vec<Undecodable>,
    ) -> (Option<ServerFrame>, Option<Event>) {
        let Some(first) = bad.first() else {
            return (Some(frame), None);
        };
        if let ServerFrame::Msg(Message {
            seq: None, room, ..
        }) = &frame
        {
            let what = format!("a transient message of room {room:?}");
            return (None, Some(report(Some(room.clone()), what, &first.error)));
        }
        if self.marks.len() + bad.len() > MAX_MARKS {
            self.marks.clear();
        }
        let inbox = matches!(frame, ServerFrame::Inbox { .. });
        for b in bad {
            let mark = match (inbox, b.room, b.seq) {
                (true, _, Some(seq)) => Mark::Inbox(seq),
                (false, Some(room), Some(seq)) => Mark::Room(room, seq),
                _ => continue,
            };
            self.marks.insert(mark, b.error);
        }
        (Some(frame), None)
    }

    /// The report to emit instead of delivering reliable message `seq` of `room`, if it
    /// could not be decoded.
    pub fn take_room(&mut self, room: &str, seq: u64) -> Option<Event> {
        let error = self.marks.remove(&Mark::Room(room.to_owned(), seq))?;
        let what = format!("message seq {seq} of room {room:?}");
        Some(report(Some(room.to_owned()), what, &error))
    }

    /// The report to emit instead of delivering inbox message `seq`, if it could not be
    /// decoded.
    pub fn take_inbox(&mut self, seq: u64) -> Option<Event> {
        let error = self.marks.remove(&Mark::Inbox(seq))?;
        Some(report(None, format!("inbox message seq {seq}"), &error))
    }
}
