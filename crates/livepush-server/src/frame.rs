//! Encoded server frames, and what each one is.
//!
//! A message is encoded once, when it is published, and the same [`Frame`] is queued to every
//! member of its room, kept in the room's history and replayed from there. Beside the shared
//! bytes a frame says what it is ([`What`]): the outbox decides by it what happens past its
//! soft limit (drop a transient message, fold a reliable one into a `prompt`), and the SSE
//! transport keeps each room's position by it, so nothing ever parses the JSON it sends.
//!
//! A frame is one pointer ([`Arc`]): queuing it to a member costs one reference count
//! increment, exactly what cloning the shared `Bytes` cost before the frame carried its
//! kind, so the fan-out path does no more atomic operations than it did.
//!
//! A room's merge window (`--merge-ms`) pushes a *chunk*: several frames queued as one entry,
//! each still whole. Every transport writes a batch through [`join_into`], with its own
//! separator: `\n` inside a WebSocket text frame or an SSE event, `,` inside a long-poll
//! answer's array. Nothing is joined early and split again.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use livepush_proto::{ServerFrame, encode_frame};

/// What a frame is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    /// A reply or a frame about the session (`connected`, `pulled`, `left`, `error`, `pong`,
    /// `inbox`, `transport`): always queued.
    Reply,
    /// `joined`: always queued. SSE starts the room's position from it.
    Joined {
        room: Arc<str>,
        epoch: Arc<str>,
        seq: u64,
        recovered: bool,
    },
    /// Reliable messages of `room` up to `seq`: one `msg`, or a merged chunk whose highest
    /// reliable message is `seq`. Past the soft limit, folded into a `prompt`.
    Reliable { room: Arc<str>, seq: u64 },
    /// Transient messages only: dropped past the soft limit.
    Transient,
    /// Like [`What::Transient`], but not worth answering a parked long-poll for by itself
    /// (online counts): it rides along with the next answer.
    Ambient,
    /// `prompt{room, seq}`: reliable messages of `room` up to `seq` exist, pull them.
    Prompt { room: Arc<str>, seq: u64 },
}

/// An encoded frame (or a chunk of them) and what it is. Cheap to clone: one pointer.
#[derive(Clone)]
pub struct Frame(Arc<Inner>);

struct Inner {
    what: What,
    body: Body,
    /// See [`Frame::len`].
    len: usize,
}

enum Body {
    One(Bytes),
    /// Frames pushed together (a merge window), in order. Never nested.
    Chunk(Box<[Frame]>),
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Frame");
        d.field("what", &self.0.what);
        match &self.0.body {
            Body::One(b) => d.field("bytes", &String::from_utf8_lossy(b)),
            Body::Chunk(parts) => d.field("parts", parts),
        };
        d.finish()
    }
}

impl Frame {
    fn new(what: What, bytes: Bytes) -> Frame {
        let len = bytes.len();
        Frame(Arc::new(Inner {
            what,
            body: Body::One(bytes),
            len,
        }))
    }

    /// An encoded reply or session frame.
    pub fn reply(bytes: Bytes) -> Frame {
        Frame::new(What::Reply, bytes)
    }

    /// Encode a typed reply frame.
    pub fn of(frame: &ServerFrame) -> Frame {
        let what = match frame {
            ServerFrame::Joined {
                room,
                epoch,
                seq,
                recovered,
                ..
            } => What::Joined {
                room: Arc::from(room.as_str()),
                epoch: Arc::from(epoch.as_str()),
                seq: *seq,
                recovered: *recovered,
            },
            ServerFrame::Prompt { room, seq } => What::Prompt {
                room: Arc::from(room.as_str()),
                seq: *seq,
            },
            ServerFrame::Online { .. } => What::Ambient,
            _ => What::Reply,
        };
        Frame::new(what, encode_frame(frame))
    }

    /// A reliable `msg` frame of `room` with `seq`.
    pub fn reliable(room: Arc<str>, seq: u64, bytes: Bytes) -> Frame {
        Frame::new(What::Reliable { room, seq }, bytes)
    }

    /// A transient `msg` frame.
    pub fn transient(bytes: Bytes) -> Frame {
        Frame::new(What::Transient, bytes)
    }

    /// An ambient frame (an online count).
    pub fn ambient(bytes: Bytes) -> Frame {
        Frame::new(What::Ambient, bytes)
    }

    /// A `prompt{room, seq}`.
    pub fn prompt(room: &Arc<str>, seq: u64) -> Frame {
        Frame::new(
            What::Prompt {
                room: room.clone(),
                seq,
            },
            encode_frame(&ServerFrame::Prompt {
                room: room.to_string(),
                seq,
            }),
        )
    }

    /// Frames pushed together as one entry (a merge window's chunk), which is `what` says:
    /// [`What::Reliable`] up to its highest reliable message, or [`What::Transient`]. A
    /// single frame is returned as it is.
    pub fn chunk(what: What, mut parts: Vec<Frame>) -> Frame {
        if parts.len() == 1 {
            return parts.pop().unwrap_or_else(|| Frame::reply(Bytes::new()));
        }
        let len = parts.iter().map(|p| p.len()).sum::<usize>() + parts.len().saturating_sub(1);
        // Chunks are never nested: flatten a part that is itself a chunk.
        let flat: Vec<Frame> = parts
            .into_iter()
            .flat_map(|p| match &p.0.body {
                Body::One(_) => vec![p],
                Body::Chunk(inner) => inner.to_vec(),
            })
            .collect();
        Frame(Arc::new(Inner {
            what,
            body: Body::Chunk(flat.into_boxed_slice()),
            len,
        }))
    }

