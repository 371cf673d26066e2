//! UDP wake-up: the listener for keepalives of sleeping terminals and the sender of wake
//! datagrams.
//!
//! Wake keys are derived, not stored: `wake_key(T) = HMAC-SHA256(token_secret,
//! "livepush/wake-key/v1|" + T)`. Every node of a deployment derives the same key for a
//! terminal, nothing can be lost in a restart, and rotating the token secret rotates every
//! wake key (terminals pick up the new one at their next connect).
//!
//! Safety rules, all enforced here:
//! - a keepalive counts only if its mac verifies, its `ts` is within `wake_max_skew` of the
//!   server's clock, and it is newer than the last one accepted for that terminal (a captured
//!   keepalive cannot be replayed to redirect wakes), also across restarts (see "Replays
//!   across restarts" in [`crate::inbox`]);
//! - the server never answers a keepalive, and never sends an address a wake datagram larger
//!   than the keepalive that address sent (no amplification);
//! - wake datagrams go only to an address that proved the key, and are rate limited per
//!   terminal.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use livepush_proto::wake::{Keepalive, MAX_WAKE_BYTES, Wake, WakeError, WakeKey};
use tokio::net::UdpSocket;

use crate::clock::now_ms;
use crate::metrics::WakeStats;
use crate::store::WakeRegistration;

/// Derives terminals' wake keys from the server secret. Cheap to clone (every session holds
/// one): the secret is shared.
#[derive(Clone)]
pub struct WakeKeys {
    secret: Arc<[u8]>,
}

impl std::fmt::Debug for WakeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WakeKeys(..)")
    }
}

impl WakeKeys {
    pub fn new(secret: &str) -> WakeKeys {
        WakeKeys {
            secret: Arc::from(secret.as_bytes()),
        }
    }

    pub fn key(&self, terminal: &str) -> WakeKey {
        WakeKey::derive(&self.secret, terminal)
    }
}

/// The UDP side: one socket for keepalives in and wakes out.
#[derive(Debug)]
pub struct WakeSocket {
    socket: UdpSocket,
    keys: WakeKeys,
    max_skew_ms: u64,
    limiter: DefaultKeyedRateLimiter<Arc<str>>,
    pub stats: WakeStats,
}

/// A verified keepalive.
#[derive(Debug, Clone)]
pub struct Registration {
    pub terminal: String,
    pub registration: WakeRegistration,
}

