//! The file's tables, their key layout, and how rows are encoded.
//!
//! Every table is named `livepush.<what>`. Keys are redb tuples so that everything belonging
//! to one owner (a room, later a terminal) is one contiguous key range, which is what lets a
//! room's history be read newest-first and trimmed with a single range operation.
//!
//! | table               | key                       | value                                  |
//! |---------------------|---------------------------|----------------------------------------|
//! | `livepush.meta`     | `&str` name               | bytes (see the `META_*` keys below)    |
//! | `livepush.rooms`    | `&str` room               | [`RoomRow`]: version, seq, flags, epoch |
//! | `livepush.messages` | `(&str room, u64 seq)`    | `u64` ts (LE) followed by the frame    |
//!
//! Reserved for later issues, same scheme (not created by this version):
//!
//! | table                 | key                              | value                           |
//! |-----------------------|----------------------------------|---------------------------------|
//! | `livepush.terminals`  | `&str` terminal                  | epoch + last inbox seq, like a room row |
//! | `livepush.inbox`      | `(&str terminal, u64 seq)`       | `u64` ts followed by the frame  |
//! | `livepush.acks`       | `(&str terminal, &str stream)`   | `u64` acked seq (stream = room id, or `""` for the inbox) |
//! | `livepush.wake`       | `(&str terminal, &str provider)` | registration bytes              |
//!
//! Adding a table that an older build can safely ignore keeps [`FORMAT_VERSION`]; any other
//! change of layout or encoding bumps it, and an older build then refuses the file.

use redb::TableDefinition;

use super::super::RoomFlags;

pub(super) const META: TableDefinition<'static, &str, &[u8]> =
    TableDefinition::new("livepush.meta");
pub(super) const ROOMS: TableDefinition<'static, &str, &[u8]> =
    TableDefinition::new("livepush.rooms");
pub(super) const MESSAGES: TableDefinition<'static, (&str, u64), &[u8]> =
    TableDefinition::new("livepush.messages");

/// `meta["format"]`: identifies the file as a livepush store.
pub(super) const META_FORMAT: &str = "format";
pub(super) const FORMAT_MAGIC: &[u8] = b"livepush-store";
/// `meta["version"]`: `u32` LE, the layout version.
pub(super) const META_VERSION: &str = "version";
/// The layout this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// `meta["dirty"]`: `[1]` while writes may have been answered (and delivered) before they
/// were durable, i.e. between the first write under the `none` policy and a clean flush or
/// close. Found set at open, it means the last run under `none` did not stop cleanly: every
/// room gets a new epoch.
pub(super) const META_DIRTY: &str = "dirty";

const ROW_VERSION: u8 = 1;
const FLAG_MUTED: u8 = 1;
const FLAG_CLOSED: u8 = 2;

/// A room's record: the epoch, the last seq ever appended in it (kept even once the message
/// is trimmed), and its flags. Encoded as `[version u8][seq u64 LE][flags u8][epoch utf-8]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RoomRow {
    pub epoch: String,
    pub seq: u64,
    pub flags: RoomFlags,
}

impl RoomRow {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(10 + self.epoch.len());
        out.push(ROW_VERSION);
        out.extend_from_slice(&self.seq.to_le_bytes());
        let mut flags = 0;
        if self.flags.muted {
            flags |= FLAG_MUTED;
        }
        if self.flags.closed {
            flags |= FLAG_CLOSED;
        }
        out.push(flags);
        out.extend_from_slice(self.epoch.as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<RoomRow, String> {
        if bytes.len() < 10 || bytes[0] != ROW_VERSION {
            return Err("unreadable room record".into());
        }
        let seq = u64::from_le_bytes(bytes[1..9].try_into().map_err(|_| "short room record")?);
        let flags = bytes[9];
        let epoch = std::str::from_utf8(&bytes[10..])
            .map_err(|_| "room record with a non-utf-8 epoch".to_string())?
            .to_owned();
        Ok(RoomRow {
            epoch,
            seq,
            flags: RoomFlags {
                muted: flags & FLAG_MUTED != 0,
                closed: flags & FLAG_CLOSED != 0,
            },
        })
    }
}

/// A message value: `[ts u64 LE][frame]`.
pub(super) fn encode_message(ts: u64, frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + frame.len());
    out.extend_from_slice(&ts.to_le_bytes());
    out.extend_from_slice(frame);
    out
}

pub(super) fn decode_message(bytes: &[u8]) -> Result<(u64, &[u8]), String> {
    if bytes.len() < 8 {
        return Err("unreadable message record".into());
    }
    let (ts, frame) = bytes.split_at(8);
    let ts = u64::from_le_bytes(ts.try_into().map_err(|_| "short message record")?);
    Ok((ts, frame))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_row_round_trip() {
        for (muted, closed) in [(false, false), (true, false), (false, true), (true, true)] {
            let row = RoomRow {
                epoch: "abcDEF0123456789".into(),
                seq: u64::MAX - 3,
                flags: RoomFlags { muted, closed },
            };
            assert_eq!(RoomRow::decode(&row.encode()).unwrap(), row);
        }
        assert!(RoomRow::decode(b"").is_err());
        assert!(RoomRow::decode(&[9; 12]).is_err());
    }

    #[test]
    fn message_round_trip() {
        let v = encode_message(42, b"{\"t\":\"msg\"}");
        assert_eq!(decode_message(&v).unwrap(), (42, &b"{\"t\":\"msg\"}"[..]));
        assert!(decode_message(b"1234").is_err());
    }
}