    pub fn what(&self) -> &What {
        &self.0.what
    }

    /// Bytes of the frame, with a separator byte between the parts of a chunk: what it adds
    /// to a batch joined with [`join_into`] (besides the separator before it).
    pub fn len(&self) -> usize {
        self.0.len
    }

    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// The encoded frames, in order: one, or each part of a chunk.
    pub fn parts(&self) -> impl Iterator<Item = &[u8]> {
        let (one, many): (Option<&[u8]>, &[Frame]) = match &self.0.body {
            Body::One(b) => (Some(b), &[]),
            Body::Chunk(parts) => (None, parts),
        };
        one.into_iter()
            .chain(many.iter().flat_map(|p| match &p.0.body {
                Body::One(b) => Some(&b[..]),
                Body::Chunk(_) => None,
            }))
    }

    /// The encoded bytes of a single frame (`None` for a chunk).
    pub fn bytes(&self) -> Option<&Bytes> {
        match &self.0.body {
            Body::One(b) => Some(b),
            Body::Chunk(_) => None,
        }
    }
}

/// Bytes that [`join_into`] writes for `frames`.
pub fn joined_len(frames: &[Frame]) -> usize {
    run_len(frames, &[])
}

/// Write every encoded frame of a batch into `out`, one JSON object each, separated by `sep`:
/// `\n` in a WebSocket text frame and in an SSE event's data, `,` in a long-poll answer's
/// array. The one way every transport batches.
pub fn join_into(frames: &[Frame], sep: u8, out: &mut Vec<u8>) {
    out.reserve(joined_len(frames));
    join_run_into(frames, &[], sep, out);
}

/// The frames at `range` of a queue, as two slices (a run: see [`join_run_into`]).
pub fn run_of(frames: &VecDeque<Frame>, range: Range<usize>) -> (&[Frame], &[Frame]) {
    let (a, b) = frames.as_slices();
    let (start, end) = (range.start, range.end);
    if end <= a.len() {
        (&a[start..end], &[])
    } else if start >= a.len() {
        (&b[start - a.len()..end - a.len()], &[])
    } else {
        (&a[start..], &b[..end - a.len()])
    }
}

/// Bytes that [`join_run_into`] writes for the run `a` then `b`.
pub fn run_len(a: &[Frame], b: &[Frame]) -> usize {
    (a.iter().chain(b).map(|f| f.len() + 1).sum::<usize>()).saturating_sub(1)
}

/// [`join_into`] for a run of frames given as two slices (a queue's range).
pub fn join_run_into(a: &[Frame], b: &[Frame], sep: u8, out: &mut Vec<u8>) {
    let mut first = true;
    for part in a.iter().chain(b).flat_map(Frame::parts) {
        if !first {
            out.push(sep);
        }
        first = false;
        out.extend_from_slice(part);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(room: &str, seq: u64) -> Frame {
        Frame::reliable(
            Arc::from(room),
            seq,
            Bytes::from(format!(r#"{{"op":"msg","seq":{seq}}}"#)),
        )
    }

    #[test]
    fn a_frame_is_one_pointer() {
        assert_eq!(size_of::<Frame>(), size_of::<usize>());
    }

    #[test]
    fn batches_join_every_part_with_the_transport_separator() {
        let a = msg("r", 1);
        let chunk = Frame::chunk(
            What::Reliable {
                room: Arc::from("r"),
                seq: 3,
            },
            vec![
                msg("r", 2),
                Frame::transient(Bytes::from_static(b"{}")),
                msg("r", 3),
            ],
        );
        let batch = [a, chunk.clone()];
        let mut ws = Vec::new();
        join_into(&batch, b'\n', &mut ws);
        assert_eq!(ws.len(), joined_len(&batch));
        let text = String::from_utf8(ws).unwrap();
        assert_eq!(
            text,
            "{\"op\":\"msg\",\"seq\":1}\n{\"op\":\"msg\",\"seq\":2}\n{}\n{\"op\":\"msg\",\"seq\":3}"
        );
        let mut lp = vec![b'['];
        join_into(&batch, b',', &mut lp);
        lp.push(b']');
        let v: serde_json::Value = serde_json::from_slice(&lp).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 4);
        assert_eq!(chunk.parts().count(), 3);
        assert!(chunk.bytes().is_none());
    }

    #[test]
    fn chunks_are_flat_and_a_single_part_is_itself() {
        let inner = Frame::chunk(What::Transient, vec![msg("r", 1), msg("r", 2)]);
        let outer = Frame::chunk(What::Transient, vec![inner, msg("r", 3)]);
        assert_eq!(outer.parts().count(), 3);
        let one = Frame::chunk(What::Transient, vec![msg("r", 7)]);
        assert!(matches!(one.what(), What::Reliable { seq: 7, .. }));
    }

    #[test]
    fn typed_frames_say_what_they_are() {
        let j = Frame::of(&ServerFrame::Joined {
            id: None,
            room: "r".into(),
            epoch: "e".into(),
            seq: 4,
            recovered: false,
            online: 1,
        });
        assert!(matches!(
            j.what(),
            What::Joined {
                seq: 4,
                recovered: false,
                ..
            }
        ));
        let o = Frame::of(&ServerFrame::Online {
            room: "r".into(),
            count: 2,
        });
        assert_eq!(o.what(), &What::Ambient);
        assert_eq!(
            Frame::of(&ServerFrame::Pong { id: None }).what(),
            &What::Reply
        );
    }
}
