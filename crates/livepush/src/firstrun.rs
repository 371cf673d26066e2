//! What `livepush serve` prints for a first run: the address of the demo page (`/`), with a
//! short-lived viewer token when the server generated its own token secret (nobody else could
//! mint one then), or the command that mints one.

use std::time::Duration;

use anyhow::{Context, bail};
use livepush_server::Config;
use livepush_server::auth::{Claims, TokenKeys, now_secs};

/// Default rooms of the viewer token `serve` prints (`--demo-rooms`): the page's default room
/// and every room whose id starts with `demo:`.
pub const DEMO_ROOMS: &str = "live:demo,demo:*";

/// Terminal id of the viewer token `serve` prints.
const DEMO_VIEWER: &str = "demo-viewer";

/// What `serve` says about the demo page after its `listening` line.
pub struct DemoPage {
    pub rooms: Vec<String>,
    pub ttl: Duration,
    pub secret_generated: bool,
}

/// [`DemoPage`] once the configuration is known: the token to print, if any.
pub struct DemoLink {
    dev: bool,
    rooms: String,
    ttl: Duration,
    token: Option<String>,
}

impl DemoPage {
    /// Check the settings and mint the viewer token when `serve` generated the token secret
    /// (nobody else can mint one then).
    pub fn prepare(self, config: &Config) -> anyhow::Result<DemoLink> {
        let rooms: Vec<String> = self
            .rooms
            .into_iter()
            .map(|r| r.trim().to_owned())
            .filter(|r| !r.is_empty())
            .collect();
        if rooms.is_empty() {
            bail!("--demo-rooms needs at least one room (default {DEMO_ROOMS})");
        }
        if self.ttl > config.limits.max_token_ttl {
            bail!(
                "--demo-token-ttl ({}) is longer than --max-token-ttl ({}): the server would refuse that token",
                humantime::format_duration(self.ttl),
                humantime::format_duration(config.limits.max_token_ttl)
            );
        }
        let token = if self.secret_generated && !self.ttl.is_zero() && !config.dev {
            let claims = Claims {
                sub: DEMO_VIEWER.to_owned(),
                exp: now_secs() + self.ttl.as_secs().max(1),
                rooms: rooms.clone(),
                send: true,
            };
            Some(
                TokenKeys::new(&config.token_secret)
                    .mint(&claims)
                    .context("minting the demo page's viewer token")?,
            )
        } else {
            None
        };
        Ok(DemoLink {
            dev: config.dev,
            rooms: rooms.join(","),
            ttl: self.ttl,
            token,
        })
    }
}

impl DemoLink {
    /// After the `listening` line: the address to open (stdout) and what it is (stderr).
    pub fn print(&self, url: &str) {
        let page = format!("{}/", browser_url(url));
        let ttl = short(self.ttl);
        if self.dev {
            println!("open {page}");
            eprintln!("livepush: that address is the demo live room (--dev: no token needed)");
        } else if let Some(token) = &self.token {
            println!("open {page}#token={token}");
            eprintln!(
                "livepush: that address is the demo live room, with a viewer token for rooms {} valid for {ttl}; \
                 its \"Try it\" buttons ask for the API key printed above",
                self.rooms
            );
        } else if !self.ttl.is_zero() {
            eprintln!(
                "livepush: the demo live room at {page} needs a viewer token: \
                 LIVEPUSH_TOKEN_SECRET=… livepush token --sub {DEMO_VIEWER} --rooms '{}' --send --ttl {ttl} \
                 (the server's token secret), then open {page}#token=TOKEN",
                self.rooms
            );
        }
    }
}

/// A duration as `livepush token --ttl` takes it, in its largest whole unit: `1d`, `90m`.
fn short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        _ if s > 0 && s.is_multiple_of(86_400) => format!("{}d", s / 86_400),
        _ if s > 0 && s.is_multiple_of(3600) => format!("{}h", s / 3600),
        _ if s > 0 && s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

/// The address a browser on this machine opens: an unspecified listen address becomes loopback.
fn browser_url(url: &str) -> String {
    url.replacen("://0.0.0.0:", "://127.0.0.1:", 1)
        .replacen("://[::]:", "://[::1]:", 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_in_its_largest_unit() {
        assert_eq!(short(Duration::from_secs(86_400)), "1d");
        assert_eq!(short(Duration::from_secs(7200)), "2h");
        assert_eq!(short(Duration::from_secs(5400)), "90m");
        assert_eq!(short(Duration::from_millis(1500)), "1s");
    }

    #[test]
    fn browser_url_opens_loopback() {
        assert_eq!(browser_url("http://0.0.0.0:8080"), "http://127.0.0.1:8080");
        assert_eq!(browser_url("https://[::]:443"), "https://[::1]:443");
        assert_eq!(browser_url("http://127.0.0.1:9"), "http://127.0.0.1:9");
    }
}
