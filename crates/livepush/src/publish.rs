//! `livepush publish`.

use anyhow::{Context, bail};
use clap::Args;

use crate::ServerArg;

#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    server: ServerArg,
    /// The server's API key.
    #[arg(long, env = "LIVEPUSH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Room to publish to.
    #[arg(long)]
    room: String,
    /// Message type (gift, quiz, control, chat, ...).
    #[arg(long = "type")]
    ty: String,
    /// Message data, JSON.
    #[arg(long, default_value = "{}")]
    data: String,
    /// Override the type's delivery class: reliable or transient.
    #[arg(long)]
    class: Option<String>,
}

pub async fn run(a: PublishArgs) -> anyhow::Result<()> {
    let data: serde_json::Value =
        serde_json::from_str(&a.data).context("--data must be valid JSON")?;
    let mut body = serde_json::json!({"type": a.ty, "data": data});
    if let Some(c) = a.class {
        body["class"] = serde_json::Value::String(c);
    }
    let url = format!(
        "{}/v1/rooms/{}/messages",
        a.server.server.trim_end_matches('/'),
        a.room
    );
    let mut req = reqwest::Client::new().post(&url).json(&body);
    if let Some(k) = &a.api_key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    println!("{text}");
    if !status.is_success() {
        bail!("publish failed: HTTP {status}");
    }
    Ok(())
}
