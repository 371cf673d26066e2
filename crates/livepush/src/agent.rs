//! `livepush agent`: a terminal that sleeps until it is woken over UDP (see
//! [`livepush_client::WakeAgent`]). Prints every inbox message as one JSON line on stdout,
//! and its state changes as JSON lines on stderr (unless `--quiet`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use livepush_client::{
    AgentEvent, AgentState, ClientConfig, ConnectReason, TransportMode, WakeAgent, WakeAgentConfig,
    WakeCredentials,
};
use serde_json::{Value, json};

use crate::ServerArg;

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Terminal token (from `livepush token`).
    #[arg(long, env = "LIVEPUSH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Stay connected this long after the inbox was taken (e.g. 5s); 0 leaves at once.
    #[arg(long, default_value = "0s", value_parser = duration)]
    linger: Duration,
    /// Interval of UDP keepalives while idle.
    #[arg(long, default_value = "60s", value_parser = duration)]
    keepalive: Duration,
    /// Connect on its own after this long without a session, in case wakes were lost
    /// (`off` or 0 disables it).
    #[arg(long, default_value = "15m", value_parser = safety_net)]
    safety_net: Duration,
    /// The server's UDP wake listener (default: the server's host and port, on UDP).
    #[arg(long)]
    wake_addr: Option<SocketAddr>,
    /// Local address of the UDP socket (default: any address, any port).
    #[arg(long)]
    udp_bind: Option<SocketAddr>,
    /// Transport of the sessions: `auto` (WebSocket, falling back to long-polling), `ws`,
    /// `longpoll`.
    #[arg(long, default_value = "auto", value_parser = transport_mode)]
    transport: TransportMode,
    /// Cache the terminal id and wake key in this file (read at start, written when learned),
    /// so that the agent can be woken even if its first connect fails.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// With a cached key: do not connect at start, go idle at once.
    #[arg(long, requires = "key_file")]
    no_start_connect: bool,
    /// Do not print state changes on stderr.
    #[arg(long, short)]
    quiet: bool,
}

fn duration(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 2m)"))
}

/// A safety-net interval; `off` is zero (disabled).
fn safety_net(s: &str) -> Result<Duration, String> {
    match s.trim() {
        "off" | "none" => Ok(Duration::ZERO),
        other => duration(other),
    }
}

fn transport_mode(s: &str) -> Result<TransportMode, String> {
    match s {
        "auto" => Ok(TransportMode::Auto),
        "ws" | "websocket" => Ok(TransportMode::WebSocket),
        "longpoll" | "long-polling" => Ok(TransportMode::LongPoll),
        other => Err(format!("unknown transport {other:?} (auto, ws, longpoll)")),
    }
}

fn read_key_file(path: &PathBuf) -> anyhow::Result<Option<WakeCredentials>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    match (v["terminal"].as_str(), v["wake_key"].as_str()) {
        (Some(t), Some(k)) => Ok(Some(WakeCredentials {
            terminal: t.to_owned(),
            wake_key: k.to_owned(),
        })),
        _ => anyhow::bail!(
            "{}: expected {{\"terminal\":…,\"wake_key\":…}}",
            path.display()
        ),
    }
}

fn write_key_file(path: &PathBuf, c: &WakeCredentials) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let text = json!({"terminal": c.terminal, "wake_key": c.wake_key}).to_string();
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A state change as one JSON object.
pub fn state_json(s: &AgentState) -> Value {
    match s {
        AgentState::Connecting(reason) => {
            let mut v = json!({"event":"state","state":"connecting"});
            let (name, inbox) = match reason {
                ConnectReason::Start => ("start", None),
                ConnectReason::Wake { inbox } => ("wake", Some(*inbox)),
                ConnectReason::SafetyNet => ("safety_net", None),
                ConnectReason::Retry => ("retry", None),
                ConnectReason::Requested => ("requested", None),
            };
            v["reason"] = json!(name);
            if let Some(i) = inbox {
                v["inbox"] = json!(i);
            }
            v
        }
        other => json!({"event":"state","state":other.name()}),
    }
}

pub async fn run(a: AgentArgs) -> anyhow::Result<()> {
    let credentials = match &a.key_file {
        Some(p) => read_key_file(p)?,
        None => None,
    };
    let (agent, mut events) = WakeAgent::start(WakeAgentConfig {
        client: ClientConfig {
            server: a.server.server.clone(),
            token: a.token.clone(),
            client_name: format!("livepush-agent/{}", env!("CARGO_PKG_VERSION")),
            transport: a.transport,
            ..ClientConfig::default()
        },
        keepalive_interval: a.keepalive,
        linger: a.linger,
        safety_net: Some(a.safety_net).filter(|d| !d.is_zero()),
        wake_addr: a.wake_addr,
        udp_bind: a.udp_bind,
        connect_at_start: !a.no_start_connect,
        credentials,
        ..WakeAgentConfig::default()
    })
    .await?;
    if !a.quiet {
        eprintln!(
            "{}",
            json!({"event":"listening","udp":agent.local_addr().to_string(),
                   "wake_addr":agent.wake_addr().to_string()})
        );
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            e = events.recv() => match e {
                Some(AgentEvent::Inbox(m)) => println!(
                    "{}",
                    json!({"event":"inbox","seq":m.seq,"type":m.ty,"data":m.data,"ts":m.ts})
                ),
                Some(AgentEvent::State(s)) => {
                    if !a.quiet {
                        eprintln!("{}", state_json(&s));
                    }
                }
                Some(AgentEvent::Credentials(c)) => {
                    if let Some(p) = &a.key_file
                        && let Err(e) = write_key_file(p, &c)
                    {
                        eprintln!("livepush agent: cannot cache the wake key: {e:#}");
                    }
                }
                Some(AgentEvent::Error { code, message }) => {
                    eprintln!("{}", json!({"event":"error","code":code,"message":message}));
                }
                Some(AgentEvent::Ignored { from, reason }) => {
                    if !a.quiet {
                        eprintln!(
                            "{}",
                            json!({"event":"ignored","from":from.to_string(),
                                   "reason":format!("{reason:?}")})
                        );
                    }
                }
                Some(AgentEvent::Acked { .. }) => {}
                None => break,
            }
        }
    }
    agent.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("0").unwrap(), Duration::ZERO);
        assert_eq!(duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(safety_net("off").unwrap(), Duration::ZERO);
        assert_eq!(safety_net("15m").unwrap(), Duration::from_secs(900));
        assert!(duration("soon").is_err());
    }

    #[test]
    fn states() {
        assert_eq!(
            state_json(&AgentState::Connecting(ConnectReason::Wake { inbox: 3 })),
            json!({"event":"state","state":"connecting","reason":"wake","inbox":3})
        );
        assert_eq!(
            state_json(&AgentState::Idle),
            json!({"event":"state","state":"idle"})
        );
    }
}
