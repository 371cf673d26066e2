//! The file's tables, their key layout, and how rows are encoded.
//!
//! Every table is named `livepush.<what>`. Keys are redb tuples so that everything belonging
//! to one owner (a room, a terminal) is one contiguous key range, which is what lets a room's
//! history be read newest-first and a room's or an inbox's messages be trimmed with a single
//! range operation.
//!
//! | table                | key                              | value                                   |
//! |----------------------|----------------------------------|-----------------------------------------|
//! | `livepush.meta`      | `&str` name                      | bytes (see the `META_*` keys below)     |
//! | `livepush.rooms`     | `&str` room                      | [`RoomRow`]: version, seq, flags, epoch |
//! | `livepush.messages`  | `(&str room, u64 seq)`           | `u64` ts (LE) followed by the frame     |
//! | `livepush.terminals` | `&str` terminal                  | [`TerminalRow`]: version, seq, acked, reserved |
//! | `livepush.inbox`     | `(&str terminal, u64 seq)`       | `u64` ts (LE) followed by the frame (as in `messages`) |
//! | `livepush.wake`      | `(&str terminal, &str provider)` | registration, see [`encode_wake`]; provider [`WAKE_UDP`] |
//!
//! A terminal has a row in `livepush.terminals` as soon as anything was stored for it (an inbox
//! message, an ack or a wake registration); its inbox has no epoch. The row holds the last
//! inbox seq ever handed out (kept when the message is acknowledged or trimmed), the last seq
//! the terminal acknowledged, and, under the `none` policy, the seq up to which appends may
//! have been answered before they were durable (see `redb.rs`, "Inboxes under `none`"). The
//! inbox's acknowledged position lives in the terminal's row rather than in a separate acks
//! table, so that one read gives everything about an inbox.
//!
//! Reserved for later issues, same scheme (not created by this version):
//!
//! | table                 | key                              | value                           |
//! |-----------------------|----------------------------------|---------------------------------|
//! | `livepush.acks`       | `(&str terminal, &str stream)`   | `u64` acked seq (stream = room id) |
//!
//! Adding a table that an older build can safely ignore keeps [`FORMAT_VERSION`]; any other
//! change of layout or encoding bumps it, and an older build then refuses the file.
//!
//! The terminal tables were added in version 1 under that rule: a build that predates them
//! neither reads nor writes them, so it can open such a file and leave the inboxes alone. The
//! one thing it could break is the `none` crash rule for inboxes, since it clears
//! `meta["dirty"]` at open without knowing about terminals; that is why inboxes have their own
//! marker, `meta["dirty.inbox"]`, which such a build never touches.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use redb::TableDefinition;

use super::super::{RoomFlags, WakeRegistration};

pub(super) const META: TableDefinition<'static, &str, &[u8]> =
    TableDefinition::new("livepush.meta");
pub(super) const ROOMS: TableDefinition<'static, &str, &[u8]> =
    TableDefinition::new("livepush.rooms");
pub(super) const MESSAGES: TableDefinition<'static, (&str, u64), &[u8]> =
    TableDefinition::new("livepush.messages");
pub(super) const TERMINALS: TableDefinition<'static, &str, &[u8]> =
    TableDefinition::new("livepush.terminals");
pub(super) const INBOX: TableDefinition<'static, (&str, u64), &[u8]> =
    TableDefinition::new("livepush.inbox");
pub(super) const WAKE: TableDefinition<'static, (&str, &str), &[u8]> =
    TableDefinition::new("livepush.wake");
/// The provider of a [`WakeRegistration`] (UDP wake-up datagrams) in `livepush.wake`.
pub(super) const WAKE_UDP: &str = "udp";

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
/// `meta["dirty.inbox"]`: set and cleared together with `meta["dirty"]`. Found set at open
/// (or `dirty` found set), every terminal's inbox seq continues after its reserved mark. Kept
/// apart from `dirty` because a build that predates inboxes clears `dirty` at open without
/// doing that.
pub(super) const META_INBOX_DIRTY: &str = "dirty.inbox";

