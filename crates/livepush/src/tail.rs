//! `livepush tail`: a terminal that prints every event as one JSON line.

use anyhow::{Context, bail};
use clap::Args;
use livepush_client::{Client, ClientConfig, Event, TransportMode};
use livepush_proto::{Position, Positions};
use serde_json::{Value, json};

use crate::ServerArg;

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Room to join (repeatable).
    #[arg(long = "room", required = true)]
    rooms: Vec<String>,
    /// Terminal token (from `livepush token`). Optional against a `--dev` server.
    #[arg(long, env = "LIVEPUSH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Resume from a position: `EPOCH:SEQ` for every room, or `ROOM:EPOCH:SEQ[,…]` per room.
    #[arg(long)]
    since: Option<String>,
    /// Transport: `auto` (WebSocket, falling back to long-polling), `ws`, `longpoll`, `sse`.
    #[arg(long, default_value = "auto", value_parser = transport_mode)]
    transport: TransportMode,
}

fn transport_mode(s: &str) -> Result<TransportMode, String> {
    match s {
        "auto" => Ok(TransportMode::Auto),
        "ws" | "websocket" => Ok(TransportMode::WebSocket),
        "longpoll" | "long-polling" => Ok(TransportMode::LongPoll),
        "sse" => Ok(TransportMode::Sse),
        other => Err(format!(
            "unknown transport {other:?} (auto, ws, longpoll, sse)"
        )),
    }
}

/// Parse `--since`: one colon means EPOCH:SEQ for all rooms, more means per-room positions.
fn since_for(spec: &str, rooms: &[String]) -> anyhow::Result<Vec<(String, Position)>> {
    if spec.matches(':').count() == 1 {
        let (epoch, seq) = spec.split_once(':').context("EPOCH:SEQ")?;
        let seq: u64 = seq.parse().context("--since: SEQ must be a number")?;
        livepush_proto::validate_epoch(epoch).map_err(anyhow::Error::msg)?;
        return Ok(rooms
            .iter()
            .map(|r| {
                (
                    r.clone(),
                    Position {
                        epoch: epoch.to_owned(),
                        seq,
                    },
                )
            })
            .collect());
    }
    let p = Positions::parse(spec).context("--since")?;
    for (room, _) in &p.0 {
        if !rooms.contains(room) {
            bail!("--since names room {room:?}, which is not one of the --room flags");
        }
    }
    Ok(p.0)
}

/// One event as one JSON object.
pub fn event_json(e: &Event) -> Value {
    match e {
        Event::Connected {
            terminal,
            transport,
        } => json!({"event":"connected","terminal":terminal,"transport":transport}),
        Event::Disconnected { reason, retry_in } => json!({
            "event":"disconnected","reason":reason.to_string(),"retry_in_ms":retry_in.as_millis() as u64
        }),
        Event::Joined {
            room,
            epoch,
            seq,
            recovered,
            resumed,
            online,
        } => json!({
            "event":"joined","room":room,"epoch":epoch,"seq":seq,
            "recovered":recovered,"resumed":resumed,"online":online
        }),
        Event::Message(m) => json!({
            "event":"message","room":m.room,"epoch":m.epoch,"seq":m.seq,
            "type":m.ty,"data":m.data,"ts":m.ts
        }),
        Event::Transient(m) => {
            json!({"event":"transient","room":m.room,"type":m.ty,"data":m.data,"ts":m.ts})
        }
        Event::Online { room, count } => json!({"event":"online","room":room,"count":count}),
        Event::Lost { room, first, last } => {
            json!({"event":"lost","room":room,"first":first,"last":last})
        }
        Event::Left { room } => json!({"event":"left","room":room}),
        Event::Inbox(m) => {
            json!({"event":"inbox","seq":m.seq,"type":m.ty,"data":m.data,"ts":m.ts})
        }
        Event::Error {
            code,
            message,
            room,
        } => json!({"event":"error","code":code,"message":message,"room":room}),
    }
}

pub async fn run(a: TailArgs) -> anyhow::Result<()> {
    let positions = match &a.since {
        Some(spec) => since_for(spec, &a.rooms)?,
        None => Vec::new(),
    };
    let (client, mut events) = Client::connect(ClientConfig {
        server: a.server.server.clone(),
        token: a.token.clone(),
        client_name: format!("livepush-tail/{}", env!("CARGO_PKG_VERSION")),
        transport: a.transport,
        ..ClientConfig::default()
    })?;
    for room in &a.rooms {
        let since = positions
            .iter()
            .find(|(r, _)| r == room)
            .map(|(_, p)| p.clone());
        client.join(room, since).await?;
    }
    // SIGINT and SIGTERM close the session cleanly (a killed terminal would count as an
    // interruption of its terminal on the server).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            e = events.recv() => match e {
                Some(e) => println!("{}", event_json(&e)),
                None => break,
            }
        }
    }
    client.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_forms() {
        let rooms = vec!["live:1".to_owned(), "b".to_owned()];
        let all = since_for("ep1:5", &rooms).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].1.seq, 5);
        let one = since_for("live:1:ep1:7", &rooms).unwrap();
        assert_eq!(
            one,
            vec![(
                "live:1".to_owned(),
                Position {
                    epoch: "ep1".into(),
                    seq: 7
                }
            )]
        );
        assert!(since_for("other:ep:1", &rooms).is_err());
        assert!(since_for("ep:x", &rooms).is_err());
    }
}
