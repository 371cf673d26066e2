//! `livepush token`.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use livepush_server::auth::{Claims, TokenKeys, now_secs};

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Terminal id (the `sub` claim).
    #[arg(long)]
    sub: String,
    /// Rooms the terminal may join; a trailing `*` matches a prefix. Comma-separated or
    /// repeated.
    #[arg(long, value_delimiter = ',')]
    rooms: Vec<String>,
    /// Allow the terminal to send chat.
    #[arg(long)]
    send: bool,
    /// Lifetime of the token.
    #[arg(long, default_value = "1h", value_parser = |s: &str| humantime::parse_duration(s).map_err(|e| e.to_string()))]
    ttl: Duration,
    /// The server's token secret.
    #[arg(long, env = "LIVEPUSH_TOKEN_SECRET", hide_env_values = true)]
    token_secret: String,
}

pub fn run(a: TokenArgs) -> anyhow::Result<()> {
    let claims = Claims {
        sub: a.sub,
        exp: now_secs() + a.ttl.as_secs(),
        rooms: a.rooms,
        send: a.send,
    };
    let token = TokenKeys::new(&a.token_secret)
        .mint(&claims)
        .context("minting the token")?;
    println!("{token}");
    Ok(())
}