const ROW_VERSION: u8 = 1;
/// A record that cannot be read back (written by another version, or damaged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unreadable {0}")]
pub(super) struct Unreadable(pub &'static str);

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

    pub fn decode(bytes: &[u8]) -> Result<RoomRow, Unreadable> {
        if bytes.len() < 10 || bytes[0] != ROW_VERSION {
            return Err(Unreadable("room record"));
        }
        let seq = u64::from_le_bytes(
            bytes[1..9]
                .try_into()
                .map_err(|_| Unreadable("room record"))?,
        );
        let flags = bytes[9];
        let epoch = std::str::from_utf8(&bytes[10..])
            .map_err(|_| Unreadable("room record (epoch not utf-8)"))?
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

const TERMINAL_ROW_VERSION: u8 = 1;
const TERMINAL_ROW_LEN: usize = 25;

/// A terminal's inbox record. Encoded as
/// `[version u8][seq u64 LE][acked u64 LE][reserved u64 LE]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct TerminalRow {
    /// The last inbox seq handed out (kept once the message is acknowledged or trimmed).
    pub seq: u64,
    /// The last inbox seq the terminal acknowledged.
    pub acked: u64,
    /// Under the `none` policy: a durable bound on every inbox seq that may have been answered
    /// before it was durable. After an unclean stop under `none` the inbox continues after it.
    pub reserved: u64,
}

impl TerminalRow {
    pub fn encode(&self) -> [u8; TERMINAL_ROW_LEN] {
        let mut out = [0u8; TERMINAL_ROW_LEN];
        out[0] = TERMINAL_ROW_VERSION;
        out[1..9].copy_from_slice(&self.seq.to_le_bytes());
        out[9..17].copy_from_slice(&self.acked.to_le_bytes());
        out[17..25].copy_from_slice(&self.reserved.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<TerminalRow, Unreadable> {
        if bytes.len() != TERMINAL_ROW_LEN || bytes[0] != TERMINAL_ROW_VERSION {
            return Err(Unreadable("terminal record"));
        }
        let u64_at = |at: usize| {
            bytes[at..at + 8]
                .try_into()
                .map(u64::from_le_bytes)
                .map_err(|_| Unreadable("terminal record"))
        };
        Ok(TerminalRow {
            seq: u64_at(1)?,
            acked: u64_at(9)?,
            reserved: u64_at(17)?,
        })
    }
}

const WAKE_VERSION: u8 = 1;
const WAKE_V4: u8 = 4;
const WAKE_V6: u8 = 6;

/// A wake registration: `[version u8][size u16 LE][ts u64 LE][port u16 LE]` followed by
/// `[4][IPv4 address, 4 bytes]` or `[6][IPv6 address, 16 bytes][flowinfo u32 LE][scope id
/// u32 LE]`.
pub(super) fn encode_wake(registration: &WakeRegistration) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    out.push(WAKE_VERSION);
    out.extend_from_slice(&registration.size.to_le_bytes());
    out.extend_from_slice(&registration.ts.to_le_bytes());
    out.extend_from_slice(&registration.addr.port().to_le_bytes());
    match registration.addr {
        SocketAddr::V4(addr) => {
            out.push(WAKE_V4);
            out.extend_from_slice(&addr.ip().octets());
        }
        SocketAddr::V6(addr) => {
            out.push(WAKE_V6);
            out.extend_from_slice(&addr.ip().octets());
            out.extend_from_slice(&addr.flowinfo().to_le_bytes());
            out.extend_from_slice(&addr.scope_id().to_le_bytes());
        }
    }
    out
}

pub(super) fn decode_wake(bytes: &[u8]) -> Result<WakeRegistration, Unreadable> {
    let bad = || Unreadable("wake registration");
    let field = |from: usize, len: usize| bytes.get(from..from + len).ok_or_else(bad);
    if bytes.first() != Some(&WAKE_VERSION) {
        return Err(bad());
    }
    let size = u16::from_le_bytes(field(1, 2)?.try_into().map_err(|_| bad())?);
    let ts = u64::from_le_bytes(field(3, 8)?.try_into().map_err(|_| bad())?);
    let port = u16::from_le_bytes(field(11, 2)?.try_into().map_err(|_| bad())?);
    let addr = match (bytes.get(13), bytes.len()) {
        (Some(&WAKE_V4), 18) => {
            let ip: [u8; 4] = field(14, 4)?.try_into().map_err(|_| bad())?;
            SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)
        }
        (Some(&WAKE_V6), 38) => {
            let ip: [u8; 16] = field(14, 16)?.try_into().map_err(|_| bad())?;
            let flowinfo = u32::from_le_bytes(field(30, 4)?.try_into().map_err(|_| bad())?);
            let scope_id = u32::from_le_bytes(field(34, 4)?.try_into().map_err(|_| bad())?);
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flowinfo,
                scope_id,
            ))
        }
        _ => return Err(bad()),
    };
    Ok(WakeRegistration { addr, size, ts })
}

