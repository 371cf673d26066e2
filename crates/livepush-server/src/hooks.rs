//! Backend hooks. The connect hook, which admits terminals without a token, is in
//! [`connect`]; this module is the send hook and what both share (the signed request).
//!
//! Contract v1.1, "Integration surface": with `--send-hook URL`, a terminal's
//! `send` (viewer chat) is first POSTed to the app's backend, which allows it, rejects it (the
//! sender gets an `error` frame, nobody else sees it) or rewrites its `data` (masked words).
//!
//! Invariants:
//! - A hook never blocks the session, the reactor or another room: each check runs in a task
//!   of its own, and at most `send_hook_concurrency` run at once per node; past that, a send
//!   counts as a hook failure at once (no queue that grows with a slow backend).
//! - Every request is signed: `X-Livepush-Signature: sha256=HEX`, the HMAC-SHA256 of the raw
//!   body with `--hook-secret`, so the backend can tell livepush from anyone else.
//! - An answer that is not one of the three, or none within `send_hook_timeout`, is a failure:
//!   `send_hook_failure = closed` (default) refuses the send with `unavailable`; `open` lets
//!   it through as sent. A rewritten `data` is held to the same size and nesting limits as a
//!   terminal's own.
//! - A reject's `code` must be one of the contract's error codes (the set is fixed); any other
//!   is sent as `forbidden`, with the backend's message.

pub mod connect;

use std::sync::Arc;
use std::time::Instant;

use hmac::{Hmac, Mac};
use livepush_proto::{ErrorCode, FrameError};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use sha2::Sha256;
use tokio::sync::Semaphore;

use crate::clock::now_ms;
use crate::config::{HookFailure, SendHookSettings};
use crate::metrics::HookStats;

/// What the backend decided about a send.
#[derive(Debug)]
pub enum Verdict {
    /// Deliver it as sent.
    Allow,
    /// Deliver this `data` instead.
    Rewrite(Box<RawValue>),
    /// Refuse it: the sender gets this error.
    Reject(FrameError),
}

/// The backend's answer, as the contract spells it: `action` is `allow`, `reject` (with
/// `code` and `message`) or `rewrite` (with `data`). A plain struct, not a tagged enum: serde
/// cannot keep `data` raw through a tagged enum's buffering.
#[derive(Debug, Deserialize)]
struct Answer {
    action: String,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

/// The send hook of this node.
#[derive(Debug)]
pub struct SendHook {
    settings: SendHookSettings,
    backend: Backend,
    permits: Arc<Semaphore>,
    stats: HookStats,
}

/// Where a hook's requests go, and how they are signed: one client (and its connection pool)
/// per hook.
#[derive(Debug)]
struct Backend {
    /// What the hook is called in error messages: "send hook", "connect hook".
    name: &'static str,
    url: String,
    secret: String,
    client: reqwest::Client,
}

impl Backend {
    fn new(name: &'static str, url: &str, secret: &str) -> Backend {
        Backend {
            name,
            url: url.to_owned(),
            secret: secret.to_owned(),
            client: reqwest::Client::new(),
        }
    }

    /// POST `body`, signed; the answer's JSON on a 2xx, why not otherwise.
    async fn ask<T: serde::de::DeserializeOwned>(&self, body: String) -> Result<T, String> {
        let name = self.name;
        let response = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header(
                "x-livepush-signature",
                signature(self.secret.as_bytes(), body.as_bytes()),
            )
            .body(body)
            .send()
            .await
            .map_err(|e| format!("the {name} cannot be reached: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("the {name} answered {}", response.status()));
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| format!("the {name}'s answer was cut: {e}"))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| format!("the {name}'s answer is not {{\"action\":…}}: {e}"))
    }
}

/// The signature header's value for `body`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl SendHook {
    pub fn new(settings: SendHookSettings, stats: HookStats) -> SendHook {
        SendHook {
            permits: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            backend: Backend::new("send hook", &settings.url, &settings.secret),
            settings,
            stats,
        }
    }

    /// Ask the backend about a send (see the module documentation).
    pub async fn check(
        &self,
        terminal: &str,
        room: &str,
        ty: &str,
        data: &RawValue,
        limits: (usize, usize),
    ) -> Verdict {
        let Ok(_permit) = self.permits.clone().try_acquire_owned() else {
            return self.failed("busy", "too many send hook requests in flight");
        };
        let body =
            json!({"terminal": terminal, "room": room, "type": ty, "data": data, "ts": now_ms()})
                .to_string();
        let started = Instant::now();
        let answer =
            tokio::time::timeout(self.settings.timeout, self.backend.ask::<Answer>(body)).await;
        self.stats.seconds.observe(started.elapsed().as_secs_f64());
        let answer = match answer {
            Err(_) => return self.failed("timeout", "the send hook did not answer in time"),
            Ok(Err(why)) => return self.failed("error", &why),
            Ok(Ok(a)) => a,
        };
        match (answer.action.as_str(), answer.data) {
            ("allow", _) => Verdict::Allow,
            ("reject", _) => {
                let code = answer
                    .code
                    .and_then(|c| serde_json::from_value(json!(c)).ok())
                    .unwrap_or(ErrorCode::Forbidden);
                let message = answer
                    .message
                    .unwrap_or_else(|| "refused by the send hook".to_owned());
                Verdict::Reject(FrameError::new(code, message))
            }
            ("rewrite", Some(data)) => {
                let (max_bytes, max_depth) = limits;
                if data.get().len() > max_bytes
                    || livepush_proto::nesting_exceeds(data.get(), max_depth)
                {
                    return self.failed(
                        "bad_answer",
                        "the send hook's rewritten data is over the limits",
                    );
                }
                Verdict::Rewrite(data)
            }
            (action, _) => self.failed(
                "bad_answer",
                &format!(
                    "the send hook answered {action:?}, not allow, reject or rewrite with data"
                ),
            ),
        }
    }

    fn failed(&self, reason: &'static str, why: &str) -> Verdict {
        self.stats.failure(reason);
        tracing::debug!(reason, why, "send hook failure");
        match self.settings.failure {
            HookFailure::Open => Verdict::Allow,
            HookFailure::Closed => Verdict::Reject(FrameError::new(
                ErrorCode::Unavailable,
                format!("{why}; the message was not sent"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231, test case 2: the signature is plain HMAC-SHA256 in lowercase hex.
    #[test]
    fn the_signature_is_hmac_sha256_in_hex() {
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
