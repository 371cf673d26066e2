//! Terminal tokens (JWT HS256) and the grants they carry.
//!
//! A token names the terminal (`sub`), expires (`exp`), lists the rooms it may join (`rooms`,
//! where a trailing `*` matches a prefix) and says whether it may send chat (`send`). The API
//! key is a different secret with a different use; it is never accepted as a token.
//!
//! A token is accepted only between its `nbf` (if any) and its `exp`, each with
//! [`LEEWAY_SECS`] of clock skew allowed, and only if its `exp` is at most `max_token_ttl`
//! ([`crate::config::Limits::max_token_ttl`]) from now: a token cannot be valid for longer than
//! that, whatever `exp` it was signed with (`exp` = 2^64-1 is not "never expires").

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

// Token expiry is in these units; re-exported for callers that mint tokens.
pub use crate::clock::{now_ms, now_secs};

/// Longest terminal id accepted in `sub`.
pub const MAX_TERMINAL_LEN: usize = 128;

/// Clock skew allowed on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 5;

/// Default of [`crate::config::Limits::max_token_ttl`]: seven days.
pub const DEFAULT_MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Rooms whose id starts with this are livepush's own (the admin feed,
/// [`crate::admin::ADMIN_ROOM`]): a wildcard grant never reaches them (see
/// [`Grants::may_join`]).
pub const RESERVED_ROOM_PREFIX: &str = "_livepush.";

/// The claims of a terminal token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rooms: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub send: bool,
}

/// What a terminal may do, read from its token.
///
/// Kept by every session for its whole life, so the room patterns are stored exactly
/// (one boxed slice, no spare capacity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    rooms: Box<[Box<str>]>,
    send: bool,
}

impl Grants {
    pub fn new(rooms: Vec<String>, send: bool) -> Grants {
        Grants {
            rooms: rooms.into_iter().map(String::into_boxed_str).collect(),
            send,
        }
    }

    /// Every room, may send: what dev mode gives an anonymous terminal.
    pub fn everything() -> Grants {
        Grants::new(vec!["*".to_owned()], true)
    }

    /// Whether a grant names `room`: exactly, or by a prefix pattern (`live:*`). A pattern
    /// never reaches a reserved room ([`RESERVED_ROOM_PREFIX`], the admin page's feed), not
    /// even `*` or dev mode's grant: only a grant naming it exactly does.
    pub fn may_join(&self, room: &str) -> bool {
        self.rooms.iter().any(|g| match g.strip_suffix('*') {
            Some(prefix) => room.starts_with(prefix) && !room.starts_with(RESERVED_ROOM_PREFIX),
            None => &**g == room,
        })
    }

    pub fn may_send(&self) -> bool {
        self.send
    }
}

/// An authenticated terminal.
#[derive(Debug, Clone)]
pub struct Terminal {
    pub id: Arc<str>,
    pub grants: Grants,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token given")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (`nbf` is in the future)")]
    NotYetValid,
    #[error("token `exp` is more than max_token_ttl ({} s) from now", .0.as_secs())]
    TooLong(Duration),
    #[error("invalid token: {0}")]
    Invalid(String),
    /// Dev mode: the anonymous terminal id a client gave back is not a terminal id.
    #[error("`terminal` is not a valid terminal id (1 to {MAX_TERMINAL_LEN} printable characters)")]
    BadTerminalId,
}

/// Whether `id` may be a terminal id: 1 to [`MAX_TERMINAL_LEN`] bytes, no control characters.
pub fn valid_terminal_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_TERMINAL_LEN && !id.chars().any(char::is_control)
}

/// Who a connecting terminal is, the same way on every transport: the `sub` of a valid token
/// (an empty token counts as none). Dev mode (`dev`) accepts no token: the anonymous id the
/// client was given before (`dev_id`, long-poll and SSE reconnect as the same terminal), or a
/// new one, with every room and `send`.
pub fn identify(
    keys: &TokenKeys,
    dev: bool,
    token: Option<&str>,
    dev_id: Option<&str>,
) -> Result<Terminal, AuthError> {
    match token.filter(|t| !t.is_empty()) {
        Some(t) => keys.verify(t),
        None if dev => {
            let id = match dev_id {
                Some(id) if valid_terminal_id(id) => Arc::from(id),
                Some(_) => return Err(AuthError::BadTerminalId),
                None => {
                    use rand::Rng;
                    let id: String = rand::rng()
                        .sample_iter(&rand::distr::Alphanumeric)
                        .take(12)
                        .map(char::from)
                        .collect();
                    Arc::from(format!("anon-{id}"))
                }
            };
            Ok(Terminal {
                id,
                grants: Grants::everything(),
            })
        }
        None => Err(AuthError::Missing),
    }
}

/// Signs and verifies terminal tokens with the server's token secret.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    max_ttl: Duration,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(..)")
    }
}

impl TokenKeys {
    /// Keys for `secret`, accepting tokens whose `exp` is at most [`DEFAULT_MAX_TOKEN_TTL`]
    /// from now.
    pub fn new(secret: &str) -> TokenKeys {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        TokenKeys {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            max_ttl: DEFAULT_MAX_TOKEN_TTL,
        }
    }

    /// Refuse tokens whose `exp` is more than `max_ttl` from now.
    pub fn with_max_ttl(mut self, max_ttl: Duration) -> TokenKeys {
        self.max_ttl = max_ttl;
        self
    }