/// A message value: `[ts u64 LE][frame]`.
pub(super) fn encode_message(ts: u64, frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + frame.len());
    out.extend_from_slice(&ts.to_le_bytes());
    out.extend_from_slice(frame);
    out
}

pub(super) fn decode_message(bytes: &[u8]) -> Result<(u64, &[u8]), Unreadable> {
    if bytes.len() < 8 {
        return Err(Unreadable("message record"));
    }
    let (ts, frame) = bytes.split_at(8);
    let ts = u64::from_le_bytes(ts.try_into().map_err(|_| Unreadable("message record"))?);
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
    fn terminal_row_round_trip() {
        let row = TerminalRow {
            seq: u64::MAX - 1,
            acked: 7,
            reserved: 1 << 40,
        };
        assert_eq!(TerminalRow::decode(&row.encode()).unwrap(), row);
        assert_eq!(
            TerminalRow::decode(&TerminalRow::default().encode()).unwrap(),
            TerminalRow::default()
        );
        assert!(TerminalRow::decode(b"").is_err());
        assert!(TerminalRow::decode(&[9; 25]).is_err());
        assert!(TerminalRow::decode(&row.encode()[..24]).is_err());
    }

    #[test]
    fn wake_round_trip() {
        for addr in [
            "192.0.2.7:40000",
            "0.0.0.0:0",
            "[2001:db8::1]:65535",
            "[fe80::1%3]:9",
        ] {
            let registration = WakeRegistration {
                addr: addr.parse().unwrap(),
                size: 1200,
                ts: 1_700_000_000_123,
            };
            let bytes = encode_wake(&registration);
            assert_eq!(decode_wake(&bytes).unwrap(), registration, "{addr}");
            for len in 0..bytes.len() {
                assert!(decode_wake(&bytes[..len]).is_err(), "{addr} cut at {len}");
            }
        }
        let mut v6 = SocketAddrV6::new(Ipv6Addr::LOCALHOST, 1, 0, 0);
        v6.set_flowinfo(0xabcd);
        let registration = WakeRegistration {
            addr: SocketAddr::V6(v6),
            size: 0,
            ts: 0,
        };
        assert_eq!(
            decode_wake(&encode_wake(&registration)).unwrap(),
            registration
        );
        assert!(decode_wake(&[2; 18]).is_err());
    }

    #[test]
    fn message_round_trip() {
        let v = encode_message(42, b"{\"t\":\"msg\"}");
        assert_eq!(decode_message(&v).unwrap(), (42, &b"{\"t\":\"msg\"}"[..]));
        assert!(decode_message(b"1234").is_err());
    }
}
