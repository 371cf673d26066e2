//! UDP wake-up datagrams: the keepalive a sleeping terminal sends, and the wake the server
//! sends it when a direct message arrives.
//!
//! Both are JSON objects authenticated with HMAC-SHA256 under the terminal's `wake_key` (the
//! key from its last `connected` frame: standard base64 with padding; the HMAC is keyed with
//! the decoded bytes; macs are lowercase hex):
//!
//! - keepalive, terminal → server: `{"hello":T,"ts":MS,"mac":HEX}`, mac over `"T|MS"`.
//!   A terminal may add a `"pad"` string: the server never answers an address with more bytes
//!   than it sent, so a terminal pads its keepalives to at least the size of a wake datagram.
//! - wake, server → terminal: `{"wake":T,"inbox":N,"ts":MS,"mac":HEX}`, mac over `"T|N|MS"`,
//!   at most [`MAX_WAKE_BYTES`] bytes.
//!
//! Datagrams are read as JSON, with every escape JSON allows (`"\u0065"`, `"a\/b"`, `"\""`):
//! the mac covers the decoded strings (`T` is the terminal id itself, UTF-8, as in the token's
//! `sub`) and the decimal digits of the numbers, never the bytes as the sender escaped them,
//! so any JSON encoder can write a keepalive the server verifies.

use std::borrow::Cow;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Largest wake datagram the server sends.
pub const MAX_WAKE_BYTES: usize = 256;

/// Size a keepalive should be padded to, so that any wake the server may send fits under it.
pub const KEEPALIVE_PAD_TO: usize = MAX_WAKE_BYTES;

/// A terminal's wake key (raw bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct WakeKey(Vec<u8>);

impl std::fmt::Debug for WakeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WakeKey(..)")
    }
}

/// Why a datagram was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WakeError {
    #[error("not a wake datagram: {0}")]
    Malformed(String),
    #[error("bad mac")]
    BadMac,
    #[error("stale timestamp")]
    Stale,
    #[error("bad wake key: {0}")]
    BadKey(String),
}

impl WakeKey {
    pub fn from_bytes(bytes: Vec<u8>) -> WakeKey {
        WakeKey(bytes)
    }

    /// Decode the `wake_key` of a `connected` frame.
    pub fn from_base64(s: &str) -> Result<WakeKey, WakeError> {
        let bytes = STANDARD
            .decode(s)
            .map_err(|e| WakeError::BadKey(e.to_string()))?;
        if bytes.is_empty() {
            return Err(WakeError::BadKey("empty key".into()));
        }
        Ok(WakeKey(bytes))
    }

    /// Derive a terminal's key from a server secret: HMAC-SHA256(secret,
    /// "livepush/wake-key/v1|" + terminal). Every server with the same secret derives the same
    /// key, so keys need no storage and survive restarts.
    pub fn derive(secret: &[u8], terminal: &str) -> WakeKey {
        let mut m = WakeKey(secret.to_vec()).mac("livepush/wake-key/v1|");
        m.update(terminal.as_bytes());
        WakeKey(m.finalize().into_bytes().to_vec())
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(&self.0)
    }

    fn mac(&self, msg: &str) -> HmacSha256 {
        // HMAC accepts keys of any length.
        let mut m =
            <HmacSha256 as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable_hmac());
        m.update(msg.as_bytes());
        m
    }

    fn sign(&self, msg: &str) -> String {
        hex::encode(self.mac(msg).finalize().into_bytes())
    }

    fn check(&self, msg: &str, mac_hex: &str) -> Result<(), WakeError> {
        let given = hex::decode(mac_hex).map_err(|_| WakeError::BadMac)?;
        self.mac(msg)
            .verify_slice(&given)
            .map_err(|_| WakeError::BadMac)
    }
}

#[cold]
fn unreachable_hmac() -> HmacSha256 {
    // `new_from_slice` only fails for MACs with a fixed key size, which HMAC is not.
    <HmacSha256 as Mac>::new_from_slice(b"k").unwrap_or_else(|_| unreachable!())
}

// Strings are `Cow`: borrowed when the sender wrote them without escapes, owned when it
// used any (`\u0065`, `\/`, `\"`), which every JSON encoder may do.
#[derive(Serialize, Deserialize)]
struct KeepaliveWire<'a> {
    #[serde(borrow)]
    hello: Cow<'a, str>,
    ts: u64,
    #[serde(borrow)]
    mac: Cow<'a, str>,
    #[serde(default, borrow, skip_serializing_if = "str::is_empty")]
    pad: Cow<'a, str>,
}

#[derive(Serialize, Deserialize)]
struct WakeWire<'a> {
    #[serde(borrow)]
    wake: Cow<'a, str>,
    inbox: u64,
    ts: u64,
    #[serde(borrow)]
    mac: Cow<'a, str>,
}

/// A keepalive that has been read but not yet verified: the server must look up the key of
/// `terminal` before it can check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keepalive {
    pub terminal: String,
    pub ts: u64,
    mac: String,
}

