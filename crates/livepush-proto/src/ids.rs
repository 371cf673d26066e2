//! Identifiers and positions: rooms, epochs, message types, and `{epoch, seq}` positions.

use serde::{Deserialize, Serialize};

/// Longest room id the contract allows.
pub const MAX_ROOM_LEN: usize = 128;
/// Longest epoch the contract allows.
pub const MAX_EPOCH_LEN: usize = 64;
/// Longest message type livepush accepts (the contract leaves it open; types are short names).
pub const MAX_TYPE_LEN: usize = 64;

fn room_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b':' | b'-')
}

fn epoch_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-')
}

/// An identifier that does not match its pattern. Its message names the pattern and quotes
/// (the start of) what was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("room id must match [A-Za-z0-9_.:-]{{1,{MAX_ROOM_LEN}}}, got {0:?}")]
    Room(String),
    #[error("epoch must match [A-Za-z0-9_-]{{1,{MAX_EPOCH_LEN}}}, got {0:?}")]
    Epoch(String),
    #[error("message type must match [A-Za-z0-9_.:-]{{1,{MAX_TYPE_LEN}}}, got {0:?}")]
    Type(String),
}

/// A room id matches `[A-Za-z0-9_.:-]{1,128}`.
pub fn validate_room(room: &str) -> Result<(), InvalidId> {
    if room.is_empty() || room.len() > MAX_ROOM_LEN || !room.bytes().all(room_char) {
        return Err(InvalidId::Room(truncate(room)));
    }
    Ok(())
}

/// An epoch matches `[A-Za-z0-9_-]{1,64}`.
pub fn validate_epoch(epoch: &str) -> Result<(), InvalidId> {
    if epoch.is_empty() || epoch.len() > MAX_EPOCH_LEN || !epoch.bytes().all(epoch_char) {
        return Err(InvalidId::Epoch(truncate(epoch)));
    }
    Ok(())
}

/// A message type uses the room alphabet and is at most 64 bytes long.
pub fn validate_type(ty: &str) -> Result<(), InvalidId> {
    if ty.is_empty() || ty.len() > MAX_TYPE_LEN || !ty.bytes().all(room_char) {
        return Err(InvalidId::Type(truncate(ty)));
    }
    Ok(())
}

/// The first 40 characters: enough to recognise, bounded in an error message.
fn truncate(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}

/// Delivery class of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Class {
    /// Gets a `seq`, is kept in history and replayed on resume; never silently dropped.
    Reliable,
    /// Delivered live only, may be dropped for a slow terminal, never replayed.
    Transient,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Reliable => "reliable",
            Class::Transient => "transient",
        }
    }
}

/// Where a terminal stands in one room: the history it follows (`epoch`) and the last reliable
/// `seq` it has handed to the app.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    pub epoch: String,
    pub seq: u64,
}

/// The SSE `POSITIONS` syntax: `ROOM:EPOCH:SEQ` entries separated by commas. Rooms may
/// contain `:`, epochs and seqs cannot, so each entry is parsed from the right.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Positions(pub Vec<(String, Position)>);

/// Why a `POSITIONS` string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid position {entry:?}: {reason}")]
pub struct PositionsError {
    pub entry: String,
    pub reason: String,
}

impl Positions {
    pub fn parse(s: &str) -> Result<Positions, PositionsError> {
        let mut out = Vec::new();
        for entry in s.split(',').filter(|e| !e.is_empty()) {
            let err = |reason: &str| PositionsError {
                entry: entry.to_owned(),
                reason: reason.to_owned(),
            };
            let (rest, seq) = entry
                .rsplit_once(':')
                .ok_or_else(|| err("expected ROOM:EPOCH:SEQ"))?;
            let (room, epoch) = rest
                .rsplit_once(':')
                .ok_or_else(|| err("expected ROOM:EPOCH:SEQ"))?;
            let seq: u64 = seq.parse().map_err(|_| err("seq is not a u64"))?;
            validate_room(room).map_err(|e| err(&e.to_string()))?;
            validate_epoch(epoch).map_err(|e| err(&e.to_string()))?;
            out.push((
                room.to_owned(),
                Position {
                    epoch: epoch.to_owned(),
                    seq,
                },
            ));
        }
        Ok(Positions(out))
    }
}

impl std::fmt::Display for Positions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (room, pos)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{room}:{}:{}", pos.epoch, pos.seq)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rooms() {
        assert!(validate_room("live:42").is_ok());
        assert!(validate_room("a.b_c-d:e").is_ok());
        assert!(validate_room("").is_err());
        assert!(validate_room("has space").is_err());
        assert!(validate_room(&"x".repeat(129)).is_err());
        assert!(validate_room(&"x".repeat(128)).is_ok());
        assert!(validate_room("é").is_err());
    }

    #[test]
    fn epochs_reject_colon() {
        assert!(validate_epoch("abc_DEF-1").is_ok());
        assert!(validate_epoch("a:b").is_err());
        assert!(validate_epoch(&"e".repeat(65)).is_err());
    }

    #[test]
    fn positions_parse_from_the_right() {
        let p = Positions::parse("live:1:ep1:5,other:ep2:0").unwrap();
        assert_eq!(p.0[0].0, "live:1");
        assert_eq!(p.0[0].1.epoch, "ep1");
        assert_eq!(p.0[0].1.seq, 5);
        assert_eq!(p.0[1].0, "other");
        assert!(Positions::parse("live:ep").is_err());
        assert!(Positions::parse("live:ep:x").is_err());
        assert!(Positions::parse("").unwrap().0.is_empty());
    }

    proptest! {
        #[test]
        fn positions_round_trip(
            entries in proptest::collection::vec(
                ("[A-Za-z0-9_.:-]{1,20}", "[A-Za-z0-9_-]{1,10}", any::<u64>()), 0..5)
        ) {
            let p = Positions(entries.into_iter().map(|(r, e, s)| (r, Position { epoch: e, seq: s })).collect());
            let text = p.to_string();
            prop_assert_eq!(Positions::parse(&text).unwrap(), p);
        }
    }
}