    /// Sign a token for `claims`.
    pub fn mint(&self, claims: &Claims) -> Result<String, AuthError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }

    /// Check a token's signature, algorithm, validity period (`nbf`, `exp`, `max_ttl`) and
    /// subject.
    pub fn verify(&self, token: &str) -> Result<Terminal, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                _ => AuthError::Invalid(e.to_string()),
            })?;
        let c = data.claims;
        let latest = now_secs()
            .saturating_add(self.max_ttl.as_secs())
            .saturating_add(LEEWAY_SECS);
        if c.exp > latest {
            return Err(AuthError::TooLong(self.max_ttl));
        }
        if !valid_terminal_id(&c.sub) {
            return Err(AuthError::Invalid(format!(
                "`sub` must be 1 to {MAX_TERMINAL_LEN} printable characters"
            )));
        }
        Ok(Terminal {
            id: Arc::from(c.sub),
            grants: Grants::new(c.rooms, c.send),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "t1".into(),
            exp,
            rooms: vec!["live:*".into(), "lobby".into()],
            send: true,
        }
    }

    #[test]
    fn round_trip_and_grants() {
        let k = TokenKeys::new("0123456789abcdef");
        let t = k.mint(&claims(now_secs() + 60)).unwrap();
        let term = k.verify(&t).unwrap();
        assert_eq!(&*term.id, "t1");
        assert!(term.grants.may_join("live:7"));
        assert!(term.grants.may_join("lobby"));
        assert!(!term.grants.may_join("lobby2"));
        assert!(!term.grants.may_join("other"));
        assert!(term.grants.may_send());
    }

    #[test]
    fn rejects_expired_wrong_key_and_garbage() {
        let k = TokenKeys::new("0123456789abcdef");
        let old = k.mint(&claims(now_secs() - 600)).unwrap();
        assert!(matches!(k.verify(&old), Err(AuthError::Expired)));
        let other = TokenKeys::new("fedcba9876543210");
        let t = other.mint(&claims(now_secs() + 60)).unwrap();
        assert!(matches!(k.verify(&t), Err(AuthError::Invalid(_))));
        assert!(k.verify("not.a.jwt").is_err());
        assert!(k.verify("").is_err());
    }

    /// Every transport identifies terminals through `identify`: an empty token is no token.
    #[test]
    fn identify_treats_an_empty_token_as_none() {
        let k = TokenKeys::new("0123456789abcdef");
        assert!(matches!(
            identify(&k, false, Some(""), None),
            Err(AuthError::Missing)
        ));
        assert!(matches!(
            identify(&k, false, None, Some("x")),
            Err(AuthError::Missing)
        ));
        let anon = identify(&k, true, Some(""), None).unwrap();
        assert!(anon.id.starts_with("anon-"));
        assert_eq!(
            &*identify(&k, true, Some(""), Some("anon-1")).unwrap().id,
            "anon-1"
        );
        assert!(matches!(
            identify(&k, true, None, Some("bad\nid")),
            Err(AuthError::BadTerminalId)
        ));
        let t = k.mint(&claims(now_secs() + 60)).unwrap();
        assert_eq!(
            &*identify(&k, true, Some(&t), Some("ignored")).unwrap().id,
            "t1"
        );
    }

    /// A token with exactly these claims (beyond what [`Claims`] can say).
    fn raw_token(k: &TokenKeys, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &k.encoding).unwrap()
    }

    #[test]
    fn a_token_is_refused_before_its_nbf() {
        let k = TokenKeys::new("0123456789abcdef");
        let exp = now_secs() + 600;
        let early = raw_token(
            &k,
            serde_json::json!({"sub": "t1", "exp": exp, "nbf": now_secs() + 300}),
        );
        let e = k.verify(&early).unwrap_err();
        assert!(e.to_string().contains("not valid yet"), "{e}");
        // Within the leeway, and in the past: valid.
        for nbf in [now_secs() + 2, now_secs() - 300] {
            let t = raw_token(&k, serde_json::json!({"sub": "t1", "exp": exp, "nbf": nbf}));
            assert!(k.verify(&t).is_ok(), "nbf {nbf}");
        }
    }

    #[test]
    fn a_token_may_not_live_longer_than_max_token_ttl() {
        let k = TokenKeys::new("0123456789abcdef");
        for exp in [
            u64::MAX,
            i64::MAX as u64,
            now_secs() + DEFAULT_MAX_TOKEN_TTL.as_secs() + 60,
        ] {
            let t = raw_token(&k, serde_json::json!({"sub": "t1", "exp": exp}));
            let e = k.verify(&t).unwrap_err();
            assert!(e.to_string().contains("max_token_ttl"), "exp {exp}: {e}");
        }
        let t = raw_token(
            &k,
            serde_json::json!({"sub": "t1", "exp": now_secs() + DEFAULT_MAX_TOKEN_TTL.as_secs()}),
        );
        assert!(k.verify(&t).is_ok());
        // The bound is a setting.
        let short = TokenKeys::new("0123456789abcdef").with_max_ttl(Duration::from_secs(60));
        let t = raw_token(
            &short,
            serde_json::json!({"sub": "t1", "exp": now_secs() + 600}),
        );
        assert!(short.verify(&t).is_err());
    }

    #[test]
    fn absent_rooms_grant_nothing() {
        let g = Grants::new(vec![], false);
        assert!(!g.may_join("any"));
        assert!(Grants::everything().may_join("any"));
    }

    #[test]
    fn wildcards_never_reach_reserved_rooms() {
        assert!(!Grants::everything().may_join("_livepush.admin"));
        assert!(!Grants::new(vec!["_livepush.*".into()], false).may_join("_livepush.admin"));
        assert!(Grants::new(vec!["_livepush.admin".into()], false).may_join("_livepush.admin"));
        assert!(Grants::new(vec!["_*".into()], false).may_join("_other"));
    }
}