impl Keepalive {
    /// Read a keepalive datagram.
    pub fn parse(datagram: &[u8]) -> Result<Keepalive, WakeError> {
        let w: KeepaliveWire<'_> =
            serde_json::from_slice(datagram).map_err(|e| WakeError::Malformed(e.to_string()))?;
        if w.hello.is_empty() || w.hello.len() > 128 {
            return Err(WakeError::Malformed("bad terminal id".into()));
        }
        Ok(Keepalive {
            terminal: w.hello.into_owned(),
            ts: w.ts,
            mac: w.mac.into_owned(),
        })
    }

    /// Check the mac and that `ts` is within `max_skew_ms` of `now_ms`.
    pub fn verify(&self, key: &WakeKey, now_ms: u64, max_skew_ms: u64) -> Result<(), WakeError> {
        key.check(&format!("{}|{}", self.terminal, self.ts), &self.mac)?;
        if self.ts.abs_diff(now_ms) > max_skew_ms {
            return Err(WakeError::Stale);
        }
        Ok(())
    }

    /// Encode a keepalive, padded to at least `pad_to` bytes.
    pub fn encode(terminal: &str, ts: u64, key: &WakeKey, pad_to: usize) -> Vec<u8> {
        let mac = key.sign(&format!("{terminal}|{ts}"));
        let bare = serde_json::to_vec(&KeepaliveWire {
            hello: terminal.into(),
            ts,
            mac: (&mac).into(),
            pad: "".into(),
        })
        .unwrap_or_default();
        // `,"pad":""` costs 9 bytes before any padding.
        let need = pad_to.saturating_sub(bare.len() + 9);
        if pad_to <= bare.len() {
            return bare;
        }
        let pad = "0".repeat(need.max(1));
        serde_json::to_vec(&KeepaliveWire {
            hello: terminal.into(),
            ts,
            mac: mac.into(),
            pad: pad.into(),
        })
        .unwrap_or(bare)
    }
}

/// A wake datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wake {
    pub terminal: String,
    /// The newest inbox seq waiting for the terminal.
    pub inbox: u64,
    pub ts: u64,
}

impl Wake {
    pub fn encode(&self, key: &WakeKey) -> Vec<u8> {
        let mac = key.sign(&format!("{}|{}|{}", self.terminal, self.inbox, self.ts));
        serde_json::to_vec(&WakeWire {
            wake: (&self.terminal).into(),
            inbox: self.inbox,
            ts: self.ts,
            mac: mac.into(),
        })
        .unwrap_or_default()
    }

    /// Read and verify a wake datagram (the terminal's side).
    pub fn verify(datagram: &[u8], key: &WakeKey) -> Result<Wake, WakeError> {
        let w: WakeWire<'_> =
            serde_json::from_slice(datagram).map_err(|e| WakeError::Malformed(e.to_string()))?;
        key.check(&format!("{}|{}|{}", w.wake, w.inbox, w.ts), &w.mac)?;
        Ok(Wake {
            terminal: w.wake.into_owned(),
            inbox: w.inbox,
            ts: w.ts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> WakeKey {
        WakeKey::from_bytes(b"0123456789abcdef0123456789abcdef".to_vec())
    }

    #[test]
    fn keepalive_round_trip_and_mac_matches_the_contract() {
        let k = key();
        let d = Keepalive::encode("t1", 1000, &k, 0);
        let text = std::str::from_utf8(&d).unwrap();
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        // mac = HMAC-SHA256(key, "T|MS"), lowercase hex.
        let mut m =
            <HmacSha256 as Mac>::new_from_slice(b"0123456789abcdef0123456789abcdef").unwrap();
        m.update(b"t1|1000");
        assert_eq!(v["mac"], hex::encode(m.finalize().into_bytes()));
        let ka = Keepalive::parse(&d).unwrap();
        assert_eq!(ka.terminal, "t1");
        assert!(ka.verify(&k, 1000, 1000).is_ok());
        assert_eq!(ka.verify(&k, 1_000_000, 1000), Err(WakeError::Stale));
        let other = WakeKey::from_bytes(b"another key".to_vec());
        assert_eq!(ka.verify(&other, 1000, 1000), Err(WakeError::BadMac));
    }

    #[test]
    fn padded_keepalives_cover_any_wake() {
        let k = key();
        // The longest terminal id, a 13-digit ms timestamp, a 10-digit inbox seq: 256 bytes
        // hold it (a larger wake is never sent).
        let id = "x".repeat(128);
        let ka = Keepalive::encode(&id, 9_999_999_999_999, &k, KEEPALIVE_PAD_TO);
        let w = Wake {
            terminal: id.clone(),
            inbox: 9_999_999_999,
            ts: 9_999_999_999_999,
        }
        .encode(&k);
        assert!(w.len() <= MAX_WAKE_BYTES, "{}", w.len());
        let short = Keepalive::encode("t", 1, &k, KEEPALIVE_PAD_TO);
        assert!(short.len() >= KEEPALIVE_PAD_TO);
        assert!(Keepalive::parse(&ka).is_ok());
        let w = Wake {
            terminal: "t".into(),
            inbox: 10_000_000,
            ts: 1_800_000_000_000,
        }
        .encode(&k);
        assert!(w.len() <= short.len());
    }

    #[test]
    fn wake_round_trip_and_forgery() {
        let k = key();
        let w = Wake {
            terminal: "t".into(),
            inbox: 7,
            ts: 5,
        };
        let d = w.encode(&k);
        assert_eq!(Wake::verify(&d, &k).unwrap(), w);
        let mut forged: serde_json::Value = serde_json::from_slice(&d).unwrap();
        forged["inbox"] = serde_json::json!(8);
        assert_eq!(
            Wake::verify(&serde_json::to_vec(&forged).unwrap(), &k),
            Err(WakeError::BadMac)
        );
        assert!(Wake::verify(b"junk", &k).is_err());
    }

    #[test]
    fn base64_keys() {
        let k = key();
        assert_eq!(WakeKey::from_base64(&k.to_base64()).unwrap(), k);
        assert!(WakeKey::from_base64("***").is_err());
        assert!(WakeKey::from_base64("").is_err());
    }

    /// A JSON string literal of `s` in which each character is written in one of the ways
    /// JSON allows, chosen by `how` (PHP's and Go's encoders escape `/`, `<`, non-ASCII).
    fn escaped(s: &str, how: &[u8]) -> String {
        let mut out = String::from("\"");
        for (i, c) in s.chars().enumerate() {
            let pick = how.get(i % how.len().max(1)).copied().unwrap_or(0) % 3;
            match (c, pick) {
                ('"', 0) | ('\\', 0) => out.push_str(&format!("\\{c}")),
                ('/', 0) => out.push_str("\\/"),
                (c, 0 | 1) if (c as u32) >= 0x20 && c != '"' && c != '\\' => out.push(c),
                (c, _) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04X}"));
                    }
                }
            }
        }
        out.push('"');
        out
    }