impl WakeSocket {
    pub fn new(
        socket: UdpSocket,
        keys: WakeKeys,
        max_skew_ms: u64,
        rate_per_minute: u32,
        burst: u32,
        stats: WakeStats,
    ) -> WakeSocket {
        let per_minute = NonZeroU32::new(rate_per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        WakeSocket {
            socket,
            keys,
            max_skew_ms,
            limiter: RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst)),
            stats,
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Receive the next datagram and verify it as a keepalive (its mac and freshness).
    /// Invalid datagrams are counted and skipped; this returns only verified keepalives. The
    /// caller refuses a replay (a `ts` not newer than the terminal's last one, which the
    /// engine keeps) and counts the result with [`WakeStats::keepalive`].
    /// How far a keepalive's `ts` may be from the server's clock (`--wake-max-skew`).
    pub fn max_skew_ms(&self) -> u64 {
        self.max_skew_ms
    }

    pub async fn next_keepalive(&self) -> std::io::Result<Registration> {
        // One byte more than any keepalive may be, so that an oversized one is noticed.
        let mut buf = [0u8; 1025];
        loop {
            let (n, from) = self.socket.recv_from(&mut buf).await?;
            if n > 1024 {
                self.stats.keepalive("malformed");
                continue;
            }
            let ka = match Keepalive::parse(&buf[..n]) {
                Ok(ka) => ka,
                Err(_) => {
                    self.stats.keepalive("malformed");
                    continue;
                }
            };
            let key = self.keys.key(&ka.terminal);
            match ka.verify(&key, now_ms(), self.max_skew_ms) {
                Ok(()) => {}
                Err(WakeError::Stale) => {
                    self.stats.keepalive("stale");
                    continue;
                }
                Err(_) => {
                    self.stats.keepalive("bad_mac");
                    continue;
                }
            }
            return Ok(Registration {
                terminal: ka.terminal,
                registration: WakeRegistration {
                    addr: from,
                    size: n as u16,
                    ts: ka.ts,
                },
            });
        }
    }

    /// Send one wake datagram for `terminal` (newest inbox seq `inbox`) to its registered
    /// address. Returns whether it was sent.
    pub async fn wake(&self, terminal: &Arc<str>, inbox: u64, to: &WakeRegistration) -> bool {
        let datagram = Wake {
            terminal: terminal.to_string(),
            inbox,
            ts: now_ms(),
        }
        .encode(&self.keys.key(terminal));
        if datagram.len() > MAX_WAKE_BYTES || datagram.len() > to.size as usize {
            // Larger than what that address sent us: never amplify.
            self.stats.wake("too_large");
            return false;
        }
        if self.limiter.check_key(terminal).is_err() {
            self.stats.wake("rate_limited");
            return false;
        }
        match self.socket.send_to(&datagram, to.addr).await {
            Ok(_) => {
                self.stats.wake("sent");
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, addr = %to.addr, "wake send failed");
                self.stats.wake("send_failed");
                false
            }
        }
    }

    /// Forget rate-limit state of quiet terminals.
    pub fn retain_recent(&self) {
        self.limiter.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ReasonLabel;

    #[test]
    fn keys_are_per_terminal_and_per_secret() {
        let a = WakeKeys::new("secret-one-0123456789");
        let b = WakeKeys::new("secret-two-0123456789");
        assert_eq!(a.key("t1"), a.key("t1"));
        assert_ne!(a.key("t1"), a.key("t2"));
        assert_ne!(a.key("t1"), b.key("t1"));
    }

    #[tokio::test]
    async fn verifies_keepalives_and_never_amplifies() {
        let keys = WakeKeys::new("secret-one-0123456789");
        let server = WakeSocket::new(
            UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            keys.clone(),
            60_000,
            60,
            10,
            WakeStats::default(),
        );
        let addr = server.local_addr().unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // Forged (wrong key), stale, then good.
        let wrong = WakeKey::from_bytes(b"nope".to_vec());
        client
            .send_to(&Keepalive::encode("t", now_ms(), &wrong, 0), addr)
            .await
            .unwrap();
        client
            .send_to(&Keepalive::encode("t", 1, &keys.key("t"), 0), addr)
            .await
            .unwrap();
        let good = Keepalive::encode("t", now_ms(), &keys.key("t"), 0);
        client.send_to(&good, addr).await.unwrap();
        let reg = server.next_keepalive().await.unwrap();
        assert_eq!(reg.terminal, "t");
        assert_eq!(reg.registration.addr, client.local_addr().unwrap());
        assert_eq!(reg.registration.size as usize, good.len());
        assert_eq!(
            server
                .stats
                .keepalives
                .get_or_create(&ReasonLabel { reason: "bad_mac" })
                .get(),
            1
        );
        // An unpadded keepalive is smaller than a wake: nothing is sent.
        let id: Arc<str> = Arc::from("t");
        assert!(!server.wake(&id, 12345, &reg.registration).await);
        // A padded one allows it.
        let padded = WakeRegistration {
            size: 256,
            ..reg.registration
        };
        assert!(server.wake(&id, 3, &padded).await);
        let mut buf = [0u8; 512];
        let (n, _) = client.recv_from(&mut buf).await.unwrap();
        let w = Wake::verify(&buf[..n], &keys.key("t")).unwrap();
        assert_eq!(w.inbox, 3);
    }
}