    fn keepalive_with_id_literal(id: &str, literal: &str, ts: u64) -> Vec<u8> {
        let mac = key().sign(&format!("{id}|{ts}"));
        format!(r#"{{"hello":{literal},"ts":{ts},"mac":"{mac}","pad":"\u0030\/"}}"#).into_bytes()
    }

    #[test]
    fn keepalives_with_escaped_ids_verify() {
        // The mac covers the decoded id, however the sender's encoder escaped it.
        for (id, literal) in [
            ("box-7", r#""\u0062ox-7""#),
            ("a/b", r#""a\/b""#),
            ("q\"uote", r#""q\"uote""#),
            ("back\\slash", r#""back\\slash""#),
            ("é", r#""\u00e9""#),
            ("😀", r#""\ud83d\ude00""#),
        ] {
            let d = keepalive_with_id_literal(id, literal, 1000);
            let ka = Keepalive::parse(&d).unwrap_or_else(|e| panic!("{literal}: {e}"));
            assert_eq!(ka.terminal, id);
            assert_eq!(ka.verify(&key(), 1000, 0), Ok(()), "{literal}");
        }
        // Ids with `"` or `\` round-trip through `encode` (serde_json escapes them).
        let d = Keepalive::encode("a\"b\\c", 7, &key(), KEEPALIVE_PAD_TO);
        let ka = Keepalive::parse(&d).unwrap();
        assert_eq!(ka.terminal, "a\"b\\c");
        assert_eq!(ka.verify(&key(), 7, 0), Ok(()));
    }

    #[test]
    fn wakes_with_escaped_ids_verify() {
        let w = Wake {
            terminal: "a\"b/c".into(),
            inbox: 3,
            ts: 9,
        };
        assert_eq!(Wake::verify(&w.encode(&key()), &key()), Ok(w.clone()));
        let mac = key().sign("a\"b/c|3|9");
        let d = format!(r#"{{"wake":"a\"b\/\u0063","inbox":3,"ts":9,"mac":"{mac}"}}"#);
        assert_eq!(Wake::verify(d.as_bytes(), &key()), Ok(w));
    }

    proptest! {
        // Any id serde_json can write, written with any mix of JSON's escapes, parses back to
        // the same id and verifies.
        #[test]
        fn any_escaping_of_any_id_round_trips(
            id in "\\PC{1,40}|[\"\\\\/\\x00-\\x1f]{1,10}",
            how in proptest::collection::vec(any::<u8>(), 1..16),
            ts in any::<u64>(),
        ) {
            prop_assume!(id.len() <= 128);
            let encoded = Keepalive::encode(&id, ts, &key(), KEEPALIVE_PAD_TO);
            let ka = Keepalive::parse(&encoded).unwrap();
            prop_assert_eq!(&ka.terminal, &id);
            prop_assert_eq!(ka.verify(&key(), ts, 0), Ok(()));
            let d = keepalive_with_id_literal(&id, &escaped(&id, &how), ts);
            let ka = Keepalive::parse(&d).unwrap();
            prop_assert_eq!(&ka.terminal, &id);
            prop_assert_eq!(ka.verify(&key(), ts, 0), Ok(()));
        }

        #[test]
        fn parsing_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Keepalive::parse(&b);
            let _ = Wake::verify(&b, &key());
        }
    }
}
